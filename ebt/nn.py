"""The Llama-2 style backbone shared by every model (ebt-method.md 2.1).

Pre-norm blocks h = h + Attn(RMSNorm(h)); h = h + FFN(RMSNorm(h)), RMSNorm and softmax in at least
float32, RoPE on adjacent pairs, SwiGLU with hidden width D, no biases anywhere. The EBT and the
Transformer++ use this exact code; only what goes in (embeddings) and comes out (heads) differ.
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
# GPT-NeoX) bf16 rows are not 16-byte aligned and cuBLAS falls back to kernels 5.7x slower on an H200
# (benchmarks/vocab_matmul.py). The padding is zeros, so results are those of the unpadded product.
VOCAB_ALIGN = 64
PAD_VOCAB_DEVICES = {"cuda"}  # also where the written-out gradient pads the context's keys (ebt.energy_grad)


def _vocab_pad(x: torch.Tensor, dim: int) -> tuple[int, torch.dtype]:
    if x.device.type not in PAD_VOCAB_DEVICES or x.shape[dim] % VOCAB_ALIGN == 0:
        return 0, x.dtype
    cast = torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float64)
    return (-x.shape[dim]) % VOCAB_ALIGN, torch.get_autocast_dtype(x.device.type) if cast else x.dtype


def vocab_in(p: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """p (.., V) @ weight (D, V)^T: the EBT's candidate map, V contracted (padded with zeros)."""
    pad, dt = _vocab_pad(p, -1)
    if not pad:
        return F.linear(p, weight)
    return F.linear(F.pad(p.to(dt), (0, pad)), F.pad(weight.to(dt), (0, pad)))


