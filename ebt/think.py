"""The thinking loop: optimise a candidate prediction by gradient descent on the energy.

One module for every EBT and every modality. A model provides these hooks and nothing here knows what
a candidate is (vocabulary logits, a frame's features, an image):

    model.context(inputs, landscape, first_order=False) -> ctx   what does not depend on the candidate
                                            (cacheable); first_order: no second-order graph will run
                                            through it (fused attention kernels may serve)
    model.landscape_key(k)            -> key     steps with the same key share one ctx
    model.candidate_input(z)          -> p       e.g. softmax for text, identity for continuous data
    model.energy_from(ctx, p)         -> E       one energy per predicted position, (B, S)
    model.step_alpha(shape, random)   -> alpha   the step size (a scalar or per row and position)
    model.init_candidate(inputs)      -> z0      a random start
    model.cfg.ebt                     -> EBTConfig   landscapes, Langevin std, step counts (ebt.recipe)

One step is   p = candidate_input(z + noise);  E = energy(p);  z_next = p - alpha * dE/dp  (`update`).
`unroll` is what training (and the official validation) runs; `think` is inference-time System 2
thinking: more steps, several candidates with a selection rule, step acceptance and adaptive stopping.
Here dE/dp is taken by autograd (`Step`); ebt.fast holds faster ways to take the same step (the gradient
written out, compiled, in recycled memory, one step's graph at a time in training), which a run picks
once (ebt.fast.plan) and hands to these loops as a `step`.

The protocol is the official NLP code's (alexiglad/EBT, model/nlp/ebt.py): the Langevin noise of std
`langevin` is added before every step in every phase, validation and inference included (noise=0 switches
it off); which landscape each step runs on is a schedule (`ebt.recipe.draw_steps` in training,
`EBTConfig.eval_steps` in validation, `ebt.recipe.inference_schedule` when thinking); the final candidate
is scored without noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebt.config import bounded, check_bounds
from ebt.errors import ConfigError
from ebt.rand import randn_
from ebt.recipe import inference_schedule, step_landscapes


def update(p: torch.Tensor, g: torch.Tensor, alpha) -> torch.Tensor:
    """The step: z_next = p - alpha * g, in one pass (no alpha * g temporary)."""
    if not torch.is_tensor(alpha):
        dtype = torch.promote_types(p.dtype, torch.float32)  # as a Python number would enter the product
        alpha = torch.full((), float(alpha), dtype=dtype, device=p.device)  # a fill: no host-to-device copy
    return torch.addcmul(p, alpha, g, value=-1)


def noised(z: torch.Tensor, noise: float, take=torch.empty_like) -> torch.Tensor:
    """z + noise * N(0, 1) (`randn_`), the draws written into take(z) (fast paths: recycled memory)."""
    r = randn_(take(z))
    # one pass, into the draws' memory (not where autograd must see z: out= has no backward)
    return torch.add(z, r, alpha=noise, out=None if z.requires_grad else r)


def energy_and_grad(model, ctx, z, create_graph: bool = False, energy=None):
    """(p, E, dE/dp) at candidate z, by autograd. Works under torch.no_grad() too (inference).
    energy: the energy of (ctx, p); None: model.energy_from."""
    with torch.enable_grad():
        if not z.requires_grad:
            # the leaf is z, not p: autocast caches its casts of leaves that require grad until the
            # autocast region ends, which would keep every step's candidate alive while thinking
            z = z.detach().requires_grad_()
        p = model.candidate_input(z)
        if p is z:  # identity candidate_input (continuous data): a non-leaf view for the same reason
            p = z.view_as(z)
        E = (energy or model.energy_from)(ctx, p)
        (g,) = torch.autograd.grad(E.sum(), p, create_graph=create_graph)
    return p, E, g


class ContextCache(dict):
    """Contexts per landscape key, built on first use (by `build`, default model.context). `graph` ones
    keep the autograd graph to the weights (a step that builds the second-order graph needs them); the
    others are constants."""

    def __init__(self, model, inputs, build=None):
        super().__init__()
        self.model, self.inputs, self.build = model, inputs, build or model.context

    def get_ctx(self, k: int, graph: bool):
        key = (self.model.landscape_key(k), graph)
        if key not in self:
            with torch.set_grad_enabled(graph):  # no graph: fused attention kernels may serve
                self[key] = self.build(self.inputs, k, first_order=not graph)
        return self[key]


class Step:
    """How the loops take a first-order step: the reference, dE/dp by autograd. ebt.fast.plan hands out
    faster ones (Plan.think_step) that compute the same numbers to rounding."""

    pool = None  # recycled memory (ebt.fast.memory.Recycler) for the noise and the dead candidates

    def __init__(self, model):
        self.model = model

    def context(self, inputs, landscape: int, first_order: bool = False):
        return self.model.context(inputs, landscape, first_order=first_order)

    def start(self, inputs) -> torch.Tensor:
        return self.model.init_candidate(inputs)

    def grad(self, ctx, z):
        """(p, E, dE/dp) at z (noise already added), first order."""
        return energy_and_grad(self.model, ctx, z)

    def __call__(self, ctx, z, alpha):
        """(z_next, E): one step from z (noise already added)."""
        p, E, g = self.grad(ctx, z)
        return update(p, g, alpha).detach(), E.detach()

    def score(self, ctx, z) -> torch.Tensor:
        """The energy of z (the final candidate's: no step follows)."""
        return self.grad(ctx, z)[1].detach()


def unroll(model, inputs, z, n_steps, stochastic: bool, build_graph: bool, cfg=None,
           noise: float | None = None, step: Step | None = None):
    """The training unroll (docs/method.md 2.4-2.5). Returns the candidate after each step and the
    energy of the candidate fed into each step. n_steps: a count or each step's landscape
    (`step_landscapes`). build_graph: keep what training needs, i.e. the second-order graph at every
    step, or at the last step only when truncating. `cfg` holds detach, truncate and langevin (an
    EBTConfig; None: model.cfg.ebt). stochastic: alpha drawn at random (training). noise: the Langevin
    std added before every step; None: cfg.langevin, in every phase as the official forward (its
    validation included); 0: none. step: how steps without a graph are taken (validation) and their
    contexts built (default: the reference `Step`)."""
    step = step or Step(model)
    cfg = cfg or model.cfg.ebt
    contexts = ContextCache(model, inputs, step.context)
    alpha = model.step_alpha(z.shape, stochastic)
    noise = cfg.langevin if noise is None else noise
    landscapes = step_landscapes(n_steps)
    logits, energies = [], []
    for k, land in enumerate(landscapes):
        if cfg.detach or not build_graph:
            z = z.detach()
        graph = build_graph and (not cfg.truncate or k == len(landscapes) - 1)
        ctx = contexts.get_ctx(land, graph)
        zn = noised(z, noise) if noise > 0 else z
        # training ("full"): autograd, as the official code (an early truncated step's p keeps its graph
        # to earlier steps, e.g. to a learnable alpha); validation: the step handed in
        p, E, g = energy_and_grad(model, ctx, zn, create_graph=graph) if build_graph else step.grad(ctx, zn)
        z = update(p, g, alpha)
        if not build_graph:
            z = z.detach()
        logits.append(z)
        energies.append(E.detach())
    return logits, energies


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
    # adaptive: a position stops once |energy change| < tol (None: run all steps)
    tol: float | None = bounded(None, float, 0)
    trace: bool = False  # keep the selected candidate's energy at every step (a (steps+1, B, S) tensor)
    score_final: bool = True  # measure the final candidate's energy; False saves that pass when nothing
    # needs it (one candidate, no acceptance, no adaptive stop, no trace): `energy` is then the energy of
    # the candidate that entered the last step

    def __post_init__(self):
        check_bounds(self)
        if self.select not in SELECT:
            raise ConfigError(f"unknown selection rule {self.select!r}; choose one of {SELECT}")

    @property
    def masked(self) -> bool:
        """Whether positions may skip steps (acceptance, adaptive stop): the loop keeps every candidate."""
        return self.accept_lower or self.tol is not None


@dataclass
class Thought:
    z: torch.Tensor  # the selected candidate per (row, position) (for text: logits (B, S, V))
    energy: torch.Tensor  # its final energy (B, S), without noise on the last landscape (official get_energy)
    initial_energy: torch.Tensor  # its energy at the start (B, S), fed into the first step (noise included)
    steps_used: torch.Tensor  # optimisation steps taken per position (B, S), averaged over candidates
    passes: int  # energy evaluations (forward + first-order backward) per position, all candidates
    trace: torch.Tensor | None = None  # (steps+1, B, S) energy fed into each step, then the final energy


def _expand(mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A per-(row, position) mask (E's shape) broadcastable over the candidate's remaining dimensions."""
    return mask.reshape(*mask.shape, *[1] * (z.dim() - mask.dim()))


def last_landscape(model) -> int:
    """Where the final candidate is scored: the last landscape (official get_energy(mcmc_num_steps - 1))."""
    return model.cfg.ebt.landscapes - 1


def _descend(model, contexts, z, landscapes, alpha, noise, cfg: ThinkConfig, step: Step, own: bool):
    """Run one start through the steps (`landscapes`: each step's), then score the final candidate
    without noise on the last landscape. Memory is flat in the number of steps: only the current
    candidate, its energy and gradient are kept (and a (B, S) energy per step when tracing). own: z is
    the loop's to recycle (drawn by think itself) when the step recycles (step.pool)."""
    pool = step.pool if not cfg.masked else None
    take = torch.empty_like if pool is None else pool.take_like
    last = last_landscape(model)
    E0 = E = final = used = active = None
    history, passes = ([] if cfg.trace else None), 0
    for k, land in enumerate(landscapes):
        ctx = contexts.get_ctx(land, False)
        zn = noised(z, noise, take) if noise > 0 else z  # the step's input: Langevin noise before every step
        z_new, E_k = step(ctx, zn, alpha)
        passes += 1
        if pool is not None:  # the step's inputs are dead now: the noised one, and z unless the caller's
            pool.give(*([zn] if zn is not z else []), *([z] if k > 0 or own else []))
        if k == 0:
            E0, used, active = E_k, torch.zeros_like(E_k), torch.ones_like(E_k, dtype=torch.bool)
        elif cfg.tol is not None:
            active = active & ((E_k - E).abs() >= cfg.tol)
            if not bool(active.any()):  # every position has converged; without noise z was just scored
                same = model.landscape_key(land) == model.landscape_key(last)
                final = E_k if noise == 0 and same else None
                break
        E = E_k
        if cfg.trace:
            history.append(E)
        if not cfg.masked:  # every position takes every step
            z, used = z_new, used + 1
            continue
        take_step, keep = active, z
        if cfg.accept_lower:  # the energy at the proposal, no noise, on this step's landscape (official)
            E_new = model.energy_from(ctx, model.candidate_input(z_new)).detach()
            passes += 1
            take_step = take_step & (E_new < E)
            keep = torch.where(_expand(active, z), zn, z) if zn is not z else z  # rejected: noised candidate
        used = used + take_step
        z = torch.where(_expand(take_step, z), z_new, keep)
    zn = z_new = None  # the last step's tensors: dead before the final pass (memory flat in the steps)
    if final is None and (cfg.score_final or cfg.candidates > 1 or cfg.masked or cfg.trace):
        final = step.score(contexts.get_ctx(last, False), z)  # no noise, on the last landscape (official)
        passes += 1
    elif final is None:  # the official unroll: N steps, N energy evaluations
        final = E
    if cfg.trace:
        history.append(final)
    return z, final, E0, used, passes, history


@torch.no_grad()
def think(model, inputs, cfg: ThinkConfig | None = None, init: torch.Tensor | None = None,
          contexts=None, step: Step | None = None) -> Thought:
    """System 2 thinking at inference, the official advanced inference: the steps run on the landscapes
    of `inference_schedule`, each from the candidate plus Langevin noise (`cfg.noise`; None: the trained
    std), and the final candidate is scored without noise on the last landscape, so N steps cost N + 1
    energy evaluations per candidate (N with score_final=False and one candidate). The random starts and
    the noise come from torch's global generator: seed it (ebt.runtime.seeded) for repeatable results.

    contexts: anything with get_ctx(landscape, graph) (default: built from `inputs` on demand); cached
    generation passes its KV caches here and `inputs` then only shapes the candidates. step: how each
    step is taken (default: the reference `Step`; a run's plan hands out faster ones, Plan.think_step)."""
    cfg = cfg or ThinkConfig()
    if contexts is None and inputs.shape[1] > model.cfg.context_length:
        raise ConfigError(f"the input holds {inputs.shape[1]} positions but the model reads at most "
                          f"{model.cfg.context_length} (its context_length): pass the last "
                          f"{model.cfg.context_length} or split the input into windows")
    step = step or Step(model)
    landscapes = inference_schedule(model.cfg.ebt, cfg.steps, cfg.final_landscape)
    noise = model.cfg.ebt.langevin if cfg.noise is None else cfg.noise
    alpha = (cfg.alpha if cfg.alpha is not None else model.step_alpha((1,), False)) * cfg.alpha_factor
    contexts = contexts if contexts is not None else ContextCache(model, inputs, step.context)
    best, steps_total, passes = None, None, 0
    for c in range(cfg.candidates):
        z0 = init if (init is not None and c == 0) else step.start(inputs)
        z, E, E0, used, n, hist = _descend(model, contexts, z0, landscapes, alpha, noise, cfg, step,
                                           own=init is None or c > 0)  # drawn here: its memory may be reused
        passes += n
        steps_total = used if steps_total is None else steps_total + used
        if cfg.trace:  # pad an early stop to the full length so traces line up
            hist = torch.stack(hist + [hist[-1]] * (len(landscapes) + 1 - len(hist)))
        best = _select(best, [z, E, E0, {"min": -E, "max": E, "drop": E0 - E}[cfg.select], hist])
    return Thought(z=best[0], energy=best[1], initial_energy=best[2], steps_used=steps_total / cfg.candidates,
                   passes=passes, trace=best[4])


def _select(best, new):
    """Per (row, position), the candidate with the higher score: [z, E, E0, score, trace or None]."""
    if best is None:
        return new
    better = new[3] > best[3]
    return [torch.where(_expand(better, new[0]), new[0], best[0]),
            *(torch.where(better, a, b) for a, b in zip(new[1:4], best[1:4])),
            None if new[4] is None else torch.where(better, new[4], best[4])]
