"""Diffusion Transformer baseline for image denoising (docs/method.md section 4).

A DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") that predicts the noise epsilon
of a DDPM linear schedule, plus the pieces the paper's denoising comparison needs:

- `NoiseSchedule`: the linear schedule of improved DDPM / DiT over any number of timesteps (betas
  scaled by 1000 / timesteps), `q_sample` noises an image at timestep t;
- `level_schedule`, `level_timestep`, `noise_at_level`: the paper's noise *level* as the official code
  defines it (see `level_schedule`): one schedule per training level, each level a timestep of it;
- `DiT`: patchify -> fixed 2-D sin-cos positions -> adaLN-Zero blocks -> adaLN final layer -> pixels;
- `ddim_denoise` / `recursive`: DDIM from the level's timestep down to 0, re-applied to its own
  output, counting forward passes (the paper compares 3 EBT passes with 300 DiT passes).

One file, no class-label conditioning: the only condition is the timestep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ebt.config import resolve_size
from ebt.errors import ConfigError
from ebt.nn import attend

BETA_START, BETA_END = 1e-4, 2e-2  # DDPM linear schedule endpoints at 1000 timesteps (Ho et al.)
DIFFUSION_STEPS = 1000  # the official --diffusion_steps default (its denoising job scripts pass 100)
TRAIN_LEVEL = 0.1  # the paper's training (in-distribution) noise level


# ----------------------------------------------------------------------------------------------------
# noise schedule and noise levels


def linear_alphas_cumprod(steps: int) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), betas linear in scale * BETA_START .. scale * BETA_END
    over `steps` timesteps with scale = 1000 / steps: the "linear" schedule of improved DDPM and DiT,
    which keeps the whole chain's noise about the same for any number of timesteps.

    float64 on the CPU: the products over thousands of steps and the 1 - alpha_bar near t=0 lose
    digits in float32, and CPU scalars can be read with .item() without a device sync.
    """
    scale = 1000 / steps
    if scale * BETA_END > 1:
        raise ConfigError(f"a linear schedule over {steps} timesteps has betas above 1: use at least "
                          f"{math.ceil(1000 * BETA_END)} timesteps")
    betas = torch.linspace(scale * BETA_START, scale * BETA_END, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def _broadcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-example coefficients (B,) or a scalar -> shape broadcastable against x (B, C, H, W)."""
    coef = coef.to(device=x.device, dtype=x.dtype)
    return coef.reshape(-1, *([1] * (x.dim() - 1))) if coef.dim() else coef


class NoiseSchedule:
    """The scaled linear schedule (`linear_alphas_cumprod`) over `steps` timesteps (0 .. steps-1).

    A plain object, not a module: `model.to(bfloat16)` must not round alpha_bar.
    """

    def __init__(self, steps: int = 1000):
        if steps < 2:
            raise ConfigError(f"a noise schedule needs at least 2 timesteps, got steps={steps}")
        self.steps = steps
        self.alphas_cumprod = linear_alphas_cumprod(steps)
        self._tables: dict[torch.device, torch.Tensor] = {}  # alphas_cumprod copies on other devices

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha_bar at timestep(s) t (an int or a tensor of ints), float64 on the CPU."""
        t = torch.as_tensor(t, dtype=torch.long, device="cpu")
        if t.numel() and (t.min() < 0 or t.max() >= self.steps):
            raise ConfigError(f"timesteps must lie in 0..{self.steps - 1}, got {t.tolist()}")
        return self.alphas_cumprod[t]

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; t is an int or one per example."""
        if torch.is_tensor(t) and t.device.type != "cpu":
            # index a copy of the table on t's device: checking the range would sync every training step
            if t.device not in self._tables:
                self._tables[t.device] = self.alphas_cumprod.to(t.device)
            alpha_bar = self._tables[t.device][t]
        else:
            alpha_bar = self.alpha_bar(t)
        return _broadcast(alpha_bar.sqrt(), x0) * x0 + _broadcast((1 - alpha_bar).sqrt(), x0) * noise


def _check_level(level: float) -> None:
    if not 0 < level <= 1:
        raise ConfigError(f"noise level must lie in (0, 1] (a fraction of the schedule), got {level}")


def level_schedule(train_level: float = TRAIN_LEVEL, steps: int = DIFFUSION_STEPS) -> NoiseSchedule:
    """The schedule of the official denoising code: int(steps / train_level) timesteps of the scaled
    linear schedule, built from the *training* level and shared by training and evaluation.

    The models train on its first `steps` timesteps (the EBT at the last of them, the DiT uniformly
    over them); an evaluation level picks a timestep of this same schedule (`level_timestep`).
    """
    _check_level(train_level)
    return NoiseSchedule(int(steps / train_level))


def level_timestep(level: float, schedule: NoiseSchedule) -> int:
    """int(level * T) - 1 on a schedule of T timesteps: where images are noised at `level` and where the
    DiT's DDIM starts. At the training level of `level_schedule` this is steps - 1."""
    _check_level(level)
    t = int(level * schedule.steps) - 1
    if t < 0:
        raise ConfigError(f"noise level {level} is below one timestep of a {schedule.steps}-step schedule")
    return t


def level_alpha_bar(level: float, train_level: float = TRAIN_LEVEL, steps: int = DIFFUSION_STEPS) -> float:
    """alpha_bar of noise level `level` for models trained at `train_level` (docs/method.md 4)."""
    schedule = level_schedule(train_level, steps)
    return schedule.alpha_bar(level_timestep(level, schedule)).item()


def noise_at_level(x0: torch.Tensor, level: float, noise: torch.Tensor | None = None,
                   schedule: NoiseSchedule | None = None) -> tuple[torch.Tensor, float]:
    """Noise x0 at the paper's noise level on `schedule` (default: `level_schedule()`, trained at 0.1).
    Returns (x_noisy, alpha_bar).

    The paper trains at level 0.1 (in distribution) and tests at 0.1 and 0.2 (out of distribution).
    """
    schedule = level_schedule() if schedule is None else schedule
    t = level_timestep(level, schedule)
    noise = torch.randn_like(x0) if noise is None else noise
    return schedule.q_sample(x0, t, noise), schedule.alpha_bar(t).item()


# ----------------------------------------------------------------------------------------------------
# model


@dataclass
class DiTConfig:
    size: str = "4xs"  # a name from ebt.config.SIZES; n_layer/d_model/n_head below override it
    image_size: int = 32  # square images of image_size x image_size pixels
    channels: int = 1
    patch: int = 4  # patches of patch x patch pixels; (image_size / patch)^2 tokens
    n_layer: int | None = None
    d_model: int | None = None
    n_head: int | None = None
    diffusion_steps: int = DIFFUSION_STEPS  # training timesteps 0..diffusion_steps-1 (`level_schedule`)
    noise_level: float = TRAIN_LEVEL  # training level: a schedule of diffusion_steps / noise_level timesteps

    def __post_init__(self):
        self.n_layer, self.d_model, self.n_head = resolve_size(self.size, self.n_layer, self.d_model,
                                                               self.n_head)
        if min(self.n_layer, self.d_model, self.n_head, self.image_size, self.channels, self.patch) < 1:
            raise ConfigError(f"DiT sizes must be positive: {self}")
        if self.image_size % self.patch:
            raise ConfigError(f"image_size={self.image_size} is not a multiple of patch={self.patch}: "
                              f"pick a patch size that divides the image size")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} does not split into n_head={self.n_head} heads: "
                              f"choose n_head dividing d_model")
        if self.d_model % 4:
            # half the width encodes the row, half the column, each as sin/cos pairs
            raise ConfigError(f"d_model={self.d_model} must be a multiple of 4 for 2-D sin-cos positions")
        if self.diffusion_steps < 2:
            raise ConfigError(f"diffusion_steps must be >= 2, got {self.diffusion_steps}")
        _check_level(self.noise_level)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def n_patches(self) -> int:
        return self.grid ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.channels


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim): [sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    ang = pos.double()[:, None] * omega[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed positions of a grid x grid patch map in row-major token order: (grid^2, dim), float32.

    The first half of the width encodes the row, the second half the column.
    """
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pe = torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)
    return pe.float()


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps (may be fractional) -> (B, dim) [cos, sin] features over geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], dim=1)


class TimestepEmbedder(nn.Module):
    """Timestep -> frequency features -> MLP -> the block conditioning c (B, D)."""

    def __init__(self, d_model: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # (1 + scale): a zero modulation output leaves the normalised tokens unchanged
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Bidirectional multi-head self-attention: every patch sees every patch."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.fused = True  # SDPA kernels; the EBT denoiser switches to explicit scores (double backward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v, fused=self.fused)  # no mask
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """adaLN-Zero block: LayerNorm without affine, then shift/scale from c before attention and MLP
    and a gate on each residual branch. The modulation starts at zero, so the gates are zero and the
    block starts as the identity (the paper's best-performing conditioning)."""

    def __init__(self, d_model: int, n_head: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d_model, n_head)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * d_model, d_model))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 6 * d_model))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift/scale, no gate) then a linear map from tokens to patch pixels, zero-initialised."""

    def __init__(self, d_model: int, patch_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 2 * d_model))
        self.linear = nn.Linear(d_model, patch_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


def init_adaln_zero(model: nn.Module) -> None:
    """The DiT initialisation shared by the DiT and the EBT denoiser: Xavier linears, the patch conv as
    a linear, then every adaLN modulation and the output layer at zero (adaLN-Zero: blocks start as
    the identity and the output at zero)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    conv = model.patch_embed.weight
    nn.init.xavier_uniform_(conv.view(conv.shape[0], -1))
    nn.init.zeros_(model.patch_embed.bias)
    for block in model.blocks:
        nn.init.zeros_(block.ada[-1].weight)
        nn.init.zeros_(block.ada[-1].bias)
    for m in (model.final.ada[-1], model.final.linear):
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)


