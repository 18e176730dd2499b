"""The EBT's energy gradient written out: E and dE/dy of the candidate stream as one forward function.

Why: training backpropagates through dE/dy (the second-order term, ebt-method.md 2.6). Taken by
autograd with create_graph=True that is a double backward, which torch.compile refuses and which runs
eagerly as thousands of small kernels. Written out by hand, dE/dy is an ordinary differentiable
function of the weights: a training step then needs only first-order autograd (the backward of this
function), and both can be compiled, so inductor fuses the norms, RoPE, SwiGLU and softmax pieces.
Inference uses it the same way: a thinking step is then one compilable forward function.

The forward is ebt.nn's own block function (`block_candidates`, which Block.forward_candidates runs
too) on the same weights; the backward below is written by hand from the tensors that function saves,
dtype for dtype, and agrees with autograd to rounding (to ~1e-15 in float64, tested against autograd and
the official reference tensors).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ebt import nn as ebt_nn
from ebt.nn import (KVCache, RopeTables, apply_rope, attention_inputs, block_candidates, block_output,
                    candidate_frame, compute_dtype, merge_heads, rms_norm, split_heads, stacked)
from ebt.nn import compiled as compile_fn


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


def _attend_back(do, q, k, v, kc, vc, probs):
    """(dq, dk, dv) of candidate_attention given d(output); the context's keys and values are constants
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


def _block_back(w, n_head, dy2, saved, rope, kc, vc):
    """d/dy of ebt.nn.block_candidates given d/dy2 (the residual passes dy2 straight through), from
    what it saved. w: the block's weights, stacked (ebt.nn.stacked): one product for the three maps'
    transposes, one for the two."""
    attn_norm, (wqkv,), wo, ffn_norm, (w13,), w2 = w
    y_dtype, sa, q, k, v, probs, y1_dtype, sb, g1, g3, s1 = saved
    dm = F.linear(dy2, w2.t())
    dg3 = dm * s1
    sig = torch.sigmoid(g1)
    dg1 = dm * g3 * (sig * (1 + g1 * (1 - sig)))  # silu'(x) = sigma(x) (1 + x (1 - sigma(x)))
    db = F.linear(torch.cat([dg1, dg3], -1), w13.t())
    dy1 = (dy2 + _rms_back(db, ffn_norm, sb, y1_dtype)).to(y1_dtype)
    do = split_heads(F.linear(dy1, wo.t()), n_head)
    dq, dk, dv = _attend_back(do, q, k, v, kc, vc, probs)
    dq, dk = _rope_back(dq, rope), _rope_back(dk, rope)
    da = F.linear(torch.cat([merge_heads(dq), merge_heads(dk), merge_heads(dv)], -1), wqkv.t())
    return (dy1 + _rms_back(da, attn_norm, sa, y_dtype)).to(y_dtype)


def _weights(model):
    """The weights the candidate stream reads, as plain tensors: a compiled function then guards on
    their shapes only (not on the module), so every model of one shape shares one compilation."""
    bb = model.backbone
    return [b.weights() for b in bb.blocks], bb.norm.weight, model.energy_head.weight


def energy_grad(model, ctx, y, compiled: bool = False, pad_vocab: bool | None = None):
    """(E, dE/dy) for embedded candidates y (B, S, D): model.energy_from_embedding(ctx, y) and the
    gradient of its sum with respect to y, both by plain tensor operations (no autograd inside), so
    autograd can differentiate the gradient once more with an ordinary backward.

    ctx as for energy_from_embedding: (cache, prefix) or (cache, prefix, offset[, allowed]).
    compiled: run it through torch.compile (one compilation per shape and grad mode; its backward is
    compiled too)."""
    cache, positions, allowed = candidate_frame(ctx, y.shape[1], y.device)
    ks, vs = cache.k, cache.v
    pad = (-allowed.shape[-1]) % 8 if ebt_nn.pads_vocab(y.device, pad_vocab) else 0  # per device if None
    if pad:  # context length to a multiple of 8, masked: aligned rows for the tensor-core products
        # (unaligned ones run on fallback kernels: benchmarks/RESULTS.md)
        ks, vs = ([F.pad(t, (0, 0, 0, pad)) for t in ts] for ts in (ks, vs))
        allowed = F.pad(allowed, (0, pad), value=False)
    bb, cfg = model.backbone, model.cfg
    rope = bb.rope.tables(positions, compute_dtype(y.dtype), real=compiled)  # compile fuses the real form
    blocks, norm, head = _weights(model)
    fn = compile_fn(_energy_grad) if compiled else _energy_grad
    return fn(blocks, norm, head, cfg.n_head, cfg.norm_eps, y, rope, ks, vs, allowed)


def _energy_grad(blocks, norm, head, n_head, eps, y, rope, ks, vs, allowed):
    h, saved, blocks = y, [], [stacked(w) for w in blocks]
    for i, w in enumerate(blocks):
        h, s = block_candidates(w, h, rope, n_head, eps, ks[i], vs[i], allowed)
        saved.append(s)
    out, sn = rms_norm(h, norm, eps)
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
    static = (cache.k, cache.v, pos, valid.view(1, 1, 1, -1))
    fn(blocks, model.cfg.n_head, model.cfg.norm_eps, h, rope, static)


def _context(blocks, n_head, eps, h, rope, cache=None):
    """The context stream up to the last layer's keys and values. Without a cache, h is the whole
    stream attending causally to itself, and each layer's keys and values are returned; with one,
    cache = (keys, values, pos, mask): h is one new position, written into the static buffers at pos and
    attending over them under the mask."""
    ks, vs = [], []
    for i, w in enumerate(blocks):
        w = stacked(w)
        q, k, v, _ = attention_inputs(w, h, rope, n_head, eps)
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
        h, _ = block_output(w, h, ebt_nn.attend(q, k, v, mask, causal=mask is None), eps)
    return ks, vs
