"""Validation, thinking and generation follow the official protocol (issue 19; alexiglad/EBT 0ad3628,
model/nlp/ebt.py: `forward`, `ebt_advanced_inference`, `_run_ebt_inference_steps`).

The official formulas are written out here on their own (step lists, the noised steps, the noise-free
final score, accepted steps) and compared with what the library computes.
"""

import pytest
import torch

from ebt.cli import build_parser
from ebt.config import EBTConfig, ModelConfig, recipe
from ebt.errors import ConfigError
from ebt.evaluate import evaluate_lm
from ebt.generate import GenerateConfig, generate
from ebt.models import build_model
from ebt.models.transformer import prediction_loss
from ebt.fast.plan import resolve_plan
from ebt.recipe import draw_steps, inference_schedule, repeat_range, step_landscapes, step_range
from ebt.think import ThinkConfig, think, unroll

V, S = 19, 6


def tiny(landscapes=1, rand_steps=0, rand_steps_min=0, langevin=0.0, variant="time_embed", **kw):
    torch.manual_seed(0)
    e = EBTConfig(variant=variant, landscapes=landscapes, alpha=2.0, alpha_learnable=False,
                  rand_steps=rand_steps, rand_steps_min=rand_steps_min, langevin=langevin, **kw)
    return build_model(ModelConfig(model="ebt", size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=V,
                                   context_length=S, ebt=e)).double().eval()


# ----------------------------------------------------------------------- the official formulas, written out

def official_forward_steps(L, R, mn, phase, draw=None):
    """`forward`'s mcmc_steps: training with R > 0 repeats every landscape randint(max(min, 1), R + 2)
    times; validation (no_randomness) repeats the last one R + 1 times; R = 0: each landscape once."""
    steps = []
    for step in range(L):
        if phase == "train" and R > 0:
            steps += [step] * draw(1 if mn == 0 else mn, R + 2)
        elif R > 0:
            steps += [step] * (R + 1 if step == L - 1 else 1)
        else:
            steps.append(step)
    return steps


def official_inference_steps(L, mn, infer_ebt_num_steps, final_landscape, ebt_type):
    """`_run_ebt_inference_steps`' step indices (infer_ebt_num_steps 1 is its 'not given')."""
    if ebt_type == "default":
        return list(range(infer_ebt_num_steps if infer_ebt_num_steps > 1 else L))
    out = []
    for step in range(L):
        if final_landscape and step != L - 1:
            out.append(step)
        else:
            inner = infer_ebt_num_steps if infer_ebt_num_steps != 1 else (mn if mn != 0 else 1)
            out += [step] * inner
    return out


def energy_grad(m, x, p, landscape):
    with torch.enable_grad():
        p = p.detach().requires_grad_()
        E = m.energy(x, p, landscape)
        (g,) = torch.autograd.grad(E.sum(), p)
    return E.detach(), g


def official_steps(m, x, z, steps, std, accept_lower=False):
    """Each step: noise on the candidate, softmax, energy, gradient, z <- p - alpha dE/dp. accept_lower:
    the proposal's energy (no noise, same landscape) against the step's, per position. Then the final
    candidate's energy without noise on the last landscape (`get_energy`). (z, final energy, per step
    candidates, accepted steps)."""
    alpha, zs, used = float(m.alpha), [], torch.zeros(z.shape[:2], dtype=torch.float64)
    for land in steps:
        zn = z + std * torch.randn_like(z)
        p = torch.softmax(zn, -1)
        E, g = energy_grad(m, x, p, land)
        z = p - alpha * g
        if accept_lower:
            ok = m.energy(x, torch.softmax(z, -1), land).detach() < E
            z = torch.where(ok[..., None], z, zn)  # rejected: the noised candidate (see the report)
            used += ok
        zs.append(z)
    final = m.energy(x, torch.softmax(z, -1), m.cfg.ebt.landscapes - 1).detach()
    return z, final, zs, used


# ------------------------------------------------------------------------------------------- step lists

@pytest.mark.parametrize("L,R,mn", [(1, 2, 2), (1, 3, 1), (2, 2, 1), (3, 1, 2), (2, 1, 1), (2, 0, 0)])
def test_training_and_validation_step_lists_are_the_official(L, R, mn):
    e = EBTConfig(landscapes=L, rand_steps=R, rand_steps_min=mn)
    clamp = lambda steps: [min(k, L - 1) for k in step_landscapes(steps)]  # noqa: E731 (as landscape_key)
    official_draw = lambda lo, hi: torch.randint(lo, hi, (1,)).item()  # noqa: E731
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        ours = clamp(draw_steps(e, training=True))
        torch.manual_seed(seed)
        assert ours == official_forward_steps(L, R, mn, "train", official_draw)  # the same draws, in order
        assert len(ours) >= L and sorted(set(ours)) == list(range(L))  # never fewer steps than landscapes
        seen.add(tuple(ours))
    if R:  # step_range lists every schedule the draws can give (CapturedStep captures one graph each)
        r = range(max(mn, 1), R + 2)
        assert {tuple(clamp(s)) for s in step_range(e)} >= seen
        assert len(step_range(e)) == len(r) ** L
    validation = official_forward_steps(L, R, mn, "val")
    assert clamp(draw_steps(e, training=False)) == validation == clamp(e.eval_steps)


