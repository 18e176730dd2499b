"""Which way each step is taken, decided once per run: `resolve_plan` returns a frozen `Plan`.

The trainer, the CLI and generation call `resolve_plan(model, device, ...)` once and pass the plan
down; the loops ask it for their steps (`Plan.think_step` for ebt.think, `Plan.train_step` for the
training objective). The model carries no path flags, and this module is the only one that looks at
a device, a dtype or autocast to choose a path. Every choice computes what the reference loop
(ebt.think) computes, to rounding (tested in float64).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from ebt.errors import ConfigError
from ebt.fast.memory import Recycler
from ebt.fast.stepwise import Method, unroll_backward
from ebt.fast.vocab_side import FusedStep, RecycledStep, WrittenOutStep
from ebt.nn import vocab_layout
from ebt.think import Step

GRAD_METHODS = ("jvp", "double", "explicit", "full")


def auto_grad_method(device: torch.device, compiled: bool) -> str:
    """The gradient method "auto" stands for: the fastest measured (benchmarks/RESULTS.md). The
    written-out gradient ("explicit") on CPU and whenever it is compiled; on CUDA without compiling,
    double backward."""
    return "explicit" if compiled or device.type != "cuda" else "double"


def written_out(model) -> bool:
    """Whether the model has a written-out energy gradient (model.energy_grad, ebt.fast.written_out)."""
    return callable(getattr(model, "energy_grad", None))


def explicit_for(model, device: torch.device, compiled: bool = False) -> bool:
    """Whether thinking and validation take the written-out gradient by default: always when it is
    compiled (compiling concerns nothing else), else per `auto_grad_method`'s rule."""
    return written_out(model) and (compiled or auto_grad_method(device, False) == "explicit")


def stepwise_ok(cfg) -> bool:
    """Whether the weights' gradient can be taken one step at a time (docs/method.md 2.6): every step
    that builds a graph must start from a candidate that does not depend on the weights. True with
    detaching (S1), or with truncation and a fixed alpha (S2); else only the full graph is exact."""
    return bool(cfg.detach or (cfg.truncate and not cfg.alpha_learnable))


def has_linear_map(model) -> bool:
    """Whether the candidate enters through a bias-free linear map (`vocab_to_embed`, V -> D), which the
    closed-form steps (ebt.fast.vocab_side) handle themselves."""
    return isinstance(getattr(model, "vocab_to_embed", None), torch.nn.Linear)


def fused_ok(model, z, compiled: bool, pad: bool | None = None) -> bool:
    """Whether a step's (B, S, V) side runs as compiled kernels over tensors laid out once for the
    products (vocab_side.fused_step): compiled, a linear candidate map, and the products read z in
    another layout (autocast's dtype, or a padded width), whose casts and copies the fused kernels
    save. A float32 step on CPU keeps the plain path, where the update runs inside the matrix product."""
    return compiled and has_linear_map(model) and vocab_layout(z, pad) != (z.dtype, 0)


def recyclable(model, z) -> bool:
    """Whether a step's (B, S, V) tensors can live in recycled memory (vocab_side.recycled_step): on CPU
    without autocast, for softmax candidates (p is then a tensor of the step's own) entering through a
    bias-free linear map."""
    return (z.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and bool(getattr(model, "candidate_softmax", False)) and has_linear_map(model))


