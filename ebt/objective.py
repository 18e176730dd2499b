"""The training step of an EBT: the loss on a batch, its forward and backward (docs/method.md 2.4-2.5).

`forward` unrolls the thinking steps from random starts (ebt.think.unroll) and puts the loss on the
candidates (cross-entropy for tokens, Smooth L1 for frames and images), keeping the whole unroll's graph
for one backward. `train_step` takes the same gradients with one step's graph alive at a time (the plan's
stepwise backward, ebt.fast.stepwise) wherever the recipe allows. Both return the metrics dict the
trainer logs. The models' forward calls `forward` (and `image_forward`), so model(window) works as for
any nn.Module (DDP, FSDP, evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ebt.fast.plan import Plan, resolve_plan
from ebt.fast.stepwise import Losses, autograd_loss_grad
from ebt.fast.vocab_side import mapped_update
from ebt.models.dit import noise_at_level
from ebt.models.transformer import (check_window, compiled_token_loss_grad, compiled_token_nll,
                                   prediction_loss, token_loss_grad, token_loss_grad_pointwise)
from ebt.nn import compiled, to_layout
from ebt.recipe import draw_steps, steps_of
from ebt.think import unroll


def trains_itself(model) -> bool:
    """Whether `train_step` serves the model: an autoregressive EBT (tokens or frames). The image EBT and
    the baselines train by model(batch)["loss"].backward()."""
    cfg = getattr(model, "cfg", None)
    return cfg is not None and cfg.model == "ebt" and cfg.candidate != "image"


@dataclass
class Batch:
    """A training batch: windows (B, S+1), context inputs, targets; System 2's replayed rows appended."""
    window: torch.Tensor
    tokens: torch.Tensor
    targets: torch.Tensor
    fresh: int  # the caller's rows (the first `fresh`); the others are replayed


def make_batch(model, window, init, pool) -> tuple[Batch, torch.Tensor]:
    """(the batch, its starting candidates): with System 2's replayed rows appended in training, their
    final candidates as their starts. Starts are drawn into `pool` memory (a Recycler)."""
    check_window(window, model.cfg, extra=1)
    fresh, tokens, targets = window.shape[0], window[:, :-1], window[:, 1:]
    z = init if init is not None else model.init_candidate(tokens, take=pool.take)
    replay = model.replay
    n = min(len(replay), int(tokens.shape[0] * model.cfg.ebt.replay_fraction)) if replay is not None else 0
    if model.training and n > 0:
        w_old, z_old = replay.sample(n)
        tokens, targets = torch.cat([tokens, w_old[:, :-1]]), torch.cat([targets, w_old[:, 1:]])
        window = torch.cat([window, w_old])
        z_all = pool.take((z.shape[0] + n, *z.shape[1:]), z.dtype, z.device)
        torch.cat([z, z_old.to(z.dtype)], out=z_all)
        if init is None:  # drawn above: no one else holds it
            pool.give(z)
        z = z_all
    return Batch(window, tokens, targets, fresh), z


def finish(model, b: Batch, steps, loss, first, last, z_last, e_first, plan: Plan) -> dict:
    """The metrics dict; the final energy is measured (on the last step's landscape) and System 2's
    replay buffer fed here. steps: each step's landscape."""
    e = model.cfg.ebt
    out = {"loss": loss, "nll_sum": last["nll_sum"], "n_tokens": last["n_tokens"],
           "ce_first": first["loss"].detach(), "ce_last": last["loss"].detach(),
           "alpha": model.alpha.detach().clamp(min=e.alpha_min), "steps": torch.tensor(float(len(steps)))}
    if model.training and plan.energy_gap:
        with torch.no_grad():
            e_final = model.energy(b.tokens, model.candidate_input(z_last.detach()), steps[-1])
        out["energy_gap"] = (e_first - e_final).mean()
    if model.training and model.replay is not None:
        model.replay.push(b.window[:b.fresh], z_last[:b.fresh])
        out["replay_rows"] = torch.tensor(float(b.window.shape[0] - b.fresh))
    return out


def forward(model, window: torch.Tensor, init: torch.Tensor | None = None, n_steps=None,
            noise: float | None = None, plan: Plan | None = None) -> dict:
    """window (B, S+1) token ids or (B, S+1, F) frame features -> loss (S1: the mean over steps; S2:
    the last step's) and training metrics. The whole unroll's graph is kept for loss.backward();
    `train_step` gives the same gradients one step's graph at a time.

    In training mode (model.train()) the recipe's randomness applies (step count, alpha, replay); in
    eval mode it does not and cfg.ebt.eval_steps steps run, as in the official validation phase. The
    Langevin noise (noise None: cfg.ebt.langevin; 0: none) is added in both, as the official forward
    adds it in every phase. n_steps, if given, replaces the drawn step count (a count or a schedule).
    plan: how steps without a graph (validation) are taken (None: `resolve_plan`'s default)."""
    plan = plan or resolve_plan(model)
    steps = steps_of(model.cfg.ebt, n_steps, model.training)
    b, z = make_batch(model, window, init, plan.pool)
    return _unrolled_loss(model, b, z, steps, noise, plan)


