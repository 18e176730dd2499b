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

from ebt.nn import RopeTables, apply_rope, candidate_frame, candidate_probs, compute_dtype, rms_normalize


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
    """candidate_attend's forward; returns the output and the float softmax for the backward."""
    pf = candidate_probs(q, k, kc, allowed)
    probs = pf.type_as(q)
    return probs[..., :-1] @ vc + probs[..., -1:] * v, pf


def _attend_back(do, q, k, v, kc, vc, pf):
    """(dq, dk, dv) of candidate_attend given d(output); the context's keys and values are constants
    of the candidate (their gradient is not part of dE/dy)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    probs = pf.type_as(q)
    dp = torch.cat([do @ vc.transpose(-2, -1), (do * v).sum(-1, keepdim=True)], -1).to(pf.dtype)
    ds = (pf * (dp - (pf * dp).sum(-1, keepdim=True))).type_as(q)  # the softmax's backward
    dq = (ds[..., :-1] @ kc + ds[..., -1:] * k) * scale
    dk = ds[..., -1:] * q * scale
    dv = probs[..., -1:] * do
    return dq, dk, dv


def _block(w, n_head, eps, y, rope, kc, vc, allowed):
    """Block.forward_candidates, keeping its intermediates. w: the block's weights (see _weights)."""
    attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3 = w
    a, sa = _rms(y, attn_norm, eps)
    q = apply_rope(_heads(F.linear(a, wq), n_head), rope)
    k = apply_rope(_heads(F.linear(a, wk), n_head), rope)
    v = _heads(F.linear(a, wv), n_head)
    o, pf = _attend(q, k, v, kc, vc, allowed)
    y1 = y + F.linear(_merge(o), wo)
    b, sb = _rms(y1, ffn_norm, eps)
    g1, g3 = F.linear(b, w1), F.linear(b, w3)
    s1 = F.silu(g1)
    y2 = y1 + F.linear(s1 * g3, w2)
    return y2, (y.dtype, y1.dtype, sa, sb, q, k, v, pf, g1, g3, s1)


def _block_back(w, n_head, dy2, saved, rope, kc, vc):
    """d/dy of the block given d/dy2 (the residual passes dy2 straight through)."""
    attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3 = w
    y_dtype, y1_dtype, sa, sb, q, k, v, pf, g1, g3, s1 = saved
    dm = F.linear(dy2, w2.t())
    dg3 = dm * s1
    sig = torch.sigmoid(g1)
    dg1 = dm * g3 * (sig * (1 + g1 * (1 - sig)))  # silu'(x) = sigma(x) (1 + x (1 - sigma(x)))
    db = F.linear(dg1, w1.t()) + F.linear(dg3, w3.t())
    dy1 = (dy2 + _rms_back(db, ffn_norm, sb, y1_dtype)).to(y1_dtype)
    do = _heads(F.linear(dy1, wo.t()), n_head)
    dq, dk, dv = _attend_back(do, q, k, v, kc, vc, pf)
    dq, dk = _rope_back(dq, rope), _rope_back(dk, rope)
    da = F.linear(_merge(dq), wq.t()) + F.linear(_merge(dk), wk.t()) + F.linear(_merge(dv), wv.t())
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
    bb, cfg = model.backbone, model.cfg
    rope = bb.rope.tables(positions, compute_dtype(y.dtype), real=compiled)  # compile fuses the real form
    blocks, norm, head = _weights(model)
    fn = _compiled() if compiled else _energy_grad
    return fn(blocks, norm, head, cfg.n_head, cfg.norm_eps, y, rope, cache.k, cache.v, allowed)


_COMPILED = None


def _compiled():
    global _COMPILED
    if _COMPILED is None:
        # one entry per model shape, grad mode and dtype: a process that builds several models (a
        # benchmark, a test session) needs more than dynamo's default of 8
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
        setattr(cfg, name, max(getattr(cfg, name), 64))
        _COMPILED = torch.compile(_energy_grad, fullgraph=True)  # a second shape (e.g. S2's batch) goes dynamic
    return _COMPILED


def _energy_grad(blocks, norm, head, n_head, eps, y, rope, ks, vs, allowed):
    h, saved = y, []
    for i, w in enumerate(blocks):
        h, s = _block(w, n_head, eps, h, rope, ks[i], vs[i], allowed)
        saved.append(s)
    out, sn = _rms(h, norm, eps)
    E = F.linear(out, head).squeeze(-1)  # head: the energy head's (1, D) weight
    dh = _rms_back(head[0].expand_as(out).to(E.dtype), norm, sn, h.dtype)
    for i in reversed(range(len(blocks))):
        dh = _block_back(blocks[i], n_head, dh, saved[i], rope, ks[i], vs[i])
    return E, dh
