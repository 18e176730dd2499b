"""Bidirectional EBT for images (docs/method.md section 4) and the DiT denoiser wrapped for the trainer.

The EBT denoiser is the DiT's transformer (patchify, fixed 2-D sin-cos positions, adaLN-Zero blocks,
bidirectional attention) conditioned on one learned embedding instead of a timestep, with one scalar
per patch: E(image) = the mean over patches. Its energy head and every modulation start at zero.
Predicting starts from the noisy image and steps x <- x - alpha * dE/dx in pixel space, through the
same thinking loop (ebt.think) as the text and video EBTs; the loss is Smooth L1 to the clean image.
"""

from __future__ import annotations

import torch
from torch import nn

from ebt.config import ModelConfig
from ebt.errors import ConfigError
from ebt import objective
from ebt.models.dit import DiT, DiTBlock, DiTConfig, FinalLayer, init_adaln_zero, level_schedule, sincos_2d
from ebt.recipe import alpha_param_groups, recipe_alpha


def dit_config(cfg: ModelConfig) -> DiTConfig:
    return DiTConfig(size=cfg.size, image_size=cfg.image_size, channels=cfg.channels, patch=cfg.patch,
                     n_layer=cfg.n_layer, d_model=cfg.d_model, n_head=cfg.n_head, noise_level=cfg.noise_level)


class EBTDenoiser(nn.Module):
    nonfinite_hint = ("the image EBT diverges when alpha is too large for its energy gradients: lower "
                      "--alpha or --alpha-lr-mult, or --lr")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, e = cfg, cfg.ebt
        dc = dit_config(cfg)
        self.dcfg = dc
        self.schedule = level_schedule(dc.noise_level, dc.diffusion_steps)  # the DiT's: the same noise
        self.patch_embed = nn.Conv2d(dc.channels, dc.d_model, kernel_size=dc.patch, stride=dc.patch)
        self.register_buffer("pos_embed", sincos_2d(dc.d_model, dc.grid), persistent=False)
        self.cond = nn.Embedding(1, dc.d_model)  # the single learned conditioning of every block
        self.blocks = nn.ModuleList(DiTBlock(dc.d_model, dc.n_head) for _ in range(dc.n_layer))
        self.final = FinalLayer(dc.d_model, 1)  # one energy scalar per patch
        for block in self.blocks:
            block.attn.fused = False  # the second-order graph needs attention with double backward
        self._init_weights()
        self.alpha = nn.Parameter(torch.tensor(float(e.alpha)), requires_grad=e.alpha_learnable)

    def _init_weights(self):
        init_adaln_zero(self)  # the energy head (final.linear) and every modulation start at zero
        nn.init.normal_(self.cond.weight, std=0.02)

    def extra_param_groups(self) -> list[dict]:
        return alpha_param_groups(self.alpha, self.cfg.ebt)

    def check(self, x: torch.Tensor) -> None:
        c, s = self.dcfg.channels, self.dcfg.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ConfigError(f"expected images of shape (batch, {c}, {s}, {s}), got {tuple(x.shape)}: a "
                              f"{'grayscale' if c == 1 else f'{c}-channel'} {s}x{s} model needs matching "
                              f"data")

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-block tokens (B, n_patches, D) of an image (also what the linear probe pools)."""
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.cond.weight.expand(x.shape[0], -1)
        for block in self.blocks:
            h = block(h, c)
        return h

    # the hooks of ebt.think: no context (the image is the candidate), one "position" per image
    def context(self, inputs, landscape: int, first_order: bool = False):
        return None

    def landscape_key(self, k: int) -> int:
        return 0

    def candidate_input(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def energy_from(self, ctx, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x)
        per_patch = self.final(h, self.cond.weight.expand(x.shape[0], -1)).squeeze(-1)  # (B, n_patches)
        return per_patch.mean(1, keepdim=True)  # (B, 1)

    def step_alpha(self, shape, stochastic: bool) -> torch.Tensor:
        return recipe_alpha(self.alpha, self.cfg.ebt, (shape[0], 1, 1, 1), stochastic)  # per image

    def init_candidate(self, noisy: torch.Tensor) -> torch.Tensor:
        return noisy.clone()  # prediction starts from the noisy image itself

    def forward(self, clean: torch.Tensor, n_steps=None, plan=None) -> dict:
        """clean images (B, C, H, W) in [-1, 1] -> the training objective (ebt.objective.image_forward):
        noised at the training level, denoised by the unroll, Smooth L1 to the clean image."""
        return objective.image_forward(self, clean, n_steps, plan)


class DiTDenoiser(nn.Module):
    """The DiT baseline behind the trainer's interface: forward(clean images) -> the DDPM loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.net = DiT(dit_config(cfg))

    def forward(self, clean: torch.Tensor) -> dict:
        out = self.net.loss(clean)
        n = clean.shape[0]
        return {"loss": out["loss"], "nll_sum": out["loss"].detach() * n,
                "n_tokens": torch.as_tensor(n, device=clean.device)}

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x, 0)  # the DiT's representation of a clean image (t = 0)
