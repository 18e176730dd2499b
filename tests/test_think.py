"""Inference-time thinking: steps, candidates and selection per position, overrides, adaptive stopping."""

import pytest
import torch

from ebt.config import EBTConfig, ModelConfig
from ebt.errors import ConfigError
from ebt.models import build_model
from ebt.think import ThinkConfig, think, unroll


def model_(landscapes=1, langevin=0.0, V=19, S=6):
    torch.manual_seed(0)
    e = EBTConfig(landscapes=landscapes, alpha=2.0, alpha_learnable=False, langevin=langevin)
    return build_model(ModelConfig(model="ebt", size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=V,
                                   context_length=S, ebt=e)).double().eval()


def test_steps_match_the_training_unroll():
    m = model_(landscapes=2)
    x = torch.randint(0, 19, (2, 6))
    z0 = m.init_candidate(x)
    logits, energies = unroll(m, x, z0, 4, stochastic=False, build_graph=False)
    # steps are per landscape now (issue 19): the validation order 0, 1, 1, 1 is the final-landscape option
    out = think(m, x, ThinkConfig(steps=3, final_landscape=True, trace=True), init=z0)
    assert torch.allclose(out.z, logits[-1], atol=1e-12)
    assert torch.allclose(out.trace[:4], torch.stack(energies), atol=1e-12)  # steps beyond 2 reuse landscape 2
    assert out.passes == 5 and torch.equal(out.steps_used, torch.full((2, 6), 4.0, dtype=torch.float64))


@pytest.mark.parametrize("rule", ["min", "max", "drop"])
def test_selection_is_per_row_and_position(rule):
    m = model_()
    x = torch.randint(0, 19, (2, 6))
    torch.manual_seed(1)
    starts = [m.init_candidate(x) for _ in range(3)]
    singles = [think(m, x, ThinkConfig(steps=2), init=z) for z in starts]
    torch.manual_seed(1)
    calls = iter(starts)
    m.init_candidate = lambda inputs: next(calls)
    best = think(m, x, ThinkConfig(steps=2, candidates=3, select=rule))
    score = torch.stack([{"min": -t.energy, "max": t.energy, "drop": t.initial_energy - t.energy}[rule] for t in singles])
    pick = score.argmax(0)  # (B, S): the winning candidate differs between positions
    assert len(set(pick.flatten().tolist())) > 1
    for b in range(2):
        for i in range(6):
            c = int(pick[b, i])
            assert torch.equal(best.z[b, i], singles[c].z[b, i]) and best.energy[b, i] == singles[c].energy[b, i]
    assert best.passes == 3 * 3


def test_noise_override_and_alpha_override():
    m = model_(langevin=2.0)
    x = torch.randint(0, 19, (1, 6))
    z0 = m.init_candidate(x)
    # noise=0 explicit: the default is now the trained std (issue 19, test_protocol.py)
    quiet = [think(m, x, ThinkConfig(steps=2, noise=0.0), init=z0).z for _ in range(2)]
    assert torch.equal(quiet[0], quiet[1])  # no noise at inference, even for a model trained with it
    assert torch.equal(quiet[0], think(m, x, ThinkConfig(steps=2, noise=0.0), init=z0).z)
    noisy = [think(m, x, ThinkConfig(steps=2, noise=2.0), init=z0).z for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1])
    a = think(m, x, ThinkConfig(steps=1, noise=0.0, alpha=4.0), init=z0).z
    b = think(m, x, ThinkConfig(steps=1, noise=0.0, alpha_factor=2.0), init=z0).z
    assert torch.allclose(a, b)
    c = think(m, x, ThinkConfig(steps=1, noise=0.0), init=z0).z
    assert not torch.allclose(a, c)


def test_accept_lower_never_raises_the_energy():
    m = model_()
    x = torch.randint(0, 19, (2, 6))
    out = think(m, x, ThinkConfig(steps=6, alpha=50.0, accept_lower=True, trace=True))
    assert (out.trace[1:] <= out.trace[:-1]).all()
    free = think(m, x, ThinkConfig(steps=6, alpha=50.0, trace=True))
    assert (free.trace[1:] > free.trace[:-1]).any()  # with a huge step the plain update does overshoot


def test_adaptive_stopping_reports_steps_per_position():
    m = model_()
    x = torch.randint(0, 19, (2, 6))
    z0 = m.init_candidate(x)
    full = think(m, x, ThinkConfig(steps=20, trace=True), init=z0)
    deltas = (full.trace[1:] - full.trace[:-1]).abs()
    tol = float(deltas[3:].median())
    out = think(m, x, ThinkConfig(steps=20, tol=tol), init=z0)
    assert out.steps_used.min() >= 1 and out.steps_used.max() <= 20
    assert out.steps_used.float().std() > 0  # positions stop at different steps
    # a position's step count is one past the first step whose change fell under tol
    first_small = torch.where(deltas < tol, torch.arange(1, 21)[:, None, None].double(), torch.tensor(99.0)).min(0).values
    assert torch.equal(out.steps_used, torch.minimum(first_small, torch.tensor(20.0)))
    huge = think(m, x, ThinkConfig(steps=20, tol=1e9), init=z0)
    assert huge.passes == 2 and (huge.steps_used == 1).all()  # all converged after one step: loop ends early


@pytest.mark.parametrize("step_fn,explicit,calls", [("grad", False, 17), ("recycled_step", None, 16)])
def test_memory_does_not_grow_with_steps(monkeypatch, step_fn, explicit, calls):
    """Nothing per step is kept: the number of live tensors is the same at every step of a long run
    (autograd's steps, `Step.grad`; the written-out steps in recycled memory, the CPU default)."""
    import gc

    import ebt.fast.vocab_side as vocab_side
    from ebt.fast.plan import resolve_plan

    m = model_()
    x = torch.randint(0, 19, (2, 6))
    cfg = ThinkConfig(steps=16)
    step = resolve_plan(m, explicit=explicit).think_step(m, cfg)
    counts, real = [], getattr(step if step_fn == "grad" else vocab_side, step_fn)
    gc.collect()
    # earlier tests' tensors stay alive until the end, so only this run's tensors can change the count
    # (torch 2.4 frees some of them a few at a time during a later test)
    earlier = [o for o in gc.get_objects() if torch.is_tensor(o)]

    def counting(*a, **k):
        gc.collect()
        counts.append(sum(1 for o in gc.get_objects() if torch.is_tensor(o)))
        return real(*a, **k)

    monkeypatch.setattr(step if step_fn == "grad" else vocab_side, step_fn, counting)
    think(m, x, cfg, step=step)
    assert len(counts) == calls and len(set(counts[2:])) == 1, counts
    assert counts[-1] > len(earlier)  # the count includes them


def test_bad_thinking_configs():
    with pytest.raises(ConfigError, match="candidates must be >= 1"):
        ThinkConfig(candidates=0)
    with pytest.raises(ConfigError, match="selection rule"):
        ThinkConfig(select="best")
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        ThinkConfig(steps=0)


def test_an_input_longer_than_the_context_is_refused_in_one_line():
    m = build_model(ModelConfig(model="ebt", size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=50,
                                context_length=8))
    with pytest.raises(ConfigError, match=r"^the input holds 12 positions but the model reads at most 8 \(its "
                                          r"context_length\): pass the last 8 or split the input into windows$"):
        think(m, torch.zeros(1, 12, dtype=torch.long), ThinkConfig())
