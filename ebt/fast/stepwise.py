"""The training unroll and its backward in one pass, one step's graph alive at a time (docs/method.md 2.6).

`ebt.think.unroll` keeps every step's second-order graph until one backward; here each step's loss
gradient is sent back through that step's graph at once, which is then freed, and each context stream
(and alpha's random draw) is backpropagated once, at the end. Exact (the same gradients as the full
graph) when every graph-building step starts from a candidate that does not depend on the weights
(ebt.fast.plan.stepwise_ok). How a step's second-order term is taken is the method:

- "double": backpropagate the loss gradient from the step's output through the step's first-order
  gradient graph (reverse-over-reverse);
- "explicit": the same with the first-order gradient written out by plain operations (ebt.fast.written_out),
  so the backward is an ordinary first-order one (and compilable);
- "jvp": the step runs first-order only; with v = dLoss/dz_next the weights receive -d/dtheta <alpha v,
  dE/dp>, the inner product being the energy's forward-mode derivative along alpha v (reverse-over-
  forward).
For a model whose candidate enters through a bias-free linear map, "jvp" and "explicit" take that map in
closed form (ebt.fast.vocab_side.linear_map_step): the second-order work runs through the backbone only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch.autograd import forward_ad as fwAD
from torch.profiler import record_function as phase  # names the step's parts in a profile

from ebt.fast.memory import Recycler, give_inputs
from ebt.fast.vocab_side import (alpha_grad, compiled_context, fused_step, linear_map_step, recycled_step,
                                 rowdot, written_grad)
from ebt.recipe import step_landscapes
from ebt.think import energy_and_grad, noised, update


@dataclass(frozen=True)
class Method:
    """How the stepwise backward takes its steps, decided once by ebt.fast.plan (Plan.train_method)."""
    name: str  # "double", "explicit" or "jvp"
    linear_map: bool = False  # the candidate's linear map in closed form ("jvp", "explicit")
    fused: bool = False  # ("explicit", compiled) the (B, S, V) side as compiled kernels, laid out once
    pool: Recycler | None = None  # (CPU) the steps' (B, S, V) tensors in recycled memory
    compiled: bool = False  # the written-out gradient and the context stream through torch.compile
    pad: bool | None = None  # the vocabulary layout of the products (ebt.nn.pads_vocab)


@dataclass
class Losses:
    """The loss on the unroll: sum over k in `steps` of loss_k(z_k), z_k the output of step k, each
    scaled by `scale`. grad(k, z_k, scale, grad_layout=None, out=None) returns (loss_k, d(scale *
    loss_k)/dz_k) without a graph, the gradient in grad_layout (dtype, pad) when given one (ebt.nn.
    to_layout), written into out (a tensor of z_k's shape and dtype) when it can. The fused path
    (vocab_side._update_and_loss) also passes update=(W^T u, alpha, softmax, statistics): z_k is then
    the step's input, updated first, and grad returns (loss_k, the gradient at the updated candidate,
    the updated candidate)."""
    grad: Callable
    steps: list
    scale: float = 1.0


@dataclass
class Unroll:
    """What every step of one stepwise unroll reads: the model, the method's choices and alpha (a leaf)."""
    model: torch.nn.Module
    method: Method
    alpha: torch.Tensor

    def __post_init__(self):
        m = self.method
        self.explicit, self.linear_map, self.fused = m.name == "explicit", m.linear_map, m.fused
        self.pool, self.compiled, self.pad = m.pool, m.compiled, m.pad
        # the model's energy in the plan's vocabulary layout
        self.energy = self.model.energy_from if m.pad is None else partial(self.model.energy_from, pad=m.pad)

    def grad(self, ctx, z, create_graph: bool = False):
        """(p, E, dE/dp) at z: written out ("explicit") or by autograd."""
        if self.explicit:
            return written_grad(self.model, ctx, z, self.compiled, self.pad, create_graph)
        return energy_and_grad(self.model, ctx, z, create_graph=create_graph, energy=self.energy)


def unroll_backward(model, inputs, start, steps, losses: Losses, method: Method, stochastic: bool = False,
                    on_step=None, recycle_start: bool = False):
    """The training unroll of `steps` (a count or each step's landscape, ebt.recipe.step_landscapes) and
    its backward: accumulates dLoss/dtheta (`losses`) into the parameters' .grad. stochastic: alpha
    drawn at random (training). start: the starting candidate, or a one-element list holding it, which is
    emptied so that no caller keeps a (B, S, V) start alive through the unroll. on_step(k, z_k) sees
    every step's output (metrics) and must not keep it: on CPU its memory receives a later step's output
    (method.pool), as does the start's when recycle_start (the caller holds no other reference to it).
    Returns the last candidate (detached), the energy fed into the first step and the step losses."""
    z = start.pop() if isinstance(start, list) else start
    cfg = model.cfg.ebt
    alpha_graph = model.step_alpha(z.shape, stochastic)  # drawn once, before the steps, as in `unroll`
    run = Unroll(model, method, alpha_graph.detach().requires_grad_(alpha_graph.requires_grad))
    landscapes = step_landscapes(steps)
    graph_steps = {k for k in losses.steps if not cfg.truncate or k == len(landscapes) - 1}
    contexts = _Contexts(model, inputs, {model.landscape_key(landscapes[k]) for k in graph_steps}, method)
    weights = [p for p in model.parameters() if p.requires_grad]
    take = torch.empty_like if method.pool is None else method.pool.take_like
    energy0, step_losses = None, []
    for k, land in enumerate(landscapes):
        ctx, leaves = contexts.of(land)
        z = z_in = z.detach()
        if cfg.langevin > 0:
            z = noised(z, cfg.langevin, take)
        z_step = z
        z, E, loss = _body(run, k in graph_steps)(run, k, ctx, z, weights + leaves, losses)
        if loss is not None:
            step_losses.append(loss)
        if method.pool is not None:  # the step's inputs; the caller's start only when handed over
            give_inputs(method.pool, z_in, z_step, owned=k > 0 or recycle_start)
        z_in = z_step = None  # their graphs lead back to the step's input: dropped before the next step
        E = E.detach()
        if on_step is not None:
            on_step(k, z)
        if k == 0:
            energy0 = E
    contexts.backward([(alpha_graph, run.alpha)])
    return z, energy0, step_losses


