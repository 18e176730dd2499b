"""The EBT's energy gradient written out: E and dE/dy of the candidate stream as one forward function.

Why: training backpropagates through dE/dy (the second-order term, ebt-method.md 2.6). Taken by
autograd with create_graph=True that is a double backward, which torch.compile refuses and which runs
eagerly as thousands of small kernels. Written out by hand, dE/dy is an ordinary differentiable
function of the weights: a training step then needs only first-order autograd (the backward of this
function), and both can be compiled, so inductor fuses the norms, RoPE, SwiGLU and softmax pieces.
Inference uses it the same way: a thinking step is then one compilable forward function.

Every line below mirrors a line of ebt.nn (Block.forward_candidates, candidate_attend, RMSNorm,
apply_rope, SwiGLU) and its backward, dtype for dtype, so the two agree to rounding (to ~1e-15 in
float64, tested against autograd and the official reference tensors).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ebt.nn import (KVCache, RopeTables, apply_rope, candidate_frame, candidate_probs_split, compute_dtype,
                    rms_normalize)
from ebt import nn as ebt_nn
from ebt.nn import compiled as compile_fn


def _rms(x, weight, eps):
    """RMSNorm forward, returning what its backward needs."""
    n, r = rms_normalize(x, eps)
    return n.type_as(x) * weight, (n, r)


def _rms_back(dout, weight, saved, dtype):
    """d/dx of RMSNorm: r * (dn - n * mean(dn * n)) with dn = dout * weight."""
    n, r = saved
    dn = (dout * weight).to(n.dtype)
    return (r * (dn - n * (dn * n).mean(-1, keepdim=True))).to(dtype)


def _rope_back(dx, rope: RopeTables):
    """RoPE is a rotation: its transpose rotates by the opposite angles."""
    if rope.cis is not None:
        return apply_rope(dx, RopeTables(rope.cis.conj(), None, None))
    return apply_rope(dx, RopeTables(None, rope.cos, -rope.sin))


def _heads(t, n_head):
    return t.unflatten(-1, (n_head, -1)).transpose(1, 2)


def _merge(t):
    return t.transpose(1, 2).flatten(-2)


def _attend(q, k, v, kc, vc, allowed):
    """candidate_attend's forward; returns the output and the float weights (context part, self part)
    for the backward. The softmax is taken in its two parts (ebt.nn.candidate_probs_split), so the
    products over the context keep an aligned width."""
    pc, ps = candidate_probs_split(q, k, kc, allowed)
    return pc.type_as(q) @ vc + ps.type_as(q) * v, (pc, ps)


def _attend_back(do, q, k, v, kc, vc, probs):
    """(dq, dk, dv) of candidate_attend given d(output); the context's keys and values are constants
    of the candidate (their gradient is not part of dE/dy)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    pc, ps = probs
    dpc = (do @ vc.transpose(-2, -1)).to(pc.dtype)
    dps = (do * v).sum(-1, keepdim=True).to(pc.dtype)
    inner = (pc * dpc).sum(-1, keepdim=True) + ps * dps  # the softmax's backward, over both parts
    dsc, dss = (pc * (dpc - inner)).type_as(q), (ps * (dps - inner)).type_as(q)
    dq = (dsc @ kc + dss * k) * scale
    dk = dss * q * scale
    dv = ps.type_as(q) * do
    return dq, dk, dv


def _fuse(w):
    """A block's weights with the query/key/value maps stacked, and the SwiGLU's two input maps: one
    matrix product each instead of three and two, forward and backward (small decoding batches are
    bound by the number of kernels)."""
    attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3 = w
    return attn_norm, torch.cat([wq, wk, wv]), wo, ffn_norm, torch.cat([w1, w3]), w2


