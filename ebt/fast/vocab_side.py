"""The candidate's vocabulary side in closed form: steps whose (B, S, V) tensors meet only matrix products
and first-order elementwise work.

An EBT's candidate enters through a bias-free linear map W (D x V): y = W p, p = softmax(z) (or z). With
u = dE/dy the step is z_next = p - alpha W^T u, so the (B, S, V) side of a step is a few products with W,
which these functions lay out once (ebt.nn.vocab_layout), compile (`fused_step`) or write into recycled
CPU memory (`recycled_step`); `linear_map_step` also takes the weights' second-order term through the map
in closed form. Which of them runs is decided by ebt.fast.plan; nothing here checks a device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD
from torch.profiler import record_function as phase  # names the step's parts in a profile

from ebt.fast import written_out
from ebt import nn as ebt_nn
from ebt.fast.memory import take
from ebt.nn import to_layout, vocab_in, vocab_layout, vocab_out, vocab_t
from ebt.think import Step


def written_grad(model, ctx, z, compiled: bool = False, pad: bool | None = None, create_graph: bool = False):
    """(p, E, dE/dp) at z by the model's written-out gradient (model.energy_grad, ebt.fast.written_out): plain
    operations, so a training step differentiates it with a first-order backward (create_graph)."""
    with torch.set_grad_enabled(create_graph):
        p = model.candidate_input(z)
        E, g = model.energy_grad(ctx, p, compiled=compiled, pad=pad)
    return p, E, g


def candidate_input(model, z, pool=None):
    """model.candidate_input(z), detached; with pool (softmax candidates only) into recycled memory."""
    if pool is None:
        return model.candidate_input(z).detach()
    return torch.softmax(z, -1, out=take(pool, z))


def update_in_product(p, ua, W, pool=None):
    """z_next = p - W^T ua as one matrix product with p added in (addmm), into recycled memory when
    pool is given: no (B, S, V) temporary."""
    z_next = take(pool, p)
    torch.addmm(p.flatten(0, -2), ua.flatten(0, -2).to(W.dtype), W, alpha=-1,
                out=z_next.view(-1, p.shape[-1]))
    return z_next


def _probs_in(z, softmax: bool, dtype, width: int):
    """(the candidate's input p (softmax(z), or z) laid out as the candidate map's products read it,
    softmax's row statistics (max, sum of exponentials), kept for the update; None without softmax)."""
    if not softmax:
        return to_layout(z, dtype, width), None
    m = z.amax(-1, keepdim=True)  # amax, x - max, exp, sum: what inductor makes one online-softmax pass
    s = (z - m).exp().sum(-1, keepdim=True)
    return to_layout(softmax_with(z, (m, s)), dtype, width), (m, s)


def softmax_with(z, stats):
    """softmax(z) from its row statistics (max, sum of exp(z - max)): no pass to reduce them again."""
    m, s = stats
    return (z - m).exp() / s


def mapped_update(z, wtu, a, softmax: bool, stats=None):
    """z_next = p - alpha W^T u with p recomputed from z (a read of z instead of a float p kept alive),
    from `_probs_in`'s statistics when given; wtu may carry padding columns."""
    p = (torch.softmax(z, -1) if stats is None else softmax_with(z, stats)) if softmax else z
    return p - a * wtu[..., : z.shape[-1]].to(p.dtype)


def map_in(model, z, pad):
    """(p in the products' layout, the map's weight in that layout (D, V + width), dtype, width, the
    softmax statistics of z or None)."""
    dt, width = vocab_layout(z, pad)
    p, stats = ebt_nn.compiled(_probs_in)(z, model.candidate_softmax, dt, width)
    return p, to_layout(model.vocab_to_embed.weight.detach(), dt, width), dt, width, stats


def fused_step(model, ctx, z, alpha, pad=None):
    """One first-order step, (z_next, E): p = softmax(z), E and u = dE/dy at y = W p, z_next = p -
    alpha W^T u, with the (B, S, V) side as compiled kernels over tensors laid out once for the
    products (ebt.nn.vocab_layout): no float p is kept and nothing is cast or padded twice."""
    p, Wl, _, _, stats = map_in(model, z, pad)
    E, u = model.energy_grad_embedding(ctx, F.linear(p, Wl), compiled=True, pad=pad)
    del p
    a = alpha if torch.is_tensor(alpha) else torch.full((), float(alpha), device=z.device)  # no host copy
    return ebt_nn.compiled(mapped_update)(z, F.linear(u, Wl.t()), a, model.candidate_softmax, stats), E


def recycled_step(model, ctx, z, alpha, pool, compiled=False, pad=None):
    """One first-order step of the written-out gradient with the linear map in closed form (z_next = p -
    W^T (alpha u), u = dE/dy at y = W p), p and z_next in recycled memory; p is given back. (z_next, E)."""
    W = model.vocab_to_embed.weight.detach()
    with torch.no_grad():
        p = candidate_input(model, z, pool)
        E, u = model.energy_grad_embedding(ctx, vocab_in(p, W, pad), compiled=compiled, pad=pad)
        z_next = update_in_product(p, u * alpha, W, pool)
    pool.give(p)
    return z_next, E


# ------------------------------------------------------------------------------------ thinking steps
# What ebt.think's loop calls (ebt.think.Step), handed out by ebt.fast.plan.Plan.think_step.

class WrittenOutStep(Step):
    """The reference step with dE/dp written out (and its context compiled when compiled)."""

    def __init__(self, model, compiled=False, pad=None):
        super().__init__(model)
        self.compiled, self.pad = compiled, pad

    def context(self, inputs, landscape, first_order=False):
        if first_order and self.compiled:  # the context stream written out, compiled with its backward
            return compiled_context(self.model, inputs, landscape)
        return self.model.context(inputs, landscape, first_order=first_order)

    def grad(self, ctx, z):
        return written_grad(self.model, ctx, z, self.compiled, self.pad)


class FusedStep(WrittenOutStep):
    """Each step one `fused_step`; the final score a forward of the energy."""

    def __call__(self, ctx, z, alpha):
        return fused_step(self.model, ctx, z, alpha, self.pad)

    def score(self, ctx, z):
        return self.model.energy_from(ctx, candidate_input(self.model, z))


class RecycledStep(WrittenOutStep):
    """Each step one `recycled_step`: the candidates, starts and noise in recycled CPU memory."""

    def __init__(self, model, pool, compiled=False, pad=None):
        super().__init__(model, compiled, pad)
        self.pool = pool

    def start(self, inputs):
        return self.model.init_candidate(inputs, take=self.pool.take)

    def __call__(self, ctx, z, alpha):
        return recycled_step(self.model, ctx, z, alpha, self.pool, self.compiled, self.pad)

    def score(self, ctx, z):
        p = candidate_input(self.model, z, self.pool)
        E = self.model.energy_from(ctx, p)
        self.pool.give(p)
        return E


def compiled_context(model, inputs, landscape):
    """model.context by the written-out context stream (ebt.fast.written_out.context_kv), compiled."""
    h, positions, prefix = model.context_input(inputs, landscape)
    return written_out.context_kv(model, h, positions, compiled=True), prefix


# ------------------------------------------------------------------------------ training (stepwise)

def rowdot(a, b):
    """<a, b> over the last dimension, one value per position, without an (.., V) temporary."""
    d = (a.unsqueeze(-2) @ b.unsqueeze(-1).to(a.dtype)).squeeze(-1)
    return d.to(torch.promote_types(d.dtype, torch.float32))


def alpha_grad(alpha, gv):
    """z_next = p - alpha * g, so dLoss/dalpha = -<g, v> (gv, per position), summed to alpha's shape
    (a scalar, or one value per row and position)."""
    if alpha.requires_grad:
        accumulate([alpha], [-gv.sum_to_size(alpha.shape).to(alpha.dtype)])


def accumulate(tensors, grads):
    for t, g in zip(tensors, grads):
        if g is not None:
            t.grad = g if t.grad is None else t.grad + g


def linear_map_step(run, ctx, z, loss_grad, wanted):
    """One graph-building step of the "jvp" or "explicit" method with the candidate's linear map W
    (D x V) in closed form. With y = W p, u = dE/dy, the step is z_next = p - alpha * W^T u. For the
    loss gradient v at z_next:
        backbone and context weights: -d/dtheta <u, y_dot>,  y_dot = alpha W v
        W:     h^T p - (alpha u)^T v,  h = -d/dy <u, y_dot>   (the same backward gives h)
        alpha: -<W^T u, v> = -<u, W v>
    "jvp" takes <u, y_dot> as the forward-mode tangent of E along y_dot, then backpropagates it;
    "explicit" computes u by plain operations (model.energy_grad_embedding) and backpropagates u
    with the cotangent -y_dot: an ordinary first-order backward, which torch.compile can compile.
    Either way the (B, S, V) tensors meet only matrix products and first-order elementwise work:
    p, z_next and v are the only ones made (and W^T u under autocast, where p and v are then held in
    the autocast dtype). run.fused: p and v are made once in the products' layout and the update and
    the loss run as compiled kernels. run.pool (a Recycler, CPU float): p, z_next and v are written
    into recycled memory, and p and v are given back at the end. run: ebt.fast.stepwise.Unroll."""
    p, y, E, u, layout = _embed_and_grad(run, ctx, z)
    z_next, loss, p, v, wv, ua = _update_and_loss(run, z, p, u, loss_grad, layout)
    del z
    y_dot = wv * run.alpha.detach()
    W = run.model.vocab_to_embed.weight
    others = [t for t in wanted if t is not W]
    grads = _second_order(run, ctx, y, u, y_dot, others)
    accumulate(others, grads[1:])
    if W.requires_grad:
        with torch.no_grad(), phase("ebt.step.map_grad"):
            dW = _map_grad(W, grads[0], p, ua, v, layout, run.pad)
        accumulate([W], [dW.to(W.dtype)])
    if run.pool is not None:
        run.pool.give(p, v)
    return z_next, E.detach(), loss


def _embed_and_grad(run, ctx, z):
    """(p, y = W p as a leaf, E, u = dE/dy, layout): with run.fused, p and the map in the products'
    layout (`map_in`), else layout None."""
    layout = None
    with torch.enable_grad():
        with phase("ebt.step.embed"):
            if run.fused:  # p and the map in the products' dtype and padded width, made once
                layout = map_in(run.model, z, run.pad)
                p, Wl, _, _, _ = layout
                y = F.linear(p, Wl)
            else:
                p = candidate_input(run.model, z, run.pool)
                y = vocab_in(p, run.model.vocab_to_embed.weight, run.pad)
            y = y.detach().requires_grad_()
        with phase("ebt.step.energy_grad"):
            if run.explicit:
                E, u = run.model.energy_grad_embedding(ctx, y, compiled=run.compiled, pad=run.pad)
            else:
                E = run.model.energy_from_embedding(ctx, y)
                (u,) = torch.autograd.grad(E.sum(), y)
    return p, y, E, u, layout


def _update_and_loss(run, z, p, u, loss_grad, layout):
    """The update and the step's loss: (z_next, loss, p, v, W v, alpha u), p and v as the map's
    products will read them (the autocast dtype under autocast)."""
    W = run.model.vocab_to_embed.weight
    with torch.no_grad(), phase("ebt.step.update_loss"):
        a = run.alpha.detach()
        ua = u.detach() * a  # the step in the width: z_next = p - W^T (alpha u)
        low = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else None
        if layout is not None:
            _, Wl, dt, width, stats = layout
            update = (F.linear(u.detach(), Wl.t()), a, run.model.candidate_softmax, stats)
            loss, v, z_next = loss_grad(z, grad_layout=(dt, width), update=update)
            wv = F.linear(v, Wl)
        else:
            if low is not None:  # keep z_next in float: a low-precision W^T u, then a float update
                z_next = torch.addcmul(p, a, vocab_out(u, W.t(), run.pad), value=-1)
                p = p.to(low)  # from here p and v only enter matrix products, which would cast them anyway
            else:  # the update inside the matrix product: no (B, S, V) temporary, one pass fewer
                z_next = update_in_product(p, ua, W, run.pool)
            loss, v = loss_grad(z_next, **({} if run.pool is None else {"out": take(run.pool, z_next)}))
            if low is not None:
                v = v.to(low)  # cast once, and half the memory held
            wv = vocab_in(v, W, run.pad)  # W v (B, S, D): alpha's gradient and the direction
        alpha_grad(run.alpha, rowdot(u.detach(), wv))
    return z_next, loss, p, v, wv, ua


def _second_order(run, ctx, y, u, y_dot, others):
    """d/d(y, others) of -<u, y_dot>: by the written-out u's backward, or forward mode ("jvp")."""
    with torch.enable_grad(), phase("ebt.step.second_order"):
        if run.explicit:
            return torch.autograd.grad(u, [y] + others, grad_outputs=-y_dot.to(u.dtype), allow_unused=True)
        with fwAD.dual_level():
            e_dot = fwAD.unpack_dual(run.model.energy_from_embedding(ctx, fwAD.make_dual(y, y_dot))).tangent
        return torch.autograd.grad(-e_dot.sum(), [y] + others, allow_unused=True)


def _map_grad(W, h, p, ua, v, layout, pad):
    """dLoss/dW = h^T p - (alpha u)^T v over all positions: two (D x V) products, no (2N, V) concatenation."""
    if layout is not None:  # p and v are laid out already: the products read them as they are
        dt = layout[2]
        flat = lambda t: t.flatten(0, -2).to(dt)  # noqa: E731
        V = W.shape[1]
        dW = (flat(h).t() @ flat(p))[:, :V].to(W.dtype, copy=True)  # summed in W's dtype
        return dW.sub_((flat(ua).t() @ flat(v))[:, :V])
    dW = vocab_t(h, p, pad=pad).to(W.dtype)  # summed in W's dtype, as autograd accumulates
    return vocab_t(ua, v, acc=dW, alpha=-1, pad=pad)