def _first_order(run, k, ctx, z, wanted, losses):
    """A step that builds no graph (truncated, or no loss on its output)."""
    a = run.alpha.detach()
    if run.fused:
        z, E = fused_step(run.model, ctx, z, a, run.pad)
    elif run.pool is not None and run.explicit:
        z, E = recycled_step(run.model, ctx, z, a, run.pool, run.compiled, run.pad)
    else:
        p, E, g = run.grad(ctx, z)
        z = update(p.detach(), g, a)
    return z, E, None


def _double(run, k, ctx, z, wanted, losses):
    """"double" and "explicit": the loss gradient at z_next, then one backward from z_next through the
    step's first-order gradient graph; inputs=: only what training needs (not the candidate, a leaf)."""
    p, E, g = run.grad(ctx, z, create_graph=True)
    z_next = update(p.detach(), g, run.alpha)
    loss, v = losses.grad(k, z_next.detach(), losses.scale)
    torch.autograd.backward(z_next, v, inputs=wanted + ([run.alpha] if run.alpha.requires_grad else []))
    return z_next.detach(), E, loss


def _jvp(run, k, ctx, z, wanted, losses):
    """"jvp": a first-order step, then d/dtheta of -<alpha v, dE/dp> by forward mode along alpha v."""
    p, E, g = run.grad(ctx, z)
    z = update(p.detach(), g, run.alpha.detach())
    loss, v = losses.grad(k, z, losses.scale)
    with torch.enable_grad(), fwAD.dual_level():
        dual = fwAD.make_dual(p.detach(), run.alpha.detach() * v)
        directional = fwAD.unpack_dual(run.energy(ctx, dual)).tangent.sum()
    directional.neg().backward(inputs=wanted)
    alpha_grad(run.alpha, rowdot(g, v))
    return z, E, loss


def _linear_map(run, k, ctx, z, wanted, losses):
    """"jvp" and "explicit" with the candidate's linear map in closed form (vocab_side.linear_map_step)."""
    return linear_map_step(run, ctx, z, lambda zn, **kw: losses.grad(k, zn, losses.scale, **kw), wanted)


BODIES = {"double": _double, "explicit": _double, "jvp": _jvp}  # graph-building steps, per method


def _body(run, graph: bool):
    if not graph:
        return _first_order
    return _linear_map if run.linear_map else BODIES[run.method.name]


class _Contexts(dict):
    """landscape key -> (context, [leaf]): each context stream built once per unroll (with a graph only
    where a step builds one), its graph-carrying tensors replaced by leaves that the steps backpropagate
    into; `backward` sends the leaves' gradients through the streams once, at the end."""

    def __init__(self, model, inputs, graph_keys, method: Method):
        super().__init__()
        self.model, self.inputs, self.graph_keys, self.pairs = model, inputs, graph_keys, []
        self.build = model.context
        if method.compiled:  # the context stream written out, compiled with its backward
            self.build = lambda inputs, land, first_order: compiled_context(model, inputs, land)

    def of(self, land: int):
        key = self.model.landscape_key(land)
        if key not in self:
            with torch.set_grad_enabled(key in self.graph_keys), phase("ebt.context"):  # first-order backward
                ctx, pairs = _graph_leaves(self.build(self.inputs, land, first_order=True))
            self.pairs += pairs
            self[key] = (ctx, [leaf for _, leaf in pairs])
        return self[key]

    def backward(self, extra) -> None:
        pairs = [(t, leaf.grad) for t, leaf in self.pairs + extra if leaf.grad is not None]
        if pairs:  # each context stream and alpha's draw: one backward with their leaves' gradients
            with phase("ebt.context_backward"):
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def _graph_leaves(ctx):
    """(ctx with every graph-carrying tensor replaced by a detached leaf, [(tensor, leaf), ...])."""
    pairs = []

    def leaf(t):
        if t is None or not t.requires_grad:
            return t
        x = t.detach().requires_grad_()
        pairs.append((t, x))
        return x

    def walk(c):
        if isinstance(c, torch.Tensor):
            return leaf(c)
        if isinstance(c, (tuple, list)):
            return type(c)(walk(x) for x in c)
        if hasattr(c, "with_tensors"):  # a KVCache
            return c.with_tensors(walk)
        return c

    return walk(ctx), pairs


def autograd_loss_grad(loss_fn, z, scale):
    """(loss_fn(z), d(scale * loss)/dz) by autograd, for losses without a closed-form gradient."""
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        loss = loss_fn(z)
        (v,) = torch.autograd.grad(loss * scale, z)
    return loss.detach(), v