class DiT(nn.Module):
    """Predicts the noise epsilon of x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps from (x_t, t)."""

    def __init__(self, cfg: DiTConfig | None = None):
        super().__init__()
        cfg = DiTConfig() if cfg is None else cfg
        self.cfg = cfg
        self.schedule = level_schedule(cfg.noise_level, cfg.diffusion_steps)
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.d_model, kernel_size=cfg.patch, stride=cfg.patch)
        # fixed, not learned; persistent=False keeps it out of checkpoints (it is recomputed from cfg)
        self.register_buffer("pos_embed", sincos_2d(cfg.d_model, cfg.grid), persistent=False)
        self.t_embed = TimestepEmbedder(cfg.d_model)
        self.blocks = nn.ModuleList(DiTBlock(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer))
        self.final = FinalLayer(cfg.d_model, cfg.patch_dim)
        self._init_weights()

    def _init_weights(self):
        init_adaln_zero(self)
        for m in self.t_embed.mlp:  # as in the DiT reference: N(0, 0.02) for the timestep MLP
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    def _check(self, x: torch.Tensor) -> None:
        channels, size = self.cfg.channels, self.cfg.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (channels, size, size):
            raise ConfigError(f"expected images of shape (batch, {channels}, {size}, {size}), got "
                              f"{tuple(x.shape)}: build the DiT with matching channels and image_size")

    def _timesteps(self, t, x: torch.Tensor) -> torch.Tensor:
        """An int, a scalar tensor or one timestep per example -> (B,) on x's device."""
        t = torch.as_tensor(t, device=x.device)
        return t.expand(x.shape[0]) if t.dim() == 0 else t

    def features(self, x: torch.Tensor, t) -> torch.Tensor:
        """Tokens after the last block, before the final adaLN layer: (B, n_patches, D).

        Mean-pool them over patches for a linear probe.
        """
        self._check(x)
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major like pos_embed
        h = h + self.pos_embed.to(h.dtype)
        c = self.t_embed(self._timesteps(t, x))
        for block in self.blocks:
            h = block(h, c)
        return h

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, patch*patch*C) with each patch's pixels in (row, col, channel) order -> (B, C, H, W)."""
        B, grid, patch, C = patches.shape[0], self.cfg.grid, self.cfg.patch, self.cfg.channels
        patches = patches.reshape(B, grid, grid, patch, patch, C)
        return torch.einsum("bhwpqc->bchpwq", patches).reshape(B, C, grid * patch, grid * patch)

    def forward(self, x_noisy: torch.Tensor, t) -> torch.Tensor:
        """(B, C, H, W) noisy images at timestep(s) t -> predicted noise eps, same shape."""
        h = self.features(x_noisy, t)
        c = self.t_embed(self._timesteps(t, x_noisy))
        return self.unpatchify(self.final(h, c))

    def loss(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """The DDPM "simple" loss: MSE between predicted and true noise, t uniform over the training
        timesteps 0..diffusion_steps-1 (up to the training level; as the official denoising DiT)."""
        self._check(x0)
        B = x0.shape[0]
        t = torch.randint(0, self.cfg.diffusion_steps, (B,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.schedule.q_sample(x0, t, noise)
        eps = self(x_t, t)
        return {"loss": F.mse_loss(eps.float(), noise.float()), "t": t}


# ----------------------------------------------------------------------------------------------------
# DDIM sampling from a noise level


def ddim_timesteps(t_start: int, n_steps: int, schedule: NoiseSchedule) -> list[int]:
    """n_steps distinct timesteps evenly spaced from t_start down to 0 (just [t_start] for one step)."""
    if not 0 <= t_start < schedule.steps:
        raise ConfigError(f"t_start={t_start} must lie in 0..{schedule.steps - 1}")
    if not 1 <= n_steps <= t_start + 1:
        # more steps than timesteps would repeat a timestep: a forward pass that changes nothing
        raise ConfigError(f"n_steps={n_steps} must lie in 1..t_start+1={t_start + 1}")
    if n_steps == 1:
        return [t_start]
    return torch.linspace(t_start, 0, n_steps, dtype=torch.float64).round().long().tolist()


@torch.no_grad()
def ddim_denoise(model: nn.Module, x_t: torch.Tensor, t_start: int, n_steps: int, schedule: NoiseSchedule,
                 eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (Song et al.) from x_t at t_start down to 0 in n_steps model calls; returns the final
    clean estimate x0_hat (not clipped: the pixel range is the caller's).

    Each step predicts eps, forms x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) and moves to the
    next timestep s: x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s). eta=0 is deterministic. The last
    step's x0_hat is the result.
    """
    ts = ddim_timesteps(t_start, n_steps, schedule)
    x = x_t
    for i, t in enumerate(ts):
        ab_t = schedule.alphas_cumprod[t].item()
        eps = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0_hat = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        if i == len(ts) - 1:
            return x0_hat
        ab_s = schedule.alphas_cumprod[ts[i + 1]].item()
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        x = math.sqrt(ab_s) * x0_hat + math.sqrt(max(1 - ab_s - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    raise AssertionError("unreachable: ddim_timesteps returns at least one step")


def count_forward_passes(n_steps: int, applications: int) -> int:
    """Model calls of `recursive`: one per DDIM step, per application."""
    return n_steps * applications


def recursive(model: nn.Module, x_noisy: torch.Tensor, level: float, n_steps: int, applications: int,
              schedule: NoiseSchedule) -> tuple[list[torch.Tensor], int]:
    """The paper's DiT baseline: DDIM started at the level's timestep, re-applied to its own output.

    Every application treats its input as an image noised at `level` (the denoiser does not know
    how much noise is left). `schedule` is the DiT's training schedule: every level is a timestep of
    it, so beyond the training level DDIM starts at timesteps the DiT never trained on (as officially).
    Returns ([output of each application], forward passes).
    """
    if applications < 1:
        raise ConfigError(f"applications must be >= 1, got {applications}")
    t_start = level_timestep(level, schedule)
    outputs, x = [], x_noisy
    for _ in range(applications):
        x = ddim_denoise(model, x, t_start, n_steps, schedule)
        outputs.append(x)
    return outputs, count_forward_passes(n_steps, applications)


__all__ = [
    "DIFFUSION_STEPS", "DiT", "DiTConfig", "NoiseSchedule", "TRAIN_LEVEL", "count_forward_passes",
    "ddim_denoise", "ddim_timesteps", "level_alpha_bar", "level_schedule", "level_timestep",
    "linear_alphas_cumprod", "noise_at_level", "recursive",
]