def _unrolled_loss(model, b: Batch, z, steps, noise, plan: Plan) -> dict:
    logits, energies = unroll(model, b.tokens, z, steps, model.training, torch.is_grad_enabled(),
                              model.cfg.ebt, noise, step=plan.think_step(model))
    last = prediction_loss(logits[-1], b.targets, model.cfg)
    first = prediction_loss(logits[0], b.targets, model.cfg) if len(steps) > 1 else last
    if model.cfg.ebt.loss_last_only:
        loss = last["loss"]
    else:  # S1: the mean over steps of each step's loss
        middle = [prediction_loss(z_k, b.targets, model.cfg) for z_k in logits[1:-1]]
        loss = torch.stack([c["loss"] for c in [first, *middle, last][: len(steps)]]).mean()
    return finish(model, b, steps, loss, first, last, logits[-1], energies[0], plan)


def train_step(model, window: torch.Tensor, init: torch.Tensor | None = None, scale: float = 1.0,
               n_steps=None, plan: Plan | None = None) -> dict:
    """forward + backward of one (micro-)batch: adds scale * dloss/dtheta to the parameters' .grad and
    returns `forward`'s metrics with the loss detached. plan (None: `resolve_plan`'s default) chooses
    how: its grad method one step's graph at a time (Plan.train_step), or "full", where stepping is not
    exact too, `forward` and one backward through the whole unroll."""
    plan = plan or resolve_plan(model)
    steps = steps_of(model.cfg.ebt, n_steps, model.training)
    b, z = make_batch(model, window, init, plan.pool)
    stepwise = plan.train_step(model, z)
    if stepwise is None:
        out = _unrolled_loss(model, b, z, steps, None, plan)
        (out["loss"] * scale).backward()
        return {**out, "loss": out["loss"].detach()}
    loss_steps = [len(steps) - 1] if model.cfg.ebt.loss_last_only else list(range(len(steps)))
    losses = StepLosses(model, b.targets, 1.0 / len(loss_steps), plan)  # S1: the mean over steps
    start = [z]  # handed over: nothing here keeps the (B, S, V) start alive through the unroll
    own_start = init is None  # drawn here (or concatenated with replayed rows): no caller holds it
    del z, init
    z_last, e_first, step_losses = stepwise(model, b.tokens, start, steps,
                                            Losses(losses.grad, loss_steps, scale), stochastic=model.training,
                                            on_step=losses.log_first, recycle_start=own_start)
    last = {k: v.detach() for k, v in losses.ce[len(steps) - 1].items()}
    out = finish(model, b, steps, torch.stack(step_losses).sum(), losses.ce[0], last, z_last, e_first, plan)
    plan.pool.give(z_last)  # read by finish only (the replay buffer copies it)
    return out


# here beside StepLosses, not in ebt.fast.vocab_side: that module cannot import the models (a cycle)
def update_and_token_grad(z, wtu, a, softmax: bool, stats, targets, pad_id, scale, grad_layout):
    """(z_next, the token loss at z_next, its gradient in grad_layout): the update
    (vocab_side.mapped_update, p from z's softmax statistics `stats` when given) and the loss gradient
    (token_loss_grad_pointwise) as one function, so that compiled, the pass writing z_next also reduces
    its softmax statistics and the gradient pass reads z_next once."""
    z_next = mapped_update(z, wtu, a, softmax, stats)
    res, v = token_loss_grad_pointwise(z_next, targets, pad_id, scale, grad_layout)
    return z_next, res, v


