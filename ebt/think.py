"""The thinking loop: optimise a candidate prediction by gradient descent on the energy.

One module for every EBT and every modality. A model provides these hooks and nothing here knows what
a candidate is (vocabulary logits, a frame's features, an image):

    model.context(inputs, landscape, first_order=False)  -> ctx   what does not depend on the
                                                 candidate (cacheable); first_order: no second-order graph
                                                 will run through it (fused kernels may serve)
    model.landscape_key(k)            -> key     steps with the same key share one ctx
    model.candidate_input(z)          -> p       e.g. softmax for text, identity for continuous data
    model.energy_from(ctx, p)         -> E       one energy per predicted position, (B, S)
    model.step_alpha(shape, random)   -> alpha   the step size (a scalar or per row and position)
    model.init_candidate(inputs)      -> z0      a random start
    model.cfg.ebt                     -> EBTConfig   landscapes, Langevin std, step counts (schedules below)
    model.energy_grad(ctx, p)         -> E, dE/dp   optional, used per model.explicit_grad: the
                                                 gradient by plain operations (ebt.energy_grad), so a
                                                 training step needs first-order autograd only
    model.vocab_to_embed, model.compile_grad, model.candidate_softmax   optional: a bias-free linear
                                                 candidate map and a compiled written-out gradient let
                                                 the (B, S, V) side of a step run as a few compiled
                                                 kernels (`fused_step`)

One step is   p = candidate_input(z + noise);  E = energy(p);  z_next = p - alpha * dE/dp.
On CPU the steps write their (B, S, V) tensors into recycled memory (`Recycler`) and draw random starts
and noise in parallel chunks (`randn_`): fresh large tensors and torch's serial sampler cost a small
EBT's CPU step nearly as much as its vocabulary products.
`unroll` is what training (and the official validation) runs; `think` is inference-time System 2
thinking: more steps, several candidates with a selection rule, step acceptance and adaptive stopping.

The protocol is the official NLP code's (alexiglad/EBT, model/nlp/ebt.py): the Langevin noise of std
`langevin` is added before every step in every phase, validation and inference included (noise=0 switches
it off); which landscape each step runs on is a schedule (`draw_steps` in training, `EBTConfig.eval_steps`
in validation, `inference_schedule` when thinking); the final candidate is scored without noise.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD
from torch.profiler import record_function as phase  # names the step's parts in a profile (no cost otherwise)

from ebt.config import bounded, check_bounds
from ebt.errors import ConfigError
from ebt.nn import compiled, to_layout, vocab_in, vocab_layout, vocab_out, vocab_t


class ContextCache(dict):
    """Contexts per landscape key, built on first use. `graph` ones keep the autograd graph to the
    weights (a step that builds the second-order graph needs them); the others are constants."""

    def __init__(self, model, inputs):
        super().__init__()
        self.model, self.inputs = model, inputs

    def get_ctx(self, k: int, graph: bool):
        key = (self.model.landscape_key(k), graph)
        if key not in self:
            with torch.set_grad_enabled(graph):  # no graph: fused attention kernels may serve
                self[key] = self.model.context(self.inputs, k, first_order=not graph)
        return self[key]


class Recycler:
    """Dead (B, S, V) tensors on CPU, kept to receive the next step's outputs (`out=`).

    Why: glibc serves each allocation above its mmap threshold (which stops growing at 32 MB) with a
    fresh mapping and unmaps it on free, so every new (B, S, V) tensor pays a page fault per 4 KB on
    first touch. On the 2-core VM a 33 MB softmax takes 11 ms into a new tensor and 2.7 ms into a
    reused one, and a training step makes about nine such tensors. CUDA's caching allocator already
    reuses memory, so on other devices `take` is torch.empty and `give` keeps nothing.
    Only a tensor that nothing else will read may be given: the training unroll gives its own p, v
    and dead candidates, never one a caller holds. At most `keep` tensors are held; `clear()` frees
    them (`ebt train` does before each validation and at the end)."""

    MIN_BYTES = 1 << 22  # smaller tensors come from malloc's heap, which reuses memory already

    def __init__(self, keep: int = 6):
        self.keep, self.free, self.lock = keep, [], threading.Lock()

    def take(self, shape, dtype, device) -> torch.Tensor:
        shape = torch.Size(shape)
        with self.lock:
            for i, t in enumerate(self.free):
                if t.shape == shape and t.dtype == dtype and t.device == device:
                    return self.free.pop(i)
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, *tensors) -> None:
        with self.lock:
            for t in tensors:
                if (t is not None and t.device.type == "cpu" and t._base is None and t.is_contiguous()
                        and t.grad_fn is None and t.untyped_storage().nbytes() >= self.MIN_BYTES
                        and all(t.data_ptr() != f.data_ptr() for f in self.free)):  # never twice
                    self.free.append(t.detach())
            del self.free[: max(0, len(self.free) - self.keep)]

    def clear(self) -> None:
        with self.lock:
            self.free.clear()


RECYCLER = Recycler()

_RNG_CHUNK = 1 << 20
_rng_threads = (None, None)  # ((pid, threads), ThreadPoolExecutor): a forked process builds its own


def randn_(out: torch.Tensor) -> torch.Tensor:
    """Fill `out` with N(0, 1) draws and return it: the random starts and Langevin noise of EBTs.

    torch's CPU normal_ is serial (mt19937, ~3.5 ns a number on the 2-core VM: 28 ms for a (8, 128,
    8192) start, a tenth of a small EBT's CPU training step and more in System 2, which draws noise at
    every step). So on CPU a tensor of more than 2^20 elements is filled in chunks of 2^20, each from its
    own generator seeded from the global one (one draw), on as many threads as torch uses. The numbers
    depend on the seed alone, not on the thread count; they differ from torch.randn's. Elsewhere (CUDA:
    parallel, and capturable in a CUDA graph) this is out.normal_()."""
    global _rng_threads
    n = out.numel()
    if out.device.type != "cpu" or n <= _RNG_CHUNK or not out.is_contiguous():
        return out.normal_()
    base = int(torch.randint(0, 2**62, (1,)))
    flat = out.view(-1)

    def fill(i):
        flat[i * _RNG_CHUNK: (i + 1) * _RNG_CHUNK].normal_(generator=torch.Generator().manual_seed(base + i))

    key = (os.getpid(), max(1, torch.get_num_threads()))
    if _rng_threads[0] != key:
        if _rng_threads[1] is not None and _rng_threads[0][0] == key[0]:
            _rng_threads[1].shutdown(wait=False)  # another thread count: this process's old pool goes
        _rng_threads = (key, ThreadPoolExecutor(key[1], thread_name_prefix="ebt-randn"))
    list(_rng_threads[1].map(fill, range((n + _RNG_CHUNK - 1) // _RNG_CHUNK)))
    return out


def energy_and_grad(model, ctx, z, noise: float = 0.0, create_graph: bool = False, explicit: bool | None = None):
    """(p, E, dE/dp) at candidate z. Works under torch.no_grad() too (inference). explicit: use the
    model's written-out gradient (model.energy_grad) rather than autograd; None: model.explicit_grad,
    where None in turn means: written out on CPU or when model.compile_grad, autograd on CUDA eager."""
    if noise > 0:
        z = _noised(z, noise)
    if explicit if explicit is not None else explicit_for(model, z.device):  # written out: no autograd
        with torch.set_grad_enabled(create_graph):
            p = model.candidate_input(z)
            E, g = model.energy_grad(ctx, p)
        return p, E, g
    with torch.enable_grad():
        if not z.requires_grad:
            # the leaf is z, not p: autocast caches its casts of leaves that require grad until the
            # autocast region ends, which would keep every step's candidate alive while thinking
            z = z.detach().requires_grad_()
        p = model.candidate_input(z)
        if p is z:  # identity candidate_input (continuous data): a non-leaf view for the same reason
            p = z.view_as(z)
        E = model.energy_from(ctx, p)
        (g,) = torch.autograd.grad(E.sum(), p, create_graph=create_graph)
    return p, E, g


def explicit_for(model, device: torch.device) -> bool:
    """Whether the model's inference takes the written-out gradient on this device: always when it is
    compiled (model.compile_grad compiles nothing else), else per model.explicit_grad, whose None (auto)
    is the rule of `auto_grad_method`."""
    if getattr(model, "compile_grad", False):
        return True
    explicit = getattr(model, "explicit_grad", False)
    return auto_grad_method(device, False) == "explicit" if explicit is None else bool(explicit)


def step_landscapes(steps) -> list[int]:
    """The landscape of each step of an unroll. `steps`: a count n (step k on landscape k, the model
    reusing its last landscape beyond those it has: n = landscapes + R is the official validation's
    order, the last landscape R + 1 times) or a sequence of landscapes (a drawn training schedule)."""
    return list(range(steps)) if isinstance(steps, int) else [int(k) for k in steps]


def unroll(model, inputs, z, n_steps, stochastic: bool, build_graph: bool, cfg=None,
           noise: float | None = None):
    """The training unroll (ebt-method.md 2.4-2.5). Returns the candidate after each step and the
    energy of the candidate fed into each step. n_steps: a count or each step's landscape
    (`step_landscapes`). build_graph: keep what training needs, i.e. the second-order graph at every
    step, or at the last step only when truncating. `cfg` holds detach, truncate and langevin (an
    EBTConfig). stochastic: alpha drawn at random (training). noise: the Langevin std added before every
    step; None: cfg.langevin, in every phase as the official forward (its validation included); 0: none."""
    contexts = ContextCache(model, inputs)
    alpha = model.step_alpha(z.shape, stochastic)
    noise = cfg.langevin if noise is None else noise
    landscapes = step_landscapes(n_steps)
    logits, energies = [], []
    for k, land in enumerate(landscapes):
        if cfg.detach or not build_graph:
            z = z.detach()
        graph = build_graph and (not cfg.truncate or k == len(landscapes) - 1)
        # training ("full"): autograd, as the official code (an early truncated step's p keeps its graph
        # to earlier steps, e.g. to a learnable alpha); validation: the model's inference default
        p, E, g = energy_and_grad(model, contexts.get_ctx(land, graph), z, noise, create_graph=graph,
                                  explicit=False if build_graph else None)
        z = p - alpha * g
        if not build_graph:
            z = z.detach()
        logits.append(z)
        energies.append(E.detach())
    return logits, energies


GRAD_METHODS = ("jvp", "double", "explicit", "full")


def auto_grad_method(device: torch.device, compiled: bool) -> str:
    """The gradient method "auto" stands for: the fastest measured (benchmarks/RESULTS.md). The
    written-out gradient ("explicit") on CPU and whenever it is compiled; on CUDA without compiling,
    double backward (the eager explicit path has not been timed on a GPU)."""
    return "explicit" if compiled or device.type != "cuda" else "double"


def stepwise_ok(cfg) -> bool:
    """Whether the weights' gradient can be taken one step at a time (ebt-method.md 2.6): every step
    that builds a graph must start from a candidate that does not depend on the weights. True with
    detaching (S1), or with truncation and a fixed alpha (S2); else only the full graph is exact."""
    return bool(cfg.detach or (cfg.truncate and not cfg.alpha_learnable))


def _graph_leaves(ctx):
    """(ctx with every graph-carrying tensor replaced by a detached leaf, [(tensor, leaf), ...]).
    Steps backpropagate into the leaves; their gradients are sent through the context stream once."""
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


def unroll_backward(model, inputs, z, n_steps, stochastic: bool, cfg, loss_grad, loss_steps,
                    scale: float = 1.0, method: str = "double", on_step=None, recycle_start: bool = False,
                    noise: float | None = None):
    """The training unroll and its backward in one pass, one step's graph alive at a time. n_steps, stochastic
    and noise as in `unroll`.

    z: the starting candidate, or a one-element list holding it, which is emptied so that no caller
    keeps a (B, S, V) start alive through the unroll.
    Accumulates scale * dLoss/dtheta into the parameters' .grad, where Loss = sum over k in
    loss_steps of loss_k(z_k), z_k the output of step k, and loss_grad(k, z_k, scale) returns
    (loss_k, d(scale * loss_k)/dz_k) without a graph (`autograd_loss_grad` builds one from a plain
    loss; with grad_layout=(dtype, pad) the gradient in that layout, ebt.nn.to_layout). Exact (the same
    gradients as `unroll` + backward) when `stepwise_ok(cfg)`. on_step(k, z_k) sees every step's
    output (metrics) and must not keep it: on CPU its memory receives a later step's output
    (`Recycler`), as does the start's when recycle_start (the caller holds no other reference to it).
    loss_grad may write its gradient into out=, a tensor of z_k's shape and dtype, when given one.
    Returns the last candidate (detached), the energy fed into the first step and the step losses.

    method "double": each loss gradient is backpropagated from the step's output through that step's
    first-order gradient graph (reverse-over-reverse), then the graph is freed. "explicit": the same,
    with the first-order gradient written out by plain operations (model.energy_grad, ebt.energy_grad),
    so the backward is an ordinary first-order one (and compilable). "jvp" (ebt-method.md 2.6): the
    step runs first-order only; with v = dLoss/dz_next the weights receive -d/dtheta <alpha v, dE/dp>,
    the inner product being the energy's forward-mode derivative along alpha v (reverse-over-forward).
    For a model whose candidate enters through a bias-free linear map (`vocab_to_embed`, V -> D),
    "jvp" and "explicit" handle that map in closed form, so the second-order work runs through the
    backbone only and the (B, S, V) tensors see first-order work alone (see `_linear_map_step`).
    Every method backpropagates each context stream (and alpha's random draw) once, at the end.
    """
    if isinstance(z, list):  # handed over in a list, emptied here: the start is freed after the first step
        z = z.pop()
    if method not in ("jvp", "double", "explicit"):
        raise ConfigError(f"unknown gradient method {method!r}; choose 'jvp', 'double' or 'explicit'")
    if method == "explicit" and not hasattr(model, "energy_grad"):
        raise ConfigError(f"{type(model).__name__} has no written-out energy gradient: use method 'double'")
    explicit = method == "explicit"  # "explicit": "double" with the written-out dE/dp; the others autograd
    # alpha is drawn once, before the steps, as in `unroll`; like the contexts it is used through a leaf
    alpha_graph = model.step_alpha(z.shape, stochastic)
    alpha = alpha_graph.detach().requires_grad_(alpha_graph.requires_grad)
    noise = cfg.langevin if noise is None else noise
    landscapes = step_landscapes(n_steps)
    n_steps = len(landscapes)
    graph_steps = {k for k in loss_steps if not cfg.truncate or k == n_steps - 1}
    graph_keys = {model.landscape_key(landscapes[k]) for k in graph_steps}
    weights = [p for p in model.parameters() if p.requires_grad]
    linear_map = method in ("jvp", "explicit") and has_linear_map(model)
    fused = explicit and fused_ok(model, z)
    # CPU, float, softmax candidates: the (B, S, V) outputs of the closed-form step go into recycled memory
    pool = RECYCLER if linear_map and not fused and recyclable(model, z) else None
    contexts = {}  # landscape key -> (context for the steps, [(graph tensor, leaf)])
    energy0, losses = None, []
    for k, land in enumerate(landscapes):
        key = model.landscape_key(land)
        if key not in contexts:
            with torch.set_grad_enabled(key in graph_keys), phase("ebt.context"):  # first-order backward
                contexts[key] = _graph_leaves(model.context(inputs, land, first_order=True))
        ctx, leaves = contexts[key]
        z = z_in = z.detach()
        if noise > 0:
            z = _noised(z, noise, pool)
        z_step = z
        wanted = weights + [leaf for _, leaf in leaves]
        if k not in graph_steps:
            if fused:
                z, E = fused_step(model, ctx, z, alpha.detach())
            elif pool is not None and explicit:
                z, E = _recycled_step(model, ctx, z, alpha.detach(), pool)
            else:
                p, E, g = energy_and_grad(model, ctx, z, explicit=explicit)
                z = torch.addcmul(p.detach(), alpha.detach(), g, value=-1)
        elif linear_map:
            z, E, loss = _linear_map_step(model, ctx, z, alpha, lambda zn, **kw: loss_grad(k, zn, scale, **kw),
                                          wanted, explicit, fused, pool)
            losses.append(loss)
        elif method in ("double", "explicit"):
            p, E, g = energy_and_grad(model, ctx, z, create_graph=True, explicit=explicit)
            z_next = torch.addcmul(p.detach(), alpha, g, value=-1)
            # the loss's gradient at z_next, then one backward from z_next; inputs=: only what training
            # needs (not the candidate's logits, a leaf here)
            loss, v = loss_grad(k, z_next.detach(), scale)
            torch.autograd.backward(z_next, v, inputs=wanted + ([alpha] if alpha.requires_grad else []))
            z = z_next.detach()
            losses.append(loss)
        else:
            p, E, g = energy_and_grad(model, ctx, z)
            z = torch.addcmul(p.detach(), alpha.detach(), g, value=-1)
            loss, v = loss_grad(k, z, scale)
            with torch.enable_grad(), fwAD.dual_level():
                dual = fwAD.make_dual(p.detach(), alpha.detach() * v)
                directional = fwAD.unpack_dual(model.energy_from(ctx, dual)).tangent.sum()
            directional.neg().backward(inputs=wanted)  # d/dtheta of -<alpha v, dE/dp>
            _alpha_grad(alpha, _rowdot(g, v))
            losses.append(loss)
        # drop this step's tensors before the next: their graphs lead back to the step's input candidate
        if pool is not None:  # the caller's start only when it was handed over (recycle_start)
            _give_inputs(pool, z_in, z_step, owned=k > 0 or recycle_start)
        E, p, g, z_next, v, dual, directional, z_in, z_step = (E.detach(), None, None, None, None, None, None,
                                                               None, None)
        if on_step is not None:
            on_step(k, z)
        if k == 0:
            energy0 = E
    pairs = [pair for _, ps in contexts.values() for pair in ps] + [(alpha_graph, alpha)]
    pairs = [(t, leaf.grad) for t, leaf in pairs if leaf.grad is not None]
    if pairs:  # each context stream and alpha's draw: one backward with their leaves' gradients
        with phase("ebt.context_backward"):
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    return z, energy0, losses


def autograd_loss_grad(loss_fn, z, scale):
    """(loss_fn(z), d(scale * loss)/dz) by autograd, for losses without a closed-form gradient."""
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        loss = loss_fn(z)
        (v,) = torch.autograd.grad(loss * scale, z)
    return loss.detach(), v


def _rowdot(a, b):
    """<a, b> over the last dimension, one value per position, without an (.., V) temporary."""
    d = (a.unsqueeze(-2) @ b.unsqueeze(-1).to(a.dtype)).squeeze(-1)
    return d.to(torch.promote_types(d.dtype, torch.float32))


def _alpha_grad(alpha, gv):
    """z_next = p - alpha * g, so dLoss/dalpha = -<g, v> (gv, per position), summed to alpha's shape
    (a scalar, or one value per row and position)."""
    if alpha.requires_grad:
        _accumulate([alpha], [-gv.sum_to_size(alpha.shape).to(alpha.dtype)])


def _accumulate(tensors, grads):
    for t, g in zip(tensors, grads):
        if g is not None:
            t.grad = g if t.grad is None else t.grad + g


def has_linear_map(model) -> bool:
    """Whether the candidate enters through a bias-free linear map (`vocab_to_embed`, V -> D), which the
    closed-form steps (`_linear_map_step`, `fused_step`, `_recycled_step`) handle themselves."""
    return isinstance(getattr(model, "vocab_to_embed", None), torch.nn.Linear)


def fused_ok(model, z) -> bool:
    """Whether a step's (B, S, V) side runs as compiled kernels over tensors laid out once for the
    products (`fused_step`, `_linear_map_step`): the written-out gradient is compiled, the candidate
    enters through a bias-free linear map, and the products read z in another layout (autocast's
    dtype, or a padded width), whose casts and copies the fused kernels save. A float32 step on CPU
    keeps the plain path, where the update runs inside the matrix product (measured faster there)."""
    return (bool(getattr(model, "compile_grad", False))
            and has_linear_map(model) and vocab_layout(z) != (z.dtype, 0))


def _probs_in(z, softmax: bool, dtype, pad: int):
    """The candidate's input p (softmax(z), or z) laid out as the candidate map's products read it."""
    return to_layout(torch.softmax(z, -1) if softmax else z, dtype, pad)


def _update(z, wtu, a, softmax: bool):
    """z_next = p - alpha W^T u with p recomputed from z (a read of z instead of a float p kept alive);
    wtu may carry padding columns."""
    p = torch.softmax(z, -1) if softmax else z
    return p - a * wtu[..., : z.shape[-1]].to(p.dtype)


def _map_in(model, z):
    """(p in the products' layout, the map's weight in that layout (D, V + pad), dtype, pad)."""
    dt, pad = vocab_layout(z)
    return (compiled(_probs_in)(z, model.candidate_softmax, dt, pad),
            to_layout(model.vocab_to_embed.weight.detach(), dt, pad), dt, pad)


def fused_step(model, ctx, z, alpha):
    """One first-order step, (z_next, E): p = softmax(z), E and u = dE/dy at y = W p, z_next = p -
    alpha W^T u, with the (B, S, V) side as compiled kernels over tensors laid out once for the
    products (ebt.nn.vocab_layout): no float p is kept and nothing is cast or padded twice."""
    p, Wl, _, _ = _map_in(model, z)
    E, u = model.energy_grad_embedding(ctx, F.linear(p, Wl))
    del p
    a = alpha if torch.is_tensor(alpha) else torch.full((), float(alpha), device=z.device)  # no host copy
    return compiled(_update)(z, F.linear(u, Wl.t()), a, model.candidate_softmax), E


def _linear_map_step(model, ctx, z, alpha, loss_grad, wanted, explicit: bool, fused: bool, pool=None):
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
    the autocast dtype). fused ("explicit" where `fused_ok`): p and v are made once in the products'
    layout and the update and the loss run as compiled kernels. pool (a `Recycler`, CPU float): p,
    z_next and v are written into recycled memory, and p and v are given back at the end."""
    W = model.vocab_to_embed.weight
    with torch.enable_grad():
        with phase("ebt.step.embed"):
            if fused:  # p and the map in the products' dtype and padded width, made once
                p, Wl, dt, pad = _map_in(model, z)
                y = F.linear(p, Wl)
            else:
                p = _candidate_input(model, z, pool)
                del z
                y = vocab_in(p, W)
            y = y.detach().requires_grad_()
        with phase("ebt.step.energy_grad"):
            if explicit:
                E, u = model.energy_grad_embedding(ctx, y)
            else:
                E = model.energy_from_embedding(ctx, y)
                (u,) = torch.autograd.grad(E.sum(), y)
    with torch.no_grad(), phase("ebt.step.update_loss"):  # first-order work on (B, S, V) tensors only
        a = alpha.detach()
        ua = u.detach() * a  # the step in the width: z_next = p - W^T (alpha u)
        low = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else None
        if fused:
            z_next = compiled(_update)(z, F.linear(u.detach(), Wl.t()), a, model.candidate_softmax)
            del z
            loss, v = loss_grad(z_next, grad_layout=(dt, pad))
            wv = F.linear(v, Wl)
        else:
            if low is not None:  # keep z_next in float: a low-precision W^T u, then a float update
                z_next = torch.addcmul(p, a, vocab_out(u, W.t()), value=-1)
                p = p.to(low)  # from here p and v only enter matrix products, which would cast them anyway:
            else:  # the update inside the matrix product: no (B, S, V) temporary, one pass fewer
                z_next = _update_in_product(p, ua, W, pool)
            loss, v = loss_grad(z_next, **({} if pool is None else {"out": _take(pool, z_next)}))
            if low is not None:
                v = v.to(low)  # cast once, and half the memory held
            wv = vocab_in(v, W)  # W v (B, S, D): alpha's gradient and the direction, without (B, S, V) products
        _alpha_grad(alpha, _rowdot(u.detach(), wv))
        y_dot = wv * a
    others = [t for t in wanted if t is not W]
    with torch.enable_grad(), phase("ebt.step.second_order"):
        if explicit:  # d/d(y, theta) of -<u, y_dot>
            grads = torch.autograd.grad(u, [y] + others, grad_outputs=-y_dot.to(u.dtype), allow_unused=True)
        else:
            with fwAD.dual_level():
                e_dot = fwAD.unpack_dual(model.energy_from_embedding(ctx, fwAD.make_dual(y, y_dot))).tangent
            grads = torch.autograd.grad(-e_dot.sum(), [y] + others, allow_unused=True)
    _accumulate(others, grads[1:])
    if W.requires_grad:  # two (D x V) products over all positions; no (2N, V) concatenation
        with torch.no_grad(), phase("ebt.step.map_grad"):
            if fused:  # p and v are laid out already: the products read them as they are
                flat = lambda t: t.flatten(0, -2).to(dt)  # noqa: E731
                V = W.shape[1]
                dW = (flat(grads[0]).t() @ flat(p))[:, :V].to(W.dtype, copy=True)  # summed in W's dtype
                dW.sub_((flat(ua).t() @ flat(v))[:, :V])
            else:
                dW = vocab_t(grads[0], p).to(W.dtype)  # summed in W's dtype, as autograd accumulates
                vocab_t(ua, v, acc=dW, alpha=-1)
        _accumulate([W], [dW.to(W.dtype)])
    if pool is not None:
        pool.give(p, v)
    return z_next, E.detach(), loss


def recyclable(model, z) -> bool:
    """Whether a step's (B, S, V) tensors can live in recycled memory (`Recycler`, `_recycled_step`):
    on CPU without autocast, for softmax candidates (p is then a tensor of the step's own) entering
    through a bias-free linear map."""
    return (z.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and bool(getattr(model, "candidate_softmax", False)) and has_linear_map(model))


def _give_inputs(pool, z_in, z_step, owned: bool):
    """After a step, give back its input candidates, which nothing reads from here on: the noised one
    z_step (the step's own, when noise made one) and z_in when owned (not a start the caller holds)."""
    pool.give(*([z_step] if z_step is not z_in else []), *([z_in] if owned else []))


def _noised(z, noise: float, pool=None):
    """z + noise * N(0, 1) (`randn_`), the draws in recycled memory when pool is given."""
    r = randn_(_take(pool, z))
    # one pass, into the draws' memory (not where autograd must see z: out= has no backward)
    return torch.add(z, r, alpha=noise, out=None if z.requires_grad else r)


def _recycled_step(model, ctx, z, alpha, pool):
    """One first-order step of the written-out gradient with the linear map in closed form (z_next = p -
    W^T (alpha u), u = dE/dy at y = W p), p and z_next in recycled memory; p is given back. (z_next, E)."""
    W = model.vocab_to_embed.weight.detach()
    with torch.no_grad():
        p = _candidate_input(model, z, pool)
        E, u = model.energy_grad_embedding(ctx, vocab_in(p, W))
        z_next = _update_in_product(p, u * alpha, W, pool)
    pool.give(p)
    return z_next, E


def _update_in_product(p, ua, W, pool=None):
    """z_next = p - W^T ua as one matrix product with p added in (addmm), into recycled memory when
    pool is given: no (B, S, V) temporary."""
    z_next = _take(pool, p)
    torch.addmm(p.flatten(0, -2), ua.flatten(0, -2).to(W.dtype), W, alpha=-1, out=z_next.view(-1, p.shape[-1]))
    return z_next


def _take(pool, like):
    """An uninitialised tensor like `like`: recycled memory from pool, or new."""
    return torch.empty_like(like) if pool is None else pool.take(like.shape, like.dtype, like.device)


def _candidate_input(model, z, pool=None):
    """model.candidate_input(z), detached; with pool (softmax candidates only) into recycled memory."""
    if pool is None:
        return model.candidate_input(z).detach()
    return torch.softmax(z, -1, out=_take(pool, z))


# Recipe pieces every EBT shares (text, video, images): how many steps, which step size, alpha's group.

def repeat_range(cfg) -> range:
    """How many times a randomised training forward repeats each landscape: the official
    randint(max(rand_steps_min, 1), R + 2), i.e. max(min, 1) .. R + 1."""
    r = range(max(cfg.rand_steps_min, 1), cfg.rand_steps + 2)
    if not r:
        raise ConfigError(f"rand_steps_min={cfg.rand_steps_min} must be at most rand_steps + 1 = "
                          f"{r.stop - 1}: training repeats each landscape randint(max(min, 1), R + 2) times")
    return r


def _repeated(counts) -> tuple[int, ...]:
    """Landscape l repeated counts[l] times: the schedule of a training forward."""
    return tuple(k for k, c in enumerate(counts) for _ in range(c))


def step_range(cfg) -> list:
    """Every value `draw_steps` can give in training: the step counts with one landscape, else every
    schedule (each landscape's repeats in `repeat_range`, so at least `landscapes` steps)."""
    r = repeat_range(cfg)
    if cfg.landscapes == 1:
        return list(r)
    return [_repeated(c) for c in itertools.product(r, repeat=cfg.landscapes)]


def draw_steps(cfg, training: bool):
    """Steps of one forward (`step_landscapes`). Training with R = rand_steps > 0 (official): each
    landscape repeated a count drawn from `repeat_range`, one draw per landscape; with one landscape
    that count, else the schedule. Otherwise, and always in evaluation, `cfg.eval_steps` = landscapes + R
    (the official validation: each landscape once, the last R + 1 times)."""
    if training and cfg.rand_steps:
        r = repeat_range(cfg)
        counts = [int(torch.randint(r.start, r.stop, ())) for _ in range(cfg.landscapes)]
        return counts[0] if cfg.landscapes == 1 else _repeated(counts)
    return cfg.eval_steps


def inference_steps(cfg) -> int:
    """The default steps per landscape of thinking, the official advanced inference's: its
    randomize_mcmc_num_steps_min, or 1 where that is 0 (S2: 2, S1: 1). A "default"-variant EBT (no
    step tokens) counts its steps in all: the official default there is `landscapes` steps."""
    return cfg.landscapes if cfg.variant == "default" else (cfg.rand_steps_min or 1)


def inference_schedule(cfg, steps: int | None = None, final_landscape: bool = False) -> list[int]:
    """The landscape of each thinking step, as the official advanced inference orders them: `steps` (None:
    `inference_steps`) on every landscape in turn; with final_landscape [infer_steps_final_landscape] one
    step on each earlier landscape and `steps` on the last. A "default"-variant EBT takes `steps` in all
    [infer_ebt_num_steps], on landscapes 0, 1, .. (the last reused; without step tokens they are one)."""
    n, L = steps or inference_steps(cfg), cfg.landscapes
    if cfg.variant == "default":
        return [min(k, L - 1) for k in range(n)]
    return [k for k in range(L) for _ in range(n if k == L - 1 or not final_landscape else 1)]


def recipe_alpha(alpha: torch.Tensor, cfg, draw_shape, stochastic: bool) -> torch.Tensor:
    """alpha clamped at alpha_min; in training with alpha_rand_scale s > 1, drawn U[alpha/s, alpha*s]
    independently for each element of `draw_shape` (per row and position, or per image)."""
    alpha = alpha.clamp(min=cfg.alpha_min)
    if stochastic and cfg.alpha_rand_scale > 1:
        s = cfg.alpha_rand_scale
        u = torch.rand(*draw_shape, device=alpha.device, dtype=alpha.dtype)
        alpha = alpha * (1 / s + u * (s - 1 / s))
    return alpha


def alpha_param_groups(alpha: torch.nn.Parameter, cfg) -> list[dict]:
    """alpha's own optimizer group, as the official trainer's: lr x its multiplier, no weight decay. A fixed
    alpha keeps its (idle) group too, so the groups and their learning rates are the official ones."""
    return [{"params": [alpha], "lr_mult": cfg.alpha_lr_mult, "weight_decay": 0.0, "name": "alpha"}]


# ------------------------------------------------------------------------------------------ inference

SELECT = ("min", "max", "drop")


@dataclass
class ThinkConfig:
    # steps per landscape [infer_ebt_num_steps]; None: the official default, `inference_steps` (S2: 2, S1: 1);
    # a "default"-variant EBT takes this many in all (`inference_schedule`)
    steps: int | None = bounded(None, int, 1)
    # [infer_steps_final_landscape] one step on each earlier landscape, `steps` on the last
    final_landscape: bool = False
    candidates: int = bounded(1, int, 1)  # independent random starts; one is kept per (row, position)
    select: str = "min"  # min: lowest final energy; max: highest; drop: largest energy decrease
    alpha: float | None = bounded(None, float, 0, lo_open=True)  # absolute step size instead of the model's
    alpha_factor: float = bounded(1.0, float, 0, lo_open=True)  # multiplies the step size (after `alpha`)
    # Langevin std on the candidate before each step [infer_langevin_dynamics_noise]; None: the trained std
    # (EBTConfig.langevin, S2: 3), as the official inference; 0: none
    noise: float | None = bounded(None, float, 0)
    # [infer_accept_lower_energies] a position keeps a step only where the energy at the proposal (no noise,
    # the same landscape) is below its step's energy; elsewhere it keeps its (noised) candidate
    accept_lower: bool = False
    tol: float | None = bounded(None, float, 0)  # adaptive: a position stops once |energy change| < tol (None: run all steps)
    trace: bool = False  # keep the selected candidate's energy at every step (a (steps+1, B, S) tensor)
    score_final: bool = True  # measure the final candidate's energy; False saves that pass when nothing
    # needs it (one candidate, no acceptance, no adaptive stop, no trace): `energy` is then the energy of
    # the candidate that entered the last step

    def __post_init__(self):
        check_bounds(self)
        if self.select not in SELECT:
            raise ConfigError(f"unknown selection rule {self.select!r}; choose one of {SELECT}")


@dataclass
class Thought:
    z: torch.Tensor  # the selected candidate per (row, position) (for text: logits (B, S, V))
    energy: torch.Tensor  # its final energy (B, S), without noise on the last landscape (official get_energy)
    initial_energy: torch.Tensor  # its energy at the start (B, S), fed into the first step (noise included)
    steps_used: torch.Tensor  # optimisation steps actually taken per position (B, S), averaged over candidates
    passes: int  # energy evaluations (forward + first-order backward) per position, all candidates
    trace: torch.Tensor | None = None  # (steps+1, B, S) energy fed into each step, then the final energy


def _expand(mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A per-(row, position) mask (E's shape) broadcastable over the candidate's remaining dimensions."""
    return mask.reshape(*mask.shape, *[1] * (z.dim() - mask.dim()))


def last_landscape(model) -> int:
    """Where the final candidate is scored: the last landscape (official get_energy(mcmc_num_steps - 1))."""
    return model.cfg.ebt.landscapes - 1


def _one_candidate(model, contexts, z, landscapes, alpha, noise, cfg: ThinkConfig, trace: bool,
                   own: bool = False):
    """Run one start through the steps (`landscapes`: each step's), then score the final candidate
    without noise on the last landscape. Memory is flat in the number of steps: only the current
    candidate, its energy and gradient are kept (and a (B, S) energy per step when tracing). own: z is
    the caller's to recycle (drawn by think itself)."""
    if not (cfg.accept_lower or cfg.tol is not None or trace):
        if fused_ok(model, z):
            return _one_candidate_fused(model, contexts, z, landscapes, alpha, noise, cfg)
        if recyclable(model, z) and explicit_for(model, z.device):
            return _one_candidate_fused(model, contexts, z, landscapes, alpha, noise, cfg, RECYCLER, own)
    masked = cfg.accept_lower or cfg.tol is not None
    last_unscored = not (cfg.score_final or cfg.candidates > 1 or masked or trace)
    last = last_landscape(model)
    E0 = E = final = steps_used = active = None
    history, passes = ([] if trace else None), 0
    for k, land in enumerate(landscapes):
        ctx = contexts.get_ctx(land, False)
        zn = _noised(z, noise) if noise > 0 else z  # the step's input: Langevin noise before every step
        p, E_k, g = energy_and_grad(model, ctx, zn)
        E_k, passes = E_k.detach(), passes + 1
        if k == 0:
            E0, steps_used, active = E_k, torch.zeros_like(E_k), torch.ones_like(E_k, dtype=torch.bool)
        elif cfg.tol is not None:
            active = active & ((E_k - E).abs() >= cfg.tol)
            if not bool(active.any()):  # every position has converged; without noise z was just scored
                same = model.landscape_key(land) == model.landscape_key(last)
                final = E_k if noise == 0 and same else None
                break
        E = E_k
        if trace:
            history.append(E)
        z_new = (p - alpha * g).detach()
        if last_unscored and k == len(landscapes) - 1:  # the official unroll: N steps, N energy evaluations
            return z_new, E, E0, steps_used + 1, passes, history
        if not masked:  # every position takes every step
            z = z_new
            steps_used += 1
            continue
        take, keep = active, z
        if cfg.accept_lower:  # the energy at the proposal, no noise, on this step's landscape (official)
            E_new = model.energy_from(ctx, model.candidate_input(z_new)).detach()
            passes += 1
            take = take & (E_new < E)
            keep = torch.where(_expand(active, z), zn, z) if zn is not z else z  # rejected: noised candidate
        steps_used += take
        z = torch.where(_expand(take, z), z_new, keep)
    zn = None  # the last step's noised input: dead before the final pass (memory flat in the steps)
    if final is None:  # the final candidate's energy, no noise, on the last landscape (official get_energy)
        final = energy_and_grad(model, contexts.get_ctx(last, False), z)[1].detach()
        passes += 1
    if trace:
        history.append(final)
    return z, final, E0, steps_used, passes, history


def _one_candidate_fused(model, contexts, z, landscapes, alpha, noise, cfg: ThinkConfig, pool=None,
                         own=False):
    """`_one_candidate` where every position takes every step, each step one `fused_step`, or with
    pool (CPU, `recyclable`) one `_recycled_step`: the candidates live in recycled memory, the start
    too when own."""
    E0 = None
    for k, land in enumerate(landscapes):
        z_in = z
        if noise > 0:
            z = _noised(z, noise, pool)
        z_step = z
        if pool is None:
            z, E = fused_step(model, contexts.get_ctx(land, False), z, alpha)
        else:
            z, E = _recycled_step(model, contexts.get_ctx(land, False), z, alpha, pool)
            _give_inputs(pool, z_in, z_step, owned=k > 0 or own)
        z_in = z_step = None
        E0 = E if E0 is None else E0
    passes = len(landscapes)
    if cfg.score_final or cfg.candidates > 1:  # the final candidate's energy, no noise, on the last landscape
        pf = _candidate_input(model, z, pool)
        E = model.energy_from(contexts.get_ctx(last_landscape(model), False), pf)
        if pool is not None:
            pool.give(pf)
        passes += 1
    return z, E, E0, torch.full_like(E, float(len(landscapes))), passes, None


@torch.no_grad()
def think(model, inputs, cfg: ThinkConfig | None = None, init: torch.Tensor | None = None,
          contexts=None) -> Thought:
    """System 2 thinking at inference, the official advanced inference: the steps run on the landscapes
    of `inference_schedule`, each from the candidate plus Langevin noise (`cfg.noise`; None: the trained
    std), and the final candidate is scored without noise on the last landscape, so N steps cost N + 1
    energy evaluations per candidate (N with score_final=False and one candidate). The random starts and
    the noise come from torch's global generator: seed it (ebt.evaluate.seeded) for repeatable results.

    contexts: anything with get_ctx(landscape, graph) (default: built from `inputs` on demand); cached
    generation passes its KV caches here and `inputs` then only shapes the candidates."""
    cfg = cfg or ThinkConfig()
    landscapes = inference_schedule(model.cfg.ebt, cfg.steps, cfg.final_landscape)
    n_steps = len(landscapes)
    noise = model.cfg.ebt.langevin if cfg.noise is None else cfg.noise
    alpha = (cfg.alpha if cfg.alpha is not None else model.step_alpha((1,), False)) * cfg.alpha_factor
    contexts = contexts if contexts is not None else ContextCache(model, inputs)
    best = None
    steps_total, passes = None, 0
    for c in range(cfg.candidates):
        z0 = init if (init is not None and c == 0) else model.init_candidate(inputs)
        own = init is None or c > 0  # drawn here: its memory may be recycled
        z, E, E0, used, n, hist = _one_candidate(model, contexts, z0, landscapes, alpha, noise, cfg,
                                                 cfg.trace, own)
        passes += n
        steps_total = used if steps_total is None else steps_total + used
        if cfg.trace:  # pad an early stop to the full length so traces line up
            hist = torch.stack(hist + [hist[-1]] * (n_steps + 1 - len(hist)))
        score = {"min": -E, "max": E, "drop": E0 - E}[cfg.select]
        if best is None:
            best = [z, E, E0, score, hist]
            continue
        better = score > best[3]
        m = _expand(better, z)
        best = [torch.where(m, z, best[0]), torch.where(better, E, best[1]), torch.where(better, E0, best[2]),
                torch.where(better, score, best[3]),
                torch.where(better, hist, best[4]) if cfg.trace else None]
    return Thought(z=best[0], energy=best[1], initial_energy=best[2], steps_used=steps_total / cfg.candidates,
                   passes=passes, trace=best[4])