def _block(w, n_head, eps, y, rope, kc, vc, allowed):
    """Block.forward_candidates, keeping its intermediates. w: the block's weights (_fuse(_weights))."""
    attn_norm, wqkv, wo, ffn_norm, w13, w2 = w
    a, sa = _rms(y, attn_norm, eps)
    q, k, v = F.linear(a, wqkv).chunk(3, -1)
    q, k, v = apply_rope(_heads(q, n_head), rope), apply_rope(_heads(k, n_head), rope), _heads(v, n_head)
    o, probs = _attend(q, k, v, kc, vc, allowed)
    y1 = y + F.linear(_merge(o), wo)
    b, sb = _rms(y1, ffn_norm, eps)
    g1, g3 = F.linear(b, w13).chunk(2, -1)
    s1 = F.silu(g1)
    y2 = y1 + F.linear(s1 * g3, w2)
    return y2, (y.dtype, y1.dtype, sa, sb, q, k, v, probs, g1, g3, s1)


def _block_back(w, n_head, dy2, saved, rope, kc, vc):
    """d/dy of the block given d/dy2 (the residual passes dy2 straight through)."""
    attn_norm, wqkv, wo, ffn_norm, w13, w2 = w
    y_dtype, y1_dtype, sa, sb, q, k, v, probs, g1, g3, s1 = saved
    dm = F.linear(dy2, w2.t())
    dg3 = dm * s1
    sig = torch.sigmoid(g1)
    dg1 = dm * g3 * (sig * (1 + g1 * (1 - sig)))  # silu'(x) = sigma(x) (1 + x (1 - sigma(x)))
    db = F.linear(torch.cat([dg1, dg3], -1), w13.t())
    dy1 = (dy2 + _rms_back(db, ffn_norm, sb, y1_dtype)).to(y1_dtype)
    do = _heads(F.linear(dy1, wo.t()), n_head)
    dq, dk, dv = _attend_back(do, q, k, v, kc, vc, probs)
    dq, dk = _rope_back(dq, rope), _rope_back(dk, rope)
    da = F.linear(torch.cat([_merge(dq), _merge(dk), _merge(dv)], -1), wqkv.t())
    return (dy1 + _rms_back(da, attn_norm, sa, y_dtype)).to(y_dtype)


def _weights(model):
    """The weights the candidate stream reads, as plain tensors: a compiled function then guards on
    their shapes only (not on the module), so every model of one shape shares one compilation."""
    bb = model.backbone
    blocks = [(b.attn_norm.weight, b.attn.wq.weight, b.attn.wk.weight, b.attn.wv.weight, b.attn.wo.weight,
               b.ffn_norm.weight, b.ffn.w1.weight, b.ffn.w2.weight, b.ffn.w3.weight) for b in bb.blocks]
    return blocks, bb.norm.weight, model.energy_head.weight


def energy_grad(model, ctx, y, compiled: bool = False):
    """(E, dE/dy) for embedded candidates y (B, S, D): model.energy_from_embedding(ctx, y) and the
    gradient of its sum with respect to y, both by plain tensor operations (no autograd inside), so
    autograd can differentiate the gradient once more with an ordinary backward.

    ctx as for energy_from_embedding: (cache, prefix) or (cache, prefix, offset[, allowed]).
    compiled: run it through torch.compile (one compilation per shape and grad mode; its backward is
    compiled too)."""
    cache, positions, allowed = candidate_frame(ctx, y.shape[1], y.device)
    ks, vs = cache.k, cache.v
    pad = (-allowed.shape[-1]) % 8 if y.device.type in ebt_nn.PAD_VOCAB_DEVICES else 0
    if pad:  # context length to a multiple of 8, masked: aligned rows for the tensor-core products
        # (on an H200 the bf16 products over 257 keys ran on fallback kernels, 9% of a training step)
        ks, vs = ([F.pad(t, (0, 0, 0, pad)) for t in ts] for ts in (ks, vs))
        allowed = F.pad(allowed, (0, pad), value=False)
    bb, cfg = model.backbone, model.cfg
    rope = bb.rope.tables(positions, compute_dtype(y.dtype), real=compiled)  # compile fuses the real form
    blocks, norm, head = _weights(model)
    fn = compile_fn(_energy_grad) if compiled else _energy_grad
    return fn(blocks, norm, head, cfg.n_head, cfg.norm_eps, y, rope, ks, vs, allowed)