def test_one_landscape_draws_counts_as_before():
    e = recipe("s2")
    assert step_range(e) == [2, 3] and {draw_steps(e, True) for _ in range(50)} == {2, 3}
    assert isinstance(draw_steps(e, True), int) and draw_steps(e, False) == e.eval_steps == 3
    with pytest.raises(ConfigError, match="at most rand_steps \\+ 1"):
        repeat_range(EBTConfig(landscapes=2, rand_steps=1, rand_steps_min=3))


@pytest.mark.parametrize("variant,L,mn,steps,final", [
    ("time_embed", 1, 2, None, False), ("time_embed", 2, 0, None, False), ("time_embed", 2, 2, None, False),
    ("time_embed", 3, 1, 4, False), ("time_embed", 3, 2, 3, True), ("time_embed", 2, 0, None, True),
    ("default", 2, 0, None, False), ("default", 1, 2, 5, False)])
def test_inference_step_lists_are_the_official(variant, L, mn, steps, final):
    e = EBTConfig(variant=variant, landscapes=L, rand_steps=2 if mn else 0, rand_steps_min=mn)
    ours = inference_schedule(e, steps, final)
    ref = official_inference_steps(L, mn, steps or 1, final, variant)
    if variant == "default":  # no step tokens: the landscape index names nothing, the count is what matters
        assert len(ours) == len(ref)
    else:
        assert ours == ref


def test_default_step_counts_are_named():
    s2 = tiny(1, rand_steps=2, rand_steps_min=2)
    s1 = tiny(2)
    assert (s2.inference_steps(), s2.cfg.ebt.eval_steps) == (2, 3)  # advanced inference 2, validation R + 1
    assert (s1.inference_steps(), s1.cfg.ebt.eval_steps) == (1, 2)
    x = torch.randint(0, V, (2, S))
    out = think(s2, x)
    assert out.passes == 3 and (out.steps_used == 2).all()  # 2 steps + the final score
    out = think(s1, x, ThinkConfig(steps=3))
    assert out.passes == 7 and (out.steps_used == 6).all()  # 3 per landscape


# ------------------------------------------------------------------------------------------------ noise

class Windows:
    def __init__(self, w):
        self.w = w

    def eval_batches(self, batch_size, rank=0, world_size=1, max_windows=None):
        yield from self.w.split(batch_size)


def test_validation_adds_the_trained_noise_at_every_step():
    m = tiny(2, rand_steps=1, rand_steps_min=1, langevin=0.7)  # validation: landscapes 0, 1, 1
    w = torch.randint(1, V, (2, S + 1))
    x = w[:, :-1]
    z0 = torch.randn(2, S, V, dtype=torch.float64)
    torch.manual_seed(5)
    logits, energies = unroll(m, x, z0, m.cfg.ebt.eval_steps, stochastic=False, build_graph=False)
    torch.manual_seed(5)
    _, _, ref, _ = official_steps(m, x, z0, [0, 1, 1], 0.7)
    assert len(logits) == 3 and all(torch.allclose(a, b, rtol=1e-9, atol=1e-9) for a, b in zip(logits, ref))
    torch.manual_seed(5)
    with torch.no_grad():
        out = m(w, init=z0)  # the validation forward (eval mode)
    ce = float(prediction_loss(ref[-1], w[:, 1:], m.cfg)["loss"])
    assert float(out["ce_last"]) == pytest.approx(ce, rel=1e-9)
    quiet = unroll(m, x, z0, 3, stochastic=False, build_graph=False, noise=0.0)[0]
    torch.manual_seed(5)
    assert torch.allclose(quiet[-1], official_steps(m, x, z0, [0, 1, 1], 0.0)[2][-1], rtol=1e-9, atol=1e-9)


def test_evaluation_draws_its_noise_from_its_seed():
    # zero starts: the noise alone depends on the seed
    m = tiny(1, rand_steps=2, rand_steps_min=2, langevin=1.0, init_scale=0.0)
    data = Windows(torch.randint(1, V, (4, S + 1)))
    a, b, a2 = (evaluate_lm(m, data, 2, seed=s)["loss"] for s in (1, 2, 1))
    assert a != b and a == a2  # noisy, and repeatable under its seed
    q1, q2 = (evaluate_lm(m, data, 2, seed=s, noise=0.0)["loss"] for s in (1, 2))
    assert q1 == q2 and q1 != a
    quiet = tiny(1, rand_steps=2, rand_steps_min=2, init_scale=0.0)  # trained without noise: none
    assert evaluate_lm(quiet, data, 2, seed=1)["loss"] == evaluate_lm(quiet, data, 2, seed=2)["loss"]


