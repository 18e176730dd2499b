import math

import pytest
import torch
import torch.nn.functional as F

from ebt.errors import ConfigError
from ebt.models.dit import (
    DiT,
    DiTConfig,
    NoiseSchedule,
    count_forward_passes,
    ddim_denoise,
    ddim_timesteps,
    level_alpha_bar,
    level_schedule,
    level_timestep,
    noise_at_level,
    recursive,
)


def tiny(**kw) -> DiTConfig:
    return DiTConfig(**{"image_size": 8, "channels": 1, "patch": 2, "n_layer": 2, "d_model": 32, "n_head": 2, **kw})


def squares(n: int = 16, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1]: a bright square of random size and place on a dark background."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, size, size)
    for i in range(n):
        side = int(torch.randint(3, size // 2 + 1, (1,), generator=g))
        r, c = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
        x[i, :, r:r + side, c:c + side] = 1.0
    return x


class Oracle(torch.nn.Module):
    """The true epsilon of x_t given the clean image x0 (known in the closure)."""

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule):
        super().__init__()
        self.x0, self.schedule, self.calls = x0, schedule, 0

    def forward(self, x, t):
        self.calls += 1
        ab = self.schedule.alpha_bar(t).to(x.dtype).view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Leave adaLN-Zero's start (which outputs exactly 0) so the sampler sees a non-trivial model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------- schedule


def test_schedule_is_ddpm_linear():
    s = NoiseSchedule()
    betas = 1 - s.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), s.alphas_cumprod[:-1]])
    assert s.steps == 1000 and s.alphas_cumprod.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(2e-2)
    assert torch.allclose(betas.diff(), torch.full((999,), (2e-2 - 1e-4) / 999, dtype=torch.float64))


def test_schedule_scales_its_betas_with_its_length():
    # the official "linear" schedule: betas scaled by 1000 / timesteps, so 10,000 steps run 1e-5 .. 2e-3
    s = NoiseSchedule(10000)
    betas = 1 - s.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), s.alphas_cumprod[:-1]])
    assert betas[0].item() == pytest.approx(1e-5) and betas[-1].item() == pytest.approx(2e-3)
    with pytest.raises(ConfigError, match="betas above 1"):
        NoiseSchedule(10)


def official_alpha_bar(level: float, train_level: float, steps: int) -> float:
    """The official denoising code's noise, written out: a linear schedule of T = int(steps / train_level)
    timesteps with betas scaled by 1000 / T; level `level` is timestep int(level * T) - 1."""
    T = int(steps / train_level)
    scale = 1000 / T
    lo, hi = scale * 1e-4, scale * 0.02
    t = int(level * T) - 1
    return math.prod(1 - (lo + (hi - lo) * i / (T - 1)) for i in range(t + 1))


@pytest.mark.parametrize("steps", [1000, 100])  # the official default and its denoising job scripts
def test_levels_follow_the_official_schedule(steps):
    for level in (0.1, 0.2):
        want = official_alpha_bar(level, 0.1, steps)
        assert level_alpha_bar(level, 0.1, steps) == pytest.approx(want, rel=1e-10)
    # in distribution noise std 0.32, out of distribution 0.58 (not 0.82 / 0.94 as the stretched schedule had)
    assert level_alpha_bar(0.1, 0.1, steps) == pytest.approx(0.896, abs=2e-3)
    assert level_alpha_bar(0.2, 0.1, steps) == pytest.approx(0.658, abs=2e-3)


def test_level_alpha_bar_defaults():
    assert level_alpha_bar(0.1) == pytest.approx(0.896356, abs=1e-6)  # train at 0.1, 1000 diffusion steps
    assert level_alpha_bar(0.2) == pytest.approx(0.658430, abs=1e-6)
    x0, noise = torch.ones(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    xn, ab = noise_at_level(x0, 0.2, noise)
    assert ab == level_alpha_bar(0.2)
    assert torch.allclose(xn, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise, atol=1e-6)
    # smaller levels noise less
    assert (noise_at_level(x0, 0.1, noise)[0] - x0).norm() < (xn - x0).norm()


def test_level_timesteps_on_the_training_schedule():
    s = level_schedule()  # trained at 0.1 over 1000 diffusion steps: 10,000 timesteps
    assert s.steps == 10000
    assert [level_timestep(lv, s) for lv in (0.1, 0.2, 1.0)] == [999, 1999, 9999]  # 0.1: the training step
    levels = torch.linspace(0.01, 1.0, 60).tolist()
    ts = [level_timestep(lv, s) for lv in levels]
    assert all(a <= b for a, b in zip(ts, ts[1:]))
    assert level_schedule(1.0).steps == 1000 and level_timestep(1.0, level_schedule(1.0)) == 999
    with pytest.raises(ConfigError, match="below one timestep"):
        level_timestep(1e-5, s)


@pytest.mark.parametrize("level", [0.0, -0.1, 1.5])
def test_bad_levels_raise(level):
    with pytest.raises(ConfigError, match="noise level"):
        level_alpha_bar(level)


@pytest.mark.parametrize("t", [10, 300, 999])
@pytest.mark.parametrize("value", [0.0, 0.7])
def test_q_sample_statistics(t, value):
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(t)
    x0 = torch.full((64, 1, 32, 32), value, dtype=torch.float64)
    xt = s.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    ab = s.alphas_cumprod[t].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * value, abs=0.01)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.02)