def _energy_grad(blocks, norm, head, n_head, eps, y, rope, ks, vs, allowed):
    h, saved, blocks = y, [], [_fuse(w) for w in blocks]
    for i, w in enumerate(blocks):
        h, s = _block(w, n_head, eps, h, rope, ks[i], vs[i], allowed)
        saved.append(s)
    out, sn = _rms(h, norm, eps)
    E = F.linear(out, head).squeeze(-1)  # head: the energy head's (1, D) weight
    dh = _rms_back(head[0].expand_as(out).to(E.dtype), norm, sn, h.dtype)
    for i in reversed(range(len(blocks))):
        dh = _block_back(blocks[i], n_head, dh, saved[i], rope, ks[i], vs[i])
    return E, dh


def context_kv(model, h, positions, compiled: bool = False) -> KVCache:
    """The context stream's keys and values per layer (a KVCache) for embeddings h (B, T, D) at RoPE
    positions: EBT.context's Backbone.forward with causal fused attention, by plain operations, so it
    compiles with its (first-order) backward. The last layer's attention output, feed-forward and final
    norm are skipped: nothing reads them."""
    rope = model.backbone.rope.tables(positions, compute_dtype(h.dtype), real=compiled)
    blocks, _, _ = _weights(model)
    fn = compile_fn(_context) if compiled else _context
    cache = KVCache(len(blocks))
    cache.k, cache.v = fn(blocks, model.cfg.n_head, model.cfg.norm_eps, h, rope)
    return cache


def context_decode_step(model, cache: KVCache, h, pos, valid, compiled: bool = False) -> None:
    """One new context position (generation with static shapes): each layer's key and value for h (B, 1,
    D) written into the static cache at index `pos` (a (1,) tensor), the position attending over the
    cache's `valid` (C,) positions. Backbone.forward's decoding step by plain operations, compiled as one
    function (the decode step is bound by its number of kernels); the last layer's output is skipped."""
    rope = model.backbone.rope.tables(pos, compute_dtype(h.dtype), real=compiled)
    blocks, _, _ = _weights(model)
    fn = compile_fn(_context) if compiled else _context
    fn(blocks, model.cfg.n_head, model.cfg.norm_eps, h, rope, (cache.k, cache.v, pos, valid.view(1, 1, 1, -1)))


def _context(blocks, n_head, eps, h, rope, cache=None):
    """The context stream up to the last layer's keys and values. Without a cache, h is the whole
    stream attending causally to itself, and each layer's keys and values are returned; with one,
    cache = (keys, values, pos, mask): h is one new position, written into the static buffers at pos and
    attending over them under the mask."""
    ks, vs = [], []
    for i, w in enumerate(blocks):
        attn_norm, wqkv, wo, ffn_norm, w13, w2 = _fuse(w)
        a, _ = _rms(h, attn_norm, eps)
        q, k, v = F.linear(a, wqkv).chunk(3, -1)
        q, k, v = apply_rope(_heads(q, n_head), rope), apply_rope(_heads(k, n_head), rope), _heads(v, n_head)
        mask = None
        if cache is None:
            ks.append(k)
            vs.append(v)
        else:
            kc, vc, pos, mask = cache
            kc[i].index_copy_(2, pos, k.to(kc[i].dtype))
            vc[i].index_copy_(2, pos, v.to(vc[i].dtype))
            k, v = kc[i], vc[i]
        if i == len(blocks) - 1:
            break
        h = h + F.linear(_merge(ebt_nn.attend(q, k, v, mask, causal=mask is None)), wo)
        b, _ = _rms(h, ffn_norm, eps)
        g1, g3 = F.linear(b, w13).chunk(2, -1)
        h = h + F.linear(F.silu(g1) * g3, w2)
    return ks, vs