def vocab_out(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h (.., D) @ weight (V, D)^T: a vocabulary head, V produced (extra rows computed, then dropped)."""
    pad, _ = _vocab_pad(weight, 0)
    if not pad or torch.compiler.is_compiling():  # inductor pads strides itself; a slice would cost copies
        return F.linear(h, weight)
    return F.linear(h, F.pad(weight, (0, 0, 0, pad)))[..., : weight.shape[0]]


def vocab_t(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """a (.., D)^T @ b (.., V) summed over all positions: (D, V), a V-sized map's weight gradient (V
    padded with zeros on the padding devices, as in vocab_in). acc: add alpha times the product into
    this (D, V) tensor instead of returning a new one (in place inside the matrix product where it can)."""
    a, b = a.flatten(0, -2), b.flatten(0, -2)
    pad, dt = _vocab_pad(b, -1)
    if torch.is_autocast_enabled(b.device.type):  # the product's dtype under autocast, never an upcast
        low = torch.get_autocast_dtype(b.device.type)
        a, b = a.to(low), b.to(low)
    else:
        b = b.to(a.dtype)
    if not pad:
        if acc is not None and acc.dtype == a.dtype:
            return acc.addmm_(a.t(), b, alpha=alpha)
        out = a.t() @ b
    else:
        out = (a.t() @ F.pad(b, (0, pad)))[:, : b.shape[-1]]
    return out if acc is None else acc.add_(out, alpha=alpha)


def vocab_layout(x: torch.Tensor) -> tuple[torch.dtype, int]:
    """(dtype, pad): how the candidate map's matrix products read a (.., V) tensor. The autocast dtype
    for float32 tensors (else x's own), and V padded to an aligned width on the padding devices. A
    tensor laid out so once (`to_layout`) enters every product without further casts or copies."""
    pad = (-x.shape[-1]) % VOCAB_ALIGN if x.device.type in PAD_VOCAB_DEVICES else 0
    low = torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32
    return (torch.get_autocast_dtype(x.device.type) if low else x.dtype), pad


def to_layout(x: torch.Tensor, dtype: torch.dtype, pad: int) -> torch.Tensor:
    """x (.., V) -> (.., V + pad) in dtype, zeros in the padding (products are those of the unpadded x)."""
    return F.pad(x.to(dtype), (0, pad)) if pad else x.to(dtype)


_COMPILED: dict = {}


def compiled(fn):
    """torch.compile(fn, fullgraph=True), built once per function (each compiles once per shape, grad
    mode and dtype; a second shape, e.g. System 2's batch with replayed rows, goes dynamic)."""
    if fn not in _COMPILED:
        # a process that builds several models (a benchmark, a test session) needs more entries than
        # dynamo's default of 8 per function
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
        setattr(cfg, name, max(getattr(cfg, name), 64))
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _ = rms_normalize(x, self.eps)
        return n.type_as(x) * self.weight


def rms_normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / rms(x) in the compute dtype, and 1 / rms(x) (which the written-out backward reuses)."""
    xf = x.to(compute_dtype(x.dtype))
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * r, r


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
            freqs = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
            ang = torch.outer(torch.arange(self.max_len, dtype=torch.float64), freqs)
            cdtype = {torch.float32: torch.complex64, torch.float64: torch.complex128}[dtype]
            self._cache[key] = RopeTables(torch.polar(torch.ones_like(ang), ang).to(positions.device, cdtype),
                                          ang.cos().to(positions.device, dtype), ang.sin().to(positions.device, dtype))
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


def attend(q, k, v, mask: torch.Tensor | None = None, causal: bool = False, fused: bool = True) -> torch.Tensor:
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


def _softmax(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension. Under forward-mode AD (the JVP weight-gradient path) it is
    written out: PyTorch's softmax tangent rule updates its output in place, which breaks a backward
    through the tangent (reverse-over-forward)."""
    if fwAD.unpack_dual(s).tangent is None:
        return torch.softmax(s, dim=-1)
    e = (s - s.detach().amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


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


def candidate_probs(qy, ky, kc, allowed) -> torch.Tensor:
    """The candidate stream's attention weights in the compute dtype, (B, H, S, C + 1): one softmax
    over the allowed context scores and, last, the candidate's score with itself."""
    scale = 1.0 / math.sqrt(qy.shape[-1])
    s_ctx = ((qy @ kc.transpose(-2, -1)) * scale).masked_fill(~allowed, float("-inf"))  # (B, H, S, C)
    s_self = (qy * ky).sum(-1, keepdim=True) * scale  # (B, H, S, 1)
    return _softmax(torch.cat([s_ctx, s_self], -1).to(compute_dtype(qy.dtype)))


def candidate_probs_split(qy, ky, kc, allowed) -> tuple[torch.Tensor, torch.Tensor]:
    """candidate_probs as its two parts, (context weights (B, H, S, C), self weight (B, H, S, 1)), the
    softmax written out over both without concatenating them: the context part keeps the keys' width
    C, which stays aligned for tensor-core products (a (C + 1)-wide row does not). More kernels than
    one softmax, which the compiler fuses: the written-out gradient's form (ebt.energy_grad), while
    the autograd paths keep candidate_probs; the same numbers to rounding."""
    scale = 1.0 / math.sqrt(qy.shape[-1])
    cd = compute_dtype(qy.dtype)
    s_ctx = ((qy @ kc.transpose(-2, -1)) * scale).masked_fill(~allowed, float("-inf")).to(cd)
    s_self = ((qy * ky).sum(-1, keepdim=True) * scale).to(cd)
    m = torch.maximum(s_ctx.amax(-1, keepdim=True), s_self)
    e_ctx, e_self = (s_ctx - m).exp(), (s_self - m).exp()
    total = e_ctx.sum(-1, keepdim=True) + e_self
    return e_ctx / total, e_self / total


def candidate_attend(qy, ky, vy, kc, vc, allowed) -> torch.Tensor:
    """The EBT's candidate stream (ebt-method.md 2.2), against the context stream's keys and values.

    qy, ky, vy: (B, H, S, hd) for the candidates; kc, vc: (B, H, C, hd) for the context (the step
    tokens, then x_0, x_1, ...); allowed: the (S, C) mask from `candidate_frame`. Candidate i attends to
    the context it is allowed and to itself only: never to x_{i+1} (its target) nor to another
    candidate. Explicit scores, so double backward works; no (C+S)^2 matrix as in the official code.
    """
    probs = candidate_probs(qy, ky, kc, allowed).type_as(qy)
    return probs[..., :-1] @ vc + probs[..., -1:] * vy


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
                k, v = torch.cat([self.k[layer][:, :, :pos], k], 2), torch.cat([self.v[layer][:, :, :pos], v], 2)
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


def capture_cuda_graph(fn, warmup: int = 2):
    """Run fn() `warmup` times on a side stream, then capture one call as a CUDA graph: returns (graph,
    its output). A replay reruns every kernel on the same memory without the CPU launching them one by
    one."""
    return capture_cuda_graphs([fn], warmup)[0]


def capture_cuda_graphs(fns, warmup: int = 2, warmup_fns=None, release: bool = False) -> list:
    """Graphs that never run at the same time (e.g. one per step count), each replay's outputs used before
    the next replay (a replay may overwrite the other graphs' outputs): each of `warmup_fns` (default
    fns) run `warmup` times on a side stream, then each of fns captured, all into one memory pool.
    Returns [(graph, its output)]. Every warm-up comes before any capture, so a warm-up never runs
    beside an earlier graph's memory; with `release` the allocator's cache is emptied in between, so the
    warm-ups' memory is not held beside the graphs' pool either (a training step's: gigabytes; a decode
    step's is not worth the synchronisation). autocast's weight-cast cache stays off meanwhile (its
    copies would be freed under the graph)."""
    cast = lambda: torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),  # noqa: E731
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), cast():
        for f in warmup_fns or fns:
            for _ in range(warmup):
                f()
    torch.cuda.current_stream().wait_stream(side)
    if release:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    out, pool = [], None
    for fn in fns:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool), cast():
            out.append((graph, fn()))
        pool = pool if pool is not None else graph.pool()
    return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def qkv(self, x, rope):
        heads = lambda t: t.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)  # noqa: E731
        return apply_rope(heads(self.wq(x)), rope), apply_rope(heads(self.wk(x)), rope), heads(self.wv(x))

    def out(self, y):
        return self.wo(y.transpose(1, 2).flatten(-2))

    def forward(self, x, rope, mask=None, causal=True, fused=True, cache=None, layer=0, pos=0):
        """cache: a KVCache to write this call's keys/values into at `pos` and attend over."""
        q, k, v = self.qkv(x, rope)
        if cache is not None:
            k, v = cache.write(layer, k, v, pos)
        return self.out(attend(q, k, v, mask=mask, causal=causal, fused=fused))


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

    def forward(self, x, rope, **attn_kw):
        x = x + self.attn(self.attn_norm(x), rope, **attn_kw)
        return x + self.ffn(self.ffn_norm(x))

    def forward_candidates(self, y, rope, kc, vc, allowed):
        """The same block on the EBT's candidate stream, attending to cached context keys/values."""
        qy, ky, vy = self.attn.qkv(self.attn_norm(y), rope)
        y = y + self.attn.out(candidate_attend(qy, ky, vy, kc, vc, allowed))
        return y + self.ffn(self.ffn_norm(y))


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
        for i, block in enumerate(self.blocks):
            h = block(h, rope, cache=cache, layer=i, pos=pos, **attn_kw)
        return self.norm(h)

    def candidates(self, y, positions, cache: KVCache, allowed):
        """The EBT's candidate stream given the context stream's per-layer keys/values in `cache` (positions
        and allowed from `candidate_frame`)."""
        rope = self.rope.tables(positions, compute_dtype(y.dtype))
        for i, block in enumerate(self.blocks):
            y = block.forward_candidates(y, rope, cache.k[i], cache.v[i], allowed)
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