class StepLosses:
    """Each unroll step's loss and its gradient at the step's output (closed form for tokens), the loss
    dicts (cross-entropy or Smooth L1, with counts) kept in `ce` for the metrics."""

    def __init__(self, model, targets, weight: float, plan: Plan):
        self.cfg, self.targets, self.weight, self.plan, self.ce = model.cfg, targets, weight, plan, {}

    def grad(self, k, z_k, s, grad_layout=None, out=None, update=None):
        """(weight * loss_k, d(s * weight * loss_k)/dz_k): the gradient in grad_layout (dtype, pad) if
        given, into out if given. update (W^T u, alpha, softmax, z's softmax statistics or None): z_k is
        the step's input and its update is taken here first (vocab_side.mapped_update), for tokens in
        one compiled function with the loss (`update_and_token_grad`); returns (loss, the gradient with
        respect to the updated candidate, the updated candidate)."""
        w, cfg = self.weight, self.cfg
        if update is not None:
            if cfg.candidate == "tokens":
                fn = compiled(update_and_token_grad) if self.plan.compiled else update_and_token_grad
                z_next, self.ce[k], v = fn(z_k, *update, self.targets, cfg.pad_token_id, s * w, grad_layout)
                return self.ce[k]["loss"] * w, v, z_next
            z_next = (compiled(mapped_update) if self.plan.compiled else mapped_update)(z_k, *update)
            return (*self.grad(k, z_next, s, grad_layout), z_next)
        if cfg.candidate == "tokens":
            if out is not None:  # eager into recycled memory (CPU): a compiled one would allocate
                self.ce[k], v = token_loss_grad(z_k, self.targets, cfg.pad_token_id, s * w, out=out)
                return self.ce[k]["loss"] * w, v
            fn = compiled_token_loss_grad() if self.plan.compiled else token_loss_grad
            self.ce[k], v = fn(z_k, self.targets, cfg.pad_token_id, s * w, grad_layout)
            return self.ce[k]["loss"] * w, v

        def loss(x):
            self.ce[k] = prediction_loss(x, self.targets, cfg)
            return self.ce[k]["loss"] * w

        loss_k, v = autograd_loss_grad(loss, z_k, s)
        return loss_k, v if grad_layout is None else to_layout(v, *grad_layout)

    def log_first(self, k, z_k) -> None:
        """The first step's loss is logged even when it is not trained on (on_step of the unroll)."""
        if k != 0 or k in self.ce:
            return
        cfg, pool = self.cfg, self.plan.pool
        with torch.no_grad():
            if cfg.candidate == "tokens" and z_k.device.type == "cpu":  # no fresh (B, S, V)
                # log-softmax: the closed-form loss into recycled memory (its gradient unused)
                self.ce[0], g = token_loss_grad(z_k, self.targets, cfg.pad_token_id, out=pool.take_like(z_k))
                pool.give(g)
            elif cfg.candidate == "tokens" and self.plan.compiled:  # one fused reduction
                self.ce[0] = compiled_token_nll()(z_k, self.targets, cfg.pad_token_id)
            else:
                self.ce[0] = prediction_loss(z_k, self.targets, cfg)


# ---------------------------------------------------------------------------------------------- images

def image_loss(pred: torch.Tensor, clean: torch.Tensor) -> dict:
    """Smooth L1 (beta 1) to the clean image: per image, then averaged; sums for image-weighted means."""
    per_image = F.smooth_l1_loss(pred.float(), clean.float(), beta=1.0, reduction="none").flatten(1).mean(1)
    return {"loss": per_image.mean(), "nll_sum": per_image.detach().sum(),
            "n_tokens": torch.as_tensor(per_image.numel(), device=clean.device)}


def image_forward(model, clean: torch.Tensor, n_steps=None, plan: Plan | None = None) -> dict:
    """The image EBT's objective: clean images (B, C, H, W) in [-1, 1] -> noised at the training level,
    denoised by the unroll (whole graph), Smooth L1 to the clean image. n_steps: the step count (None:
    the recipe's draw); plan: as in `forward` (its energy_gap)."""
    model.check(clean)
    plan = plan or resolve_plan(model)
    noisy, _ = noise_at_level(clean, model.cfg.noise_level, schedule=model.schedule)
    n_steps = draw_steps(model.cfg.ebt, model.training) if n_steps is None else n_steps
    xs, energies = unroll(model, noisy, noisy, n_steps, model.training, torch.is_grad_enabled(),
                          model.cfg.ebt, step=plan.think_step(model))
    first, last = image_loss(xs[0], clean), image_loss(xs[-1], clean)
    steps = [image_loss(x, clean)["loss"] for x in xs]
    loss = last["loss"] if model.cfg.ebt.loss_last_only else torch.stack(steps).mean()
    out = {"loss": loss, "nll_sum": last["nll_sum"], "n_tokens": last["n_tokens"],
           "ce_first": first["loss"].detach(), "ce_last": last["loss"].detach(),
           "alpha": model.alpha.detach().clamp(min=model.cfg.ebt.alpha_min)}
    if model.training and plan.energy_gap:
        with torch.no_grad():
            out["energy_gap"] = (energies[0] - model.energy_from(None, xs[-1].detach())).mean()
    return out
