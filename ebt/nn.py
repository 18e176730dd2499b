"""The Llama-2 style backbone shared by every model (ebt-method.md 2.1).

Pre-norm blocks h = h + Attn(RMSNorm(h)); h = h + FFN(RMSNorm(h)), RMSNorm and softmax in at least
float32, RoPE on adjacent pairs, SwiGLU with hidden width D, no biases anywhere. The EBT and the
Transformer++ use this exact code; only what goes in (embeddings) and comes out (heads) differ.
The block is one function of its weights (`block`): the modules run it, and so does the EBT's
written-out energy gradient, whose hand-written backward reads the tensors it saves.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad as fwAD

from ebt.config import ModelConfig


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Norms, RoPE and softmax run in float32 for half types and in float64 for float64 runs
    # (the reference tensors are float64 end to end).
    return torch.promote_types(dtype, torch.float32)


# Vocabulary-sized operands are padded to a multiple of this on these devices: with an odd V (50277 for
# GPT-NeoX) bf16 rows are not 16-byte aligned and cuBLAS falls back to slow kernels (measured in
# benchmarks/RESULTS.md, benchmarks/vocab_matmul.py). The padding is zeros: results are the unpadded ones.
VOCAB_ALIGN = 64
PAD_VOCAB_DEVICES = frozenset({"cuda"})  # also where the written-out gradient pads the context's keys


def pads_vocab(device: torch.device, pad: bool | None = None) -> bool:
    """Whether V-sized products are padded: `pad`, or where it is None the device's default (a plan's
    pad_vocab=True lays CPU tensors out as CUDA does, to test that layout)."""
    return device.type in PAD_VOCAB_DEVICES if pad is None else bool(pad)


def _vocab_pad(x: torch.Tensor, dim: int, pad: bool | None) -> tuple[int, torch.dtype]:
    if not pads_vocab(x.device, pad) or x.shape[dim] % VOCAB_ALIGN == 0:
        return 0, x.dtype
    cast = torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float64)
    return (-x.shape[dim]) % VOCAB_ALIGN, torch.get_autocast_dtype(x.device.type) if cast else x.dtype


def vocab_in(p: torch.Tensor, weight: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
    """p (.., V) @ weight (D, V)^T: the EBT's candidate map, V contracted (padded with zeros)."""
    width, dt = _vocab_pad(p, -1, pad)
    if not width:
        return F.linear(p, weight)
    return F.linear(F.pad(p.to(dt), (0, width)), F.pad(weight.to(dt), (0, width)))


def vocab_out(h: torch.Tensor, weight: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
    """h (.., D) @ weight (V, D)^T: a vocabulary head, V produced (extra rows computed, then dropped)."""
    width, _ = _vocab_pad(weight, 0, pad)
    if not width or torch.compiler.is_compiling():  # inductor pads strides itself; a slice would cost copies
        return F.linear(h, weight)
    return F.linear(h, F.pad(weight, (0, 0, 0, width)))[..., : weight.shape[0]]


def vocab_t(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None, alpha: float = 1.0,
            pad: bool | None = None) -> torch.Tensor:
    """a (.., D)^T @ b (.., V) summed over all positions: (D, V), a V-sized map's weight gradient (V
    padded with zeros on the padding devices, as in vocab_in). acc: add alpha times the product into
    this (D, V) tensor instead of returning a new one (in place inside the matrix product where it can)."""
    a, b = a.flatten(0, -2), b.flatten(0, -2)
    width, _ = _vocab_pad(b, -1, pad)
    if torch.is_autocast_enabled(b.device.type):  # the product's dtype under autocast, never an upcast
        low = torch.get_autocast_dtype(b.device.type)
        a, b = a.to(low), b.to(low)
    else:
        b = b.to(a.dtype)
    if not width:
        if acc is not None and acc.dtype == a.dtype:
            return acc.addmm_(a.t(), b, alpha=alpha)
        out = a.t() @ b
    else:
        out = (a.t() @ F.pad(b, (0, width)))[:, : b.shape[-1]]
    return out if acc is None else acc.add_(out, alpha=alpha)


def vocab_layout(x: torch.Tensor, pad: bool | None = None) -> tuple[torch.dtype, int]:
    """(dtype, pad width): how the candidate map's matrix products read a (.., V) tensor. The autocast
    dtype for float32 tensors (else x's own), and V padded to an aligned width where `pads_vocab`. A
    tensor laid out so once (`to_layout`) enters every product without further casts or copies."""
    width = (-x.shape[-1]) % VOCAB_ALIGN if pads_vocab(x.device, pad) else 0
    low = torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32
    return (torch.get_autocast_dtype(x.device.type) if low else x.dtype), width


def to_layout(x: torch.Tensor, dtype: torch.dtype, pad: int) -> torch.Tensor:
    """x (.., V) -> (.., V + pad) in dtype, zeros in the padding (products are those of the unpadded x)."""
    return F.pad(x.to(dtype), (0, pad)) if pad else x.to(dtype)


_COMPILED: dict = {}
COMPILE_CALLS: dict = {}  # function name -> calls through `compiled` (what tests read to see a path taken)


def compiled(fn):
    """torch.compile(fn, fullgraph=True), built once per function (each compiles once per shape, grad
    mode and dtype; a second shape, e.g. System 2's batch with replayed rows, goes dynamic)."""
    COMPILE_CALLS[fn.__name__] = COMPILE_CALLS.get(fn.__name__, 0) + 1
    if fn not in _COMPILED:
        # a process that builds several models (a benchmark, a test session) needs more entries than
        # dynamo's default of 8 per function
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6
        setattr(cfg, name, max(getattr(cfg, name), 64))
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, tuple]:
    """RMSNorm: x / rms(x) * weight, and what its written-out backward reads: (x / rms(x), 1 / rms(x))
    in the compute dtype."""
    xf = x.to(compute_dtype(x.dtype))
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * r
    return n.type_as(x) * weight, (n, r)