def test_q_sample_per_example_timesteps():
    s = NoiseSchedule()
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0, 500, 999])
    xt = s.q_sample(x0, t, noise)
    for i in range(3):
        assert torch.allclose(xt[i:i + 1], s.q_sample(x0[i:i + 1], int(t[i]), noise[i:i + 1]))
    with pytest.raises(ConfigError, match="timesteps"):
        s.q_sample(x0, 1000, noise)


# ---------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("channels,patch", [(1, 2), (1, 4), (3, 2), (3, 4)])
def test_shapes(channels, patch):
    cfg = tiny(image_size=16, channels=channels, patch=patch)
    m = DiT(cfg)
    x = torch.randn(2, channels, 16, 16)
    assert m(x, torch.tensor([3, 700])).shape == x.shape
    assert m(x, 5).shape == x.shape  # one timestep for the whole batch
    assert m.features(x, 5).shape == (2, (16 // patch) ** 2, 32)
    out = m.loss(x)
    assert out["loss"].dim() == 0 and out["t"].shape == (2,)


def test_dit_trains_up_to_the_training_level():
    # the official denoising DiT: the training level's schedule, timesteps 0..diffusion_steps-1 only
    m = DiT(tiny(noise_level=0.2, diffusion_steps=100))
    assert m.schedule.steps == 500
    assert torch.equal(m.schedule.alphas_cumprod, level_schedule(0.2, 100).alphas_cumprod)
    t = m.loss(torch.randn(512, 1, 8, 8), generator=torch.Generator().manual_seed(0))["t"]
    assert t.min() >= 0 and t.max() == 99
    with pytest.raises(ConfigError, match="noise level"):
        DiTConfig(noise_level=0.0)


def test_size_registry_and_overrides():
    cfg = DiTConfig()
    assert (cfg.n_layer, cfg.d_model, cfg.n_head) == (2, 128, 2) and cfg.n_patches == 64
    m = DiT(cfg)
    assert len(m.blocks) == 2 and m.blocks[0].mlp[0].out_features == 4 * 128
    assert sum(p.numel() for p in m.parameters()) == 680_336
    cfg = DiTConfig(size="3xs", n_layer=1)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head) == (1, 256, 4)


def test_adaln_zero_start_is_identity_blocks_and_zero_output():
    m = DiT(tiny(channels=3))
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 900])
    h = m.patch_embed(x).flatten(2).transpose(1, 2) + m.pos_embed
    c = m.t_embed(t)
    for block in m.blocks:
        assert torch.equal(block(h, c), h)
    assert torch.equal(m(x, t), torch.zeros_like(x))
    # the zero start still trains: the output layer gets a gradient
    m.loss(x)["loss"].backward()
    assert m.final.linear.weight.grad.abs().sum() > 0


def test_positions_are_fixed_sincos():
    m = DiT(tiny(d_model=16))
    names = {n for n, _ in m.named_parameters()}
    assert not any("pos" in n for n in names) and "pos_embed" in dict(m.named_buffers())
    assert not m.pos_embed.requires_grad and m.pos_embed.shape == (16, 16)
    grid = 4
    for idx in (0, 5, 15):
        r, c = divmod(idx, grid)  # row-major token order
        w = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
        want = torch.cat([(r * w).sin(), (r * w).cos(), (c * w).sin(), (c * w).cos()]).float()
        assert torch.allclose(m.pos_embed[idx], want, atol=1e-6)
    before = m.pos_embed.clone()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m.loss(torch.randn(2, 1, 8, 8))["loss"].backward()
    opt.step()
    assert torch.equal(m.pos_embed, before)


def test_unpatchify_puts_each_patch_back_in_place():
    m = DiT(tiny(image_size=8, channels=3, patch=2))
    x = torch.randn(2, 3, 8, 8)
    # patches in row-major order, each flattened as (row, col, channel)
    p = torch.stack([x[:, :, r:r + 2, c:c + 2].permute(0, 2, 3, 1).flatten(1)
                     for r in range(0, 8, 2) for c in range(0, 8, 2)], dim=1)
    assert torch.equal(m.unpatchify(p), x)


