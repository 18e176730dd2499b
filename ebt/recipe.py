"""Recipe pieces every EBT shares (text, video, images): how many steps on which landscapes, which step
size, alpha's optimizer group. Pure functions of an EBTConfig (and torch's random generator)."""

from __future__ import annotations

import itertools

import torch

from ebt.errors import ConfigError


def step_landscapes(steps) -> list[int]:
    """The landscape of each step of an unroll. `steps`: a count n (step k on landscape k, the model
    reusing its last landscape beyond those it has: n = landscapes + R is the official validation's
    order, the last landscape R + 1 times) or a sequence of landscapes (a drawn training schedule)."""
    return list(range(steps)) if isinstance(steps, int) else [int(k) for k in steps]


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
    n, last = steps or inference_steps(cfg), cfg.landscapes - 1
    if cfg.variant == "default":
        return [min(k, last) for k in range(n)]
    return [k for k in range(last + 1) for _ in range(n if k == last or not final_landscape else 1)]


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


def steps_of(cfg, n_steps, training: bool) -> list[int]:
    """Each unroll step's landscape (`step_landscapes`): drawn by the recipe (first, before any other
    random number) when n_steps is None, else given as a count or a schedule (a captured CUDA graph
    replays one fixed draw: ebt.fast.cuda_graph.CapturedStep draws it on the host)."""
    if n_steps is None:
        n_steps = draw_steps(cfg, training)
    if isinstance(n_steps, (tuple, list)):
        if not n_steps or any(not 0 <= int(k) < cfg.landscapes for k in n_steps):
            raise ConfigError(f"n_steps={n_steps}: a schedule lists landscapes in 0..{cfg.landscapes - 1}")
        return step_landscapes(n_steps)
    if int(n_steps) < 1:
        raise ConfigError(f"n_steps={n_steps}: an unroll takes at least one step")
    return step_landscapes(int(n_steps))