class RopeTables(NamedTuple):
    """The rotations for some positions, (T, hd/2): unit complex numbers for eager code, or cos and sin
    under torch.compile (which fuses the real form); only the form in use is gathered."""
    cis: torch.Tensor | None
    cos: torch.Tensor | None
    sin: torch.Tensor | None


class Rope:
    """Rotary-embedding tables up to max_len positions, built in float64 once per (device, dtype) and
    then only indexed (no host synchronisation in the forward pass).

    Not a buffer: `model.to(bfloat16)` must not round the tables.
    """

    def __init__(self, head_dim: int, theta: float, max_len: int):
        self.head_dim, self.theta, self.max_len, self._cache = head_dim, theta, max_len, {}

    def tables(self, positions: torch.Tensor, dtype: torch.dtype, real: bool | None = None) -> RopeTables:
        """real: the cos/sin form (default: under torch.compile), else the complex one."""
        key = (positions.device, dtype)
        if key not in self._cache:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
            ang = torch.outer(torch.arange(self.max_len, dtype=torch.float64), 1.0 / self.theta ** exponents)
            cdtype = {torch.float32: torch.complex64, torch.float64: torch.complex128}[dtype]
            dev = positions.device
            self._cache[key] = RopeTables(torch.polar(torch.ones_like(ang), ang).to(dev, cdtype),
                                          ang.cos().to(dev, dtype), ang.sin().to(dev, dtype))
        cis, cos, sin = self._cache[key]
        if real or real is None and torch.compiler.is_compiling():
            return RopeTables(None, cos[positions], sin[positions])
        return RopeTables(cis[positions], None, None)


def apply_rope(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """Rotate adjacent pairs (2j, 2j+1) of each head, i.e. complex multiplication by e^{i pos f_j}.

    x: (B, H, T, hd); tables for (T,) positions. Eager code multiplies complex numbers (a third of the
    kernels of the real form, which matters where an EBT step is launch-bound); under torch.compile the
    real form is used, which the compiler fuses.
    """
    if rope.cis is not None:
        xf = x.to(rope.cis.real.dtype).unflatten(-1, (-1, 2))
        return torch.view_as_real(torch.view_as_complex(xf) * rope.cis).flatten(-2).type_as(x)
    xf = x.to(rope.cos.dtype).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * rope.cos - x1 * rope.sin, x0 * rope.sin + x1 * rope.cos), dim=-1)
    return out.flatten(-2).type_as(x)