@pytest.mark.parametrize("steps,final", [(None, False), (3, True), (4, False)])
@pytest.mark.parametrize("explicit", [None, False])  # the recycled written-out steps (CPU default), autograd
def test_thinking_is_the_official_advanced_inference(steps, final, explicit):
    m = tiny(2, rand_steps=2, rand_steps_min=2, langevin=0.8)
    x = torch.randint(0, V, (2, S))
    z0 = m.init_candidate(x).clone()
    cfg = ThinkConfig(steps=steps, final_landscape=final)
    torch.manual_seed(3)
    out = think(m, x, cfg, init=z0, step=resolve_plan(m, explicit=explicit).think_step(m, cfg))
    order = official_inference_steps(2, 2, steps or 1, final, "time_embed")
    torch.manual_seed(3)
    z, E, _, _ = official_steps(m, x, z0, order, 0.8)
    assert torch.allclose(out.z, z, rtol=1e-9, atol=1e-9)
    assert torch.allclose(out.energy, E, rtol=1e-9, atol=1e-9)
    assert out.passes == len(order) + 1 and (out.steps_used == len(order)).all()


@pytest.mark.parametrize("cfg", [dict(), dict(trace=True), dict(candidates=3), dict(tol=1e-9)])
def test_the_final_candidate_is_scored_without_noise(cfg):
    m = tiny(2, langevin=1.5)
    x = torch.randint(0, V, (2, S))
    out = think(m, x, ThinkConfig(steps=2, **cfg))
    assert torch.allclose(out.energy, m.energy(x, torch.softmax(out.z, -1), 1), rtol=1e-9, atol=1e-9)
    if cfg.get("trace"):
        assert torch.equal(out.trace[-1], out.energy)


def test_noise_none_is_the_trained_std_and_zero_switches_it_off():
    m = tiny(1, langevin=1.2)
    x = torch.randint(0, V, (1, S))
    z0 = m.init_candidate(x).clone()
    runs = {}
    for name, noise in (("default", None), ("trained", 1.2), ("off", 0.0)):
        torch.manual_seed(9)
        runs[name] = think(m, x, ThinkConfig(steps=2, noise=noise), init=z0).z
    assert torch.equal(runs["default"], runs["trained"]) and not torch.allclose(runs["default"], runs["off"])


def test_generation_thinks_with_the_trained_noise():
    m = tiny(1, langevin=1.0, init_scale=0.0)  # zero starts: the seed changes the noise alone
    prompts = [[3, 5], [2, 4, 6]]
    logits = lambda seed, think_cfg=None: generate(  # noqa: E731
        m, prompts, GenerateConfig(max_new_tokens=3, seed=seed, think=think_cfg), return_logits=True)[1]
    assert not torch.allclose(logits(0), logits(1)) and torch.equal(logits(0), logits(0))
    quiet = ThinkConfig(noise=0.0, score_final=False)
    assert torch.equal(logits(0, quiet), logits(1, quiet))


def test_cli_noise_defaults_to_the_trained_std():
    p = build_parser()
    assert p.parse_args(["generate", "run"]).noise is None and p.parse_args(["eval", "run"]).noise is None
    assert p.parse_args(["eval", "run", "--think", "--noise", "0"]).noise == 0.0
    assert p.parse_args(["generate", "run", "--final-landscape"]).final_landscape


# ----------------------------------------------------------------------------------------- accept_lower

def test_accept_lower_as_the_official_inference():
    m = tiny(2, langevin=0.5)
    x = torch.randint(0, V, (3, S))
    z0 = m.init_candidate(x).clone()
    torch.manual_seed(4)
    out = think(m, x, ThinkConfig(steps=3, alpha_factor=15.0, accept_lower=True), init=z0)
    m.alpha.data.mul_(15.0)  # the same step size for the written-out loop
    torch.manual_seed(4)
    z, E, _, used = official_steps(m, x, z0, [0, 0, 0, 1, 1, 1], 0.5, accept_lower=True)
    assert 0 < used.sum() < used.numel() * 6  # some steps kept, some refused
    assert torch.allclose(out.z, z, rtol=1e-9, atol=1e-9)
    assert torch.allclose(out.energy, E, rtol=1e-9, atol=1e-9)
    assert torch.equal(out.steps_used, used) and out.passes == 2 * 6 + 1  # each step re-scores its proposal


def test_captured_steps_replay_each_drawn_schedule():
    """ebt.fast.cuda_graph.CapturedStep keeps one graph per value of step_range: with two landscapes a schedule
    (stand-in capture on CPU, as tests/test_speed_paths.py), the same losses and gradients as eager."""
    from test_speed_paths import captured_pair, tiny as tiny_s, window

    model = tiny_s("s1", landscapes=2, rand_steps=1, rand_steps_min=1).train()
    eager, graphed, step, both = captured_pair(model)
    assert step.counts() == [(0, 1), (0, 1, 1), (0, 0, 1), (0, 0, 1, 1)]
    for i in range(4):
        a, b = both(window(eager, B=3), seed=100 + i)
        assert float(a["loss"]) == float(b["loss"]) and float(a["steps"]) >= 2
        for p, q in zip(eager.parameters(), graphed.parameters()):
            assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))