@dataclass(frozen=True)
class Plan:
    """A run's paths. Build it with `resolve_plan` (which resolves "auto" per device); tests build
    variants with dataclasses.replace or resolve_plan's arguments."""
    grad: str = "double"  # training's second-order term: "double", "jvp", "explicit" or "full" (whole graph)
    explicit: bool = False  # thinking and validation take dE/dp written out (else autograd)
    compiled: bool = False  # torch.compile the written-out gradient, the context stream, the loss gradient
    # and each step's (B, S, V) side
    cuda_graph: bool = False  # training steps captured as CUDA graphs (ebt.fast.cuda_graph.CapturedStep)
    recycle: bool = True  # CPU: reuse dead (B, S, V) tensors' memory (False: the same steps, fresh memory)
    fused: bool = True  # compiled: the (B, S, V) side as fused kernels where the layout differs (`fused_ok`)
    token_fn: bool = True  # static decoding: a token's context write and thinking, one function (fast.decode)
    pad_vocab: bool | None = None  # pad V-sized products to an aligned width; None: per device (ebt.nn)
    energy_gap: bool = True  # training logs E(first) - E(final): one extra forward without a graph
    pool: Recycler | None = field(default=None, compare=False)  # None: a Recycler per `recycle`

    def __post_init__(self):
        if self.grad not in GRAD_METHODS:
            raise ConfigError(f"unknown gradient method {self.grad!r}; choose one of {GRAD_METHODS}")
        if self.pool is None:
            object.__setattr__(self, "pool", Recycler(keep=6 if self.recycle else 0))

    def think_step(self, model, cfg=None) -> Step:
        """The step thinking with `cfg` (an ebt.think.ThinkConfig) takes, or with cfg None validation's
        (plain steps). Fused or recycled steps serve where every position takes every step."""
        if not self.explicit:
            return Step(model)
        every = cfg is not None and not (cfg.masked or cfg.trace)
        probe = _candidate_probe(model)
        if every and fused_ok(model, probe, self.compiled and self.fused, self.pad_vocab):
            return FusedStep(model, self.compiled, self.pad_vocab)
        if every and recyclable(model, probe):
            return RecycledStep(model, self.pool, self.compiled, self.pad_vocab)
        return WrittenOutStep(model, self.compiled, self.pad_vocab)

    def train_step(self, model, z):
        """The stepwise unroll-and-backward (ebt.fast.stepwise.unroll_backward) for this model and start
        z, its method fixed; None where the whole graph is kept ("full")."""
        if self.grad == "full":
            return None
        linear_map = self.grad in ("jvp", "explicit") and has_linear_map(model)
        fused = self.grad == "explicit" and fused_ok(model, z, self.compiled and self.fused, self.pad_vocab)
        pool = self.pool if linear_map and not fused and recyclable(model, z) else None
        return partial(unroll_backward, method=Method(self.grad, linear_map, fused, pool, self.compiled,
                                                      self.pad_vocab))


def _candidate_probe(model) -> torch.Tensor:
    """An empty candidate of the model's width, dtype and device: what the predicates read of one."""
    w = next(model.parameters())
    return torch.empty(0, model.candidate_size, dtype=w.dtype, device=w.device)


def resolve_plan(model, device=None, compile: bool = False, cuda_graph: bool = False, grad: str = "auto",
                 explicit: bool | None = None, **options) -> Plan:
    """The plan for `model` on `device` (None: its parameters'). grad "auto": the fastest measured
    (`auto_grad_method`); "full" wherever stepping is not exact (`stepwise_ok`) or the model has no
    written-out gradient (the official algorithm). explicit None: `explicit_for`. compile: the
    written-out gradient and each step's (B, S, V) side through torch.compile (implies explicit).
    options: the other Plan fields (recycle, fused, token_fn, pad_vocab, energy_gap, pool)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if grad not in ("auto", *GRAD_METHODS):
        raise ConfigError(f"unknown gradient method {grad!r}; choose one of {GRAD_METHODS}")
    recipe = getattr(getattr(model, "cfg", None), "ebt", None)
    if grad == "auto":
        grad = auto_grad_method(device, compile) if written_out(model) else "full"
    if recipe is not None and not stepwise_ok(recipe):
        grad = "full"
    if grad == "explicit" and not written_out(model):
        raise ConfigError(f"{type(model).__name__} has no written-out energy gradient: use method 'double'")
    if explicit and not written_out(model):
        raise ConfigError(f"{type(model).__name__} has no written-out energy gradient to think with")
    explicit = explicit_for(model, device, compile) if explicit is None else bool(explicit)
    return Plan(grad=grad, explicit=explicit, compiled=compile, cuda_graph=cuda_graph, **options)