def causal_mask(tq: int, tk: int, device) -> torch.Tensor:
    """Bottom-right aligned: query i (the i-th of the last tq positions) sees keys 0..tk-tq+i."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)


def _f64_cpu_compiling(q: torch.Tensor) -> bool:
    """torch 2.11 and 2.12's inductor (at least) emit a CPU flash-attention backward that fails in float64
    (pytorch#185539: "expected scalar type Double but found Float"; fixed by 2.13). Float64 on CPU is a
    checking mode, so attend writes the scores out there when compiled, which every version compiles;
    eager float64 keeps the fused kernel."""
    return q.dtype == torch.float64 and q.device.type == "cpu" and torch.compiler.is_compiling()


def attend(q, k, v, mask: torch.Tensor | None = None, causal: bool = False, fused: bool = True
           ) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, T, hd) tensors.

    fused=True uses PyTorch's SDPA kernels (fast; no double backward on GPU);
    fused=False writes the scores out (softmax in float32), which supports double backward.
    mask: boolean, True where attention is allowed, broadcastable to (B, H, Tq, Tk).
    causal with fewer queries than keys (decoding against a cache) aligns the mask bottom-right.
    """
    tq, tk = q.shape[-2], k.shape[-2]
    if causal and mask is None and tq != tk:
        mask = None if tq == 1 else causal_mask(tq, tk, q.device)
        causal = False
    if fused and not _f64_cpu_compiling(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal and mask is None:
        mask = causal_mask(tq, tk, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.to(compute_dtype(scores.dtype)), dim=-1).type_as(q) @ v


def candidate_frame(ctx: tuple, S: int, device) -> tuple["KVCache", torch.Tensor, torch.Tensor]:
    """Unpack an EBT context for S candidates: ctx is (cache, prefix) from EBT.context, or (cache,
    prefix, offset[, allowed]) in generation, where static-shape decoding gives the offset as a tensor
    and the (S, C) mask of written context positions. Returns the cache, the candidates' RoPE positions
    (candidate i sits at the position of the token it predicts, after the step token) and the (S, C)
    mask of the context each candidate sees (the step tokens and x_0..x_{offset+i})."""
    cache, prefix, offset, allowed = (*ctx, *(0, None)[len(ctx) - 2:])
    positions = torch.arange(S, device=device) + prefix + 1 + offset
    if allowed is None:
        allowed = torch.ones(S, cache.k[0].shape[-2], dtype=torch.bool, device=device).tril(prefix + offset)
    return cache, positions, allowed


def candidate_probs(qy, ky, kc, allowed) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate stream's attention weights in the compute dtype: (context weights (B, H, S, C), self
    weight (B, H, S, 1)), one softmax over the allowed context scores and the candidate's score with itself.

    Eager code takes PyTorch's softmax over the two concatenated (one kernel). Under torch.compile it is
    written out over the two parts, which the compiler fuses, and the context part keeps the keys' width
    C, aligned for tensor-core products (a (C + 1)-wide row is not); so under forward-mode AD too, whose
    softmax tangent rule updates its output in place and so breaks a backward through the tangent."""
    scale = 1.0 / math.sqrt(qy.shape[-1])
    cd = compute_dtype(qy.dtype)
    s_ctx = ((qy @ kc.transpose(-2, -1)) * scale).masked_fill(~allowed, float("-inf")).to(cd)
    s_self = ((qy * ky).sum(-1, keepdim=True) * scale).to(cd)
    eager = not torch.compiler.is_compiling()
    if eager and fwAD.unpack_dual(s_ctx).tangent is None and fwAD.unpack_dual(s_self).tangent is None:
        probs = torch.softmax(torch.cat([s_ctx, s_self], -1), dim=-1)
        return probs[..., :-1], probs[..., -1:]
    m = torch.maximum(s_ctx.amax(-1, keepdim=True), s_self).detach()  # any m gives the same weights
    e_ctx, e_self = (s_ctx - m).exp(), (s_self - m).exp()
    total = e_ctx.sum(-1, keepdim=True) + e_self
    return e_ctx / total, e_self / total


def candidate_attention(qy, ky, vy, kc, vc, allowed) -> tuple[torch.Tensor, tuple]:
    """The EBT's candidate stream (ebt-method.md 2.2), against the context stream's keys and values.

    qy, ky, vy: (B, H, S, hd) for the candidates; kc, vc: (B, H, C, hd) for the context (the step
    tokens, then x_0, x_1, ...); allowed: the (S, C) mask from `candidate_frame`. Candidate i attends to
    the context it is allowed and to itself only: never to x_{i+1} (its target) nor to another
    candidate. Explicit scores, so double backward works; no (C+S)^2 matrix as in the official code.
    Returns the output and the weights (candidate_probs), which the written-out backward reads."""
    pc, ps = candidate_probs(qy, ky, kc, allowed)
    return pc.type_as(qy) @ vc + ps.type_as(qy) * vy, (pc, ps)


class KVCache:
    """Keys and values of a causal stream, per layer.

    static (max_len given): preallocated (B, H, max_len, hd) buffers filled in place, left to right,
    as in gpt-fast (generation). Otherwise each layer's tensors are kept as computed, inside the
    autograd graph (an EBT's context stream during training)."""

    def __init__(self, n_layer: int, max_len: int | None = None, batch: int = 0, n_head: int = 0,
                 head_dim: int = 0, device=None, dtype=None):
        self.static = max_len is not None
        if self.static:
            shape = (batch, n_head, max_len, head_dim)
            self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
            self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        else:
            self.k, self.v = [None] * n_layer, [None] * n_layer

    def write(self, layer: int, k, v, pos: int):
        """Store k, v for positions pos..pos+T-1; return all keys and values up to pos+T."""
        if not self.static:
            if pos:
                k = torch.cat([self.k[layer][:, :, :pos], k], 2)
                v = torch.cat([self.v[layer][:, :, :pos], v], 2)
            self.k[layer], self.v[layer] = k, v
            return k, v
        if torch.is_tensor(pos):  # static-shape decoding (CUDA graphs): write at a position tensor and
            # return the whole buffer; the caller masks what is not written yet
            self.k[layer].index_copy_(2, pos, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, pos, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        end = pos + k.shape[2]
        self.k[layer][:, :, pos:end] = k
        self.v[layer][:, :, pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def view(self, length: int) -> "KVCache":
        """The first `length` positions, as a non-static cache (for attending, not for writing)."""
        out = KVCache(len(self.k))
        out.k = [t[:, :, :length] for t in self.k]
        out.v = [t[:, :, :length] for t in self.v]
        return out

    def with_tensors(self, fn) -> "KVCache":
        """A non-static cache holding fn(t) for each layer's keys and values."""
        out = KVCache(len(self.k))
        out.k, out.v = [fn(t) for t in self.k], [fn(t) for t in self.v]
        return out

    def select_rows(self, index: torch.Tensor) -> "KVCache":
        """A cache for a subset/reordering of the batch rows (e.g. candidates sharing one prefix)."""
        out = KVCache(len(self.k))
        out.static = False
        out.k = [t.index_select(0, index) if t is not None else None for t in self.k]
        out.v = [t.index_select(0, index) if t is not None else None for t in self.v]
        return out


class BlockWeights(NamedTuple):
    """One block's weights as plain tensors, what `block` reads. qkv holds the query, key and value maps
    and w13 the feed-forward's two input maps: one matrix each (the modules' parameters), or `stacked`
    into one (one matrix product instead of three and two: small batches are bound by kernel launches)."""
    attn_norm: torch.Tensor
    qkv: tuple[torch.Tensor, ...]
    wo: torch.Tensor
    ffn_norm: torch.Tensor
    w13: tuple[torch.Tensor, ...]
    w2: torch.Tensor


def stacked(w: BlockWeights) -> BlockWeights:
    if len(w.qkv) == 1 and len(w.w13) == 1:  # stacked already (e.g. once per decoder): no copies per call
        return w
    return BlockWeights(w.attn_norm, (torch.cat(w.qkv),), w.wo, w.ffn_norm, (torch.cat(w.w13),), w.w2)


def _linear_parts(x: torch.Tensor, ws: tuple, n: int) -> tuple:
    """x through n maps, given as n matrices or one stacked matrix."""
    return F.linear(x, ws[0]).chunk(n, -1) if len(ws) == 1 else tuple(F.linear(x, w) for w in ws)


def split_heads(t: torch.Tensor, n_head: int) -> torch.Tensor:
    return t.unflatten(-1, (n_head, -1)).transpose(1, 2)  # (B, T, D) -> (B, H, T, hd)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).flatten(-2)  # (B, H, T, hd) -> (B, T, D)


def attention_inputs(w: BlockWeights, x, rope: RopeTables, n_head: int, eps: float) -> tuple:
    """A block's queries and keys (rotated) and values, (B, H, T, hd), and its attention norm's saved
    tensors."""
    a, sa = rms_norm(x, w.attn_norm, eps)
    q, k, v = (split_heads(t, n_head) for t in _linear_parts(a, w.qkv, 3))
    return apply_rope(q, rope), apply_rope(k, rope), v, sa


def block_output(w: BlockWeights, x, o, eps: float) -> tuple[torch.Tensor, tuple]:
    """The block after its attention output o (B, H, T, hd): h = x + Wo o; h + SwiGLU(RMSNorm(h)), with
    hidden width D. Returns the output and what the written-out backward reads."""
    h = x + F.linear(merge_heads(o), w.wo)
    b, sb = rms_norm(h, w.ffn_norm, eps)
    g1, g3 = _linear_parts(b, w.w13, 2)
    s1 = F.silu(g1)
    return h + F.linear(s1 * g3, w.w2), (h.dtype, sb, g1, g3, s1)


def block(w: BlockWeights, x, rope: RopeTables, n_head: int, eps: float, attend_fn) -> tuple:
    """The transformer block as a function of its weights: x + Attn(RMSNorm(x)), then + SwiGLU(RMSNorm).
    attend_fn(q, k, v) -> (output, saved) attends over the rotated heads (causally, over a cache, or as
    the candidate stream). Returns the block's output and the tensors its written-out backward reads
    (ebt.fast.written_out): (x's dtype, attention norm, q, k, v, attention's, then block_output's)."""
    q, k, v, sa = attention_inputs(w, x, rope, n_head, eps)
    o, so = attend_fn(q, k, v)
    out, rest = block_output(w, x, o, eps)
    return out, (x.dtype, sa, q, k, v, so, *rest)


def block_candidates(w: BlockWeights, y, rope: RopeTables, n_head: int, eps: float, kc, vc, allowed) -> tuple:
    """`block` on the EBT's candidate stream y, attending to the context stream's keys/values kc, vc."""
    return block(w, y, rope, n_head, eps, lambda q, k, v: candidate_attention(q, k, v, kc, vc, allowed))


class Attention(nn.Module):
    """The attention maps' weights (the maths is `block`'s)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)


class SwiGLU(nn.Module):
    """The feed-forward's weights: w2(silu(w1 x) * w3 x) (the maths is `block_output`'s)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.d_model)  # hidden = D: the official models use no 8/3 factor

    def weights(self) -> BlockWeights:
        a, f = self.attn, self.ffn
        return BlockWeights(self.attn_norm.weight, (a.wq.weight, a.wk.weight, a.wv.weight), a.wo.weight,
                            self.ffn_norm.weight, (f.w1.weight, f.w3.weight), f.w2.weight)

    def forward(self, x, rope, mask=None, causal=True, fused=True, cache=None, layer=0, pos=0):
        """A causal stream (or under `mask`). cache: a KVCache to write this call's keys/values into at
        `pos` and attend over."""
        def attend_fn(q, k, v):
            if cache is not None:
                k, v = cache.write(layer, k, v, pos)
            return attend(q, k, v, mask=mask, causal=causal, fused=fused), None

        return block(self.weights(), x, rope, self.attn.n_head, self.attn_norm.eps, attend_fn)[0]

    def forward_candidates(self, y, rope, kc, vc, allowed):
        """The same block on the EBT's candidate stream, attending to cached context keys/values."""
        w, n_head, eps = self.weights(), self.attn.n_head, self.attn_norm.eps
        return block_candidates(w, y, rope, n_head, eps, kc, vc, allowed)[0]


class Backbone(nn.Module):
    """Blocks + final norm over a sequence of embeddings at given RoPE positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # +2: the EBT's candidates sit one position right of their context token, after a step token
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, cfg.context_length + 2)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, h, positions, cache: KVCache | None = None, pos: int = 0, **attn_kw):
        """A causal stream (attn_kw: mask / causal / fused). With a cache, each layer's keys and values
        are written at `pos` and attended over (prefill when pos = 0, decoding after)."""
        rope = self.rope.tables(positions, compute_dtype(h.dtype))
        for i, b in enumerate(self.blocks):
            h = b(h, rope, cache=cache, layer=i, pos=pos, **attn_kw)
        return self.norm(h)

    def candidates(self, y, positions, cache: KVCache, allowed):
        """The EBT's candidate stream given the context stream's per-layer keys/values in `cache` (positions
        and allowed from `candidate_frame`)."""
        rope = self.rope.tables(positions, compute_dtype(y.dtype))
        for i, b in enumerate(self.blocks):
            y = b.forward_candidates(y, rope, cache.k[i], cache.v[i], allowed)
        return self.norm(y)


def init_weights(module: nn.Module) -> None:
    """The official initialisation: Xavier-normal Linear weights, N(0, 1) embeddings, unit norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 1.0)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
