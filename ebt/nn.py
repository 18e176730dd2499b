"""The Llama-2 style backbone shared by every model (ebt-method.md 2.1).

Pre-norm blocks h = h + Attn(RMSNorm(h)); h = h + FFN(RMSNorm(h)), RMSNorm and softmax in at least
float32, RoPE on adjacent pairs, SwiGLU with hidden width D, no biases anywhere. The EBT and the
Transformer++ use this exact code; only what goes in (embeddings) and comes out (heads) differ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ebt.config import ModelConfig


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Norms, RoPE and softmax run in float32 for half types and in float64 for float64 runs
    # (the reference tensors are float64 end to end).
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(compute_dtype(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class Rope:
    """cos/sin tables for rotary embeddings up to max_len positions, built in float64 once per
    (device, dtype) and then only indexed (no host synchronisation in the forward pass).

    Not a buffer: `model.to(bfloat16)` must not round the tables.
    """

    def __init__(self, head_dim: int, theta: float, max_len: int):
        self.head_dim, self.theta, self.max_len, self._cache = head_dim, theta, max_len, {}

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (positions.device, dtype)
        if key not in self._cache:
            freqs = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
            ang = torch.outer(torch.arange(self.max_len, dtype=torch.float64), freqs)
            self._cache[key] = (ang.cos().to(positions.device, dtype), ang.sin().to(positions.device, dtype))
        cos, sin = self._cache[key]
        return cos[positions], sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2j, 2j+1) of each head, i.e. complex multiplication by e^{i pos f_j}.

    x: (B, H, T, hd); cos/sin: (T, hd/2) or (B, 1, T, hd/2).
    """
    xf = x.to(cos.dtype).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def attend(q, k, v, mask: torch.Tensor | None = None, causal: bool = False, fused: bool = True) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, T, hd) tensors.

    fused=True uses PyTorch's SDPA kernels (fast, first-order gradients only on GPU);
    fused=False writes the scores out (softmax in float32), which supports double backward.
    mask: boolean, True where attention is allowed, broadcastable to (B, H, Tq, Tk).
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal and mask is None:
        tq, tk = q.shape[-2], k.shape[-2]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.to(compute_dtype(scores.dtype)), dim=-1).type_as(q) @ v


def two_stream_attend(q, k, v, n_ctx: int, prefix: int, fused: bool = False) -> torch.Tensor:
    """The EBT's two-stream attention (ebt-method.md 2.2) without the official (C+S)^2 score matrix.

    q, k, v: (B, H, C + S, hd), the context stream first (C = prefix + S tokens: `prefix` step tokens
    then x_0..x_{S-1}) and the S candidates after it. Context tokens attend causally among themselves
    and never to a candidate; candidate i attends to context tokens 0..prefix+i and to itself only
    (never to x_{i+1}, its target, nor to another candidate). The candidate softmax runs over the
    allowed context scores plus the one self score.
    """
    qc, kc, vc = q[:, :, :n_ctx], k[:, :, :n_ctx], v[:, :, :n_ctx]
    qy, ky, vy = q[:, :, n_ctx:], k[:, :, n_ctx:], v[:, :, n_ctx:]
    yc = attend(qc, kc, vc, causal=True, fused=fused)
    scale = 1.0 / math.sqrt(q.shape[-1])
    s_ctx = (qy @ kc.transpose(-2, -1)) * scale  # (B, H, S, C)
    allowed = torch.ones(qy.shape[-2], n_ctx, dtype=torch.bool, device=q.device).tril(prefix)
    s_ctx = s_ctx.masked_fill(~allowed, float("-inf"))
    s_self = (qy * ky).sum(-1, keepdim=True) * scale  # (B, H, S, 1)
    probs = torch.softmax(torch.cat([s_ctx, s_self], -1).to(compute_dtype(q.dtype)), dim=-1).type_as(q)
    yy = probs[..., :n_ctx] @ vc + probs[..., n_ctx:] * vy
    return torch.cat([yc, yy], dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, mask=None, causal=True, fused=True, two_stream=None):
        """two_stream=(n_ctx, prefix) switches to the EBT's context + candidate attention."""
        heads = lambda t: t.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)  # noqa: E731
        q = apply_rope(heads(self.wq(x)), cos, sin)
        k = apply_rope(heads(self.wk(x)), cos, sin)
        v = heads(self.wv(x))
        if two_stream is not None:
            y = two_stream_attend(q, k, v, *two_stream, fused=fused)
        else:
            y = attend(q, k, v, mask=mask, causal=causal, fused=fused)
        return self.wo(y.transpose(1, 2).flatten(-2))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.d_model)  # hidden = D: the official models use no 8/3 factor

    def forward(self, x, cos, sin, **attn_kw):
        x = x + self.attn(self.attn_norm(x), cos, sin, **attn_kw)
        return x + self.ffn(self.ffn_norm(x))


class Backbone(nn.Module):
    """Blocks + final norm over a sequence of embeddings at given RoPE positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # +2: the EBT's candidates sit one position right of their context token, after a step token
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, cfg.context_length + 2)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, h, positions, **attn_kw):
        """attn_kw: mask / causal / fused / two_stream, as Attention.forward takes them."""
        cos, sin = self.rope.tables(positions, compute_dtype(h.dtype))
        for block in self.blocks:
            h = block(h, cos, sin, **attn_kw)
        return self.norm(h)


def init_weights(module: nn.Module) -> None:
    """The official initialisation: Xavier-normal Linear weights, N(0, 1) embeddings, unit norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 1.0)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