@pytest.mark.parametrize("kw,match", [
    (dict(image_size=30, patch=4), "multiple of patch"),
    (dict(d_model=30, n_head=4), "n_head"),
    (dict(d_model=6, n_head=3), "multiple of 4"),
    (dict(size="huge"), "unknown size"),
    (dict(n_layer=0), "positive"),
])
def test_bad_configs_raise(kw, match):
    with pytest.raises(ConfigError, match=match):
        DiTConfig(**kw)


def test_wrong_input_shape_raises():
    m = DiT(tiny())
    with pytest.raises(ConfigError, match="expected images"):
        m(torch.randn(2, 3, 8, 8), 0)
    with pytest.raises(ConfigError, match="expected images"):
        m.loss(torch.randn(2, 1, 16, 16))


def test_training_on_squares_lowers_the_loss():
    torch.manual_seed(0)
    m = DiT(tiny(image_size=16, patch=4, d_model=64, n_head=4))
    x0 = squares(16, 16)
    g = torch.Generator().manual_seed(1)
    t_eval = torch.randint(0, 1000, (64,), generator=g)
    noise_eval = torch.randn(64, 1, 16, 16, generator=g)
    x_eval = m.schedule.q_sample(x0.repeat(4, 1, 1, 1), t_eval, noise_eval)

    def eval_loss():
        with torch.no_grad():
            return F.mse_loss(m(x_eval, t_eval), noise_eval).item()

    before = eval_loss()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(2)
    for _ in range(150):
        loss = m.loss(x0, generator=gen)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = eval_loss()
    assert before == pytest.approx(1.0, abs=0.1)  # zero output: the loss is E[eps^2]
    assert after < 0.5 * before, (before, after)


# ---------------------------------------------------------------------------------------------- DDIM


def test_ddim_timesteps():
    s = NoiseSchedule()
    assert ddim_timesteps(999, 1, s) == [999]
    assert ddim_timesteps(999, 4, s) == [999, 666, 333, 0]
    ts = ddim_timesteps(326, 100, s)
    assert len(set(ts)) == 100 and ts[0] == 326 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert ddim_timesteps(5, 6, s) == [5, 4, 3, 2, 1, 0]
    for bad in [(5, 7), (5, 0), (1000, 1), (-1, 1)]:
        with pytest.raises(ConfigError):
            ddim_timesteps(*bad, s)


def test_ddim_eta0_is_deterministic():
    s = NoiseSchedule()
    m = DiT(tiny()).eval()
    randomise(m)
    x = torch.randn(2, 1, 8, 8)
    a = ddim_denoise(m, x, 400, 5, s)
    b = ddim_denoise(m, x, 400, 5, s)
    assert torch.equal(a, b) and not torch.equal(a, x)
    # eta > 0 draws noise: reproducible with a seeded generator, different from eta 0
    c = ddim_denoise(m, x, 400, 5, s, eta=1.0, generator=torch.Generator().manual_seed(0))
    d = ddim_denoise(m, x, 400, 5, s, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(c, d) and not torch.allclose(a, c)


@pytest.mark.parametrize("t_start,n_steps", [(0, 1), (10, 3), (326, 1), (326, 50), (999, 1), (999, 20)])
def test_ddim_with_oracle_epsilon_recovers_x0(t_start, n_steps):
    s = NoiseSchedule()
    x0 = squares(4, 8).double()  # float32 loses ~5e-5 dividing by sqrt(alpha_bar_999) = 0.006
    xt = s.q_sample(x0, t_start, torch.randn(x0.shape, generator=torch.Generator().manual_seed(t_start)))
    oracle = Oracle(x0, s)
    out = ddim_denoise(oracle, xt, t_start, n_steps, s)
    assert oracle.calls == n_steps
    assert (out - x0).abs().max().item() < 1e-4


def test_recursive_applications_and_passes():
    s = level_schedule()
    x0 = squares(3, 8)
    xn, _ = noise_at_level(x0, 0.1, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), s)
    oracle = Oracle(x0, s)
    outs, passes = recursive(oracle, xn, 0.1, 7, 3, s)
    assert len(outs) == 3 and passes == 21 == count_forward_passes(7, 3) == oracle.calls
    # the oracle's epsilon is exact for whatever timestep it is told, so every application returns x0
    for out in outs:
        assert (out - x0).abs().max().item() < 1e-4
    # with a real DiT: each application starts from the previous one's output
    m = DiT(tiny()).eval()
    randomise(m)
    outs, passes = recursive(m, xn, 0.2, 4, 2, s)
    assert passes == 8
    assert torch.equal(outs[1], ddim_denoise(m, outs[0], level_timestep(0.2, s), 4, s))
    with pytest.raises(ConfigError, match="applications"):
        recursive(m, xn, 0.2, 4, 0, s)
