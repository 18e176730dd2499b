"""The autoregressive EBT: equality with the official code, no leakage, recipes, replay, conversion."""

import subprocess
import sys

import pytest
import torch

from ebt.compat.official import check_reference, convert_official, load_reference
from ebt.config import EBTConfig, ModelConfig, recipe
from ebt.errors import CheckpointError, ConfigError
from ebt.models import build_model, from_pretrained
from ebt.models.ebt import ReplayBuffer
from ebt.recipe import draw_steps
from ebt.think import unroll
from ebt.train import make_optimizer
from ebt.config import TrainConfig

CASES = ["ebt_s1_small", "ebt_s1_default_small", "ebt_s2_small", "transformer_small"]
TRAJECTORIES = ["ebt_s1", "transformer"]  # official_trajectory_<name>: whole training runs


@pytest.mark.parametrize("case", CASES)
def test_reference_case_matches_official(reference_dir, case):
    rows = dict(check_reference(reference_dir / f"official_{case}.safetensors"))
    meta, t = load_reference(reference_dir / f"official_{case}.safetensors")
    expected = {k for k in t if k.startswith("grad.") or k in ("loss", "initial_loss", "final_step_loss", "logits")}
    expected |= {k for k in t if k.startswith("step")}
    assert expected <= set(rows), expected - set(rows)  # every reference tensor is compared
    assert max(rows.values()) < 1e-5, rows


def test_check_reference_cli_passes_all_and_fails_on_tampered(reference_dir, tmp_path):
    files = [str(reference_dir / f"official_{case}.safetensors") for case in CASES]  # the one-step cases
    files += [str(reference_dir / f"official_trajectory_{name}.safetensors") for name in TRAJECTORIES]
    r = subprocess.run([sys.executable, "-m", "ebt.cli", "check-reference", *files], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("worst relative error") == 6
    assert "step9.lr" in r.stdout and "final.alpha" in r.stdout  # the trajectories were replayed
    # a reference whose gradient was changed must fail
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    src = reference_dir / "official_ebt_s1_small.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    t = load_file(str(src))
    t["grad.vocab_to_embed.weight"] = t["grad.vocab_to_embed.weight"] * (1 + 1e-3)
    save_file(t, str(tmp_path / "bad.safetensors"), metadata=meta)
    r = subprocess.run([sys.executable, "-m", "ebt.cli", "check-reference", str(tmp_path / "bad.safetensors")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "FAIL" in r.stdout


def tiny_ebt(variant="time_embed", vocab=23, S=7, landscapes=2, **kw):
    torch.manual_seed(0)
    e = EBTConfig(variant=variant, landscapes=landscapes, alpha=3.0, **kw)
    return build_model(ModelConfig(model="ebt", size="4xs", n_layer=2, d_model=32, n_head=4, vocab_size=vocab,
                                   context_length=S, ebt=e)).double()


def energy_and_grad(model, x, z, k=0, first_order=False):
    p = torch.softmax(z, -1).requires_grad_()
    E = model.energy_from(model.context(x, k, first_order=first_order), p)
    (g,) = torch.autograd.grad(E.sum(), p)
    return E.detach(), g


@pytest.mark.parametrize("variant", ["time_embed", "default"])
def test_no_leakage_from_future_tokens_or_other_candidates(variant):
    model = tiny_ebt(variant)
    x = torch.randint(0, 23, (2, 7))
    z = torch.randn(2, 7, 23, dtype=torch.float64)
    E, g = energy_and_grad(model, x, z)
    for i in range(6):
        x2 = x.clone()
        x2[:, i + 1:] = (x2[:, i + 1:] + 5) % 23  # token i+1 (the target of position i) and all later tokens
        E2, g2 = energy_and_grad(model, x2, z)
        assert torch.equal(E2[:, : i + 1], E[:, : i + 1]) and torch.equal(g2[:, : i + 1], g[:, : i + 1])
        assert not torch.equal(E2[:, i + 1:], E[:, i + 1:])  # the perturbation does reach later positions
    for j in range(7):
        z2 = z.clone()
        z2[:, j] = torch.randn(2, 23, dtype=torch.float64)  # another position's candidate
        E2, g2 = energy_and_grad(model, x, z2)
        others = [i for i in range(7) if i != j]
        assert torch.equal(E2[:, others], E[:, others]) and torch.equal(g2[:, others], g[:, others])
        assert not torch.equal(E2[:, j], E[:, j])


def test_context_stream_never_depends_on_candidates():
    """The context stream is computed without any candidate (once per landscape) and is the same
    whatever the candidates are."""
    model = tiny_ebt()
    x = torch.randint(0, 23, (2, 7))
    seen = []
    hook = model.backbone.norm.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    for _ in range(2):
        energy_and_grad(model, x, torch.randn(2, 7, 23, dtype=torch.float64))
    hook.remove()
    ctx_a, cand_a, ctx_b, cand_b = seen  # each energy: one context pass, then one candidate pass
    assert ctx_a.shape[1] == 8 and cand_a.shape[1] == 7  # step token + 7 tokens; 7 candidates
    assert torch.equal(ctx_a, ctx_b) and not torch.equal(cand_a, cand_b)


def test_one_context_pass_per_landscape():
    calls = []
    model = tiny_ebt(landscapes=1, rand_steps=2, rand_steps_min=2, detach=False, truncate=True, loss_last_only=True)
    real = model.context
    model.context = lambda t, k, **kw: calls.append(k) or real(t, k, **kw)
    model.eval()
    model(torch.randint(0, 23, (2, 8)))  # 3 steps on one landscape: the last builds the second-order graph
    assert len(calls) == 2  # one constant context for the truncated steps, one with the graph
    calls.clear()
    with torch.no_grad():
        model(torch.randint(0, 23, (2, 8)))
    assert len(calls) == 1


def test_fused_attention_equals_explicit_for_first_order_thinking():
    model = tiny_ebt()
    x, z = torch.randint(0, 23, (2, 7)), torch.randn(2, 7, 23, dtype=torch.float64)
    E, g = energy_and_grad(model, x, z)  # the context with explicit attention (double-backward capable)
    E2, g2 = energy_and_grad(model, x, z, first_order=True)  # fused attention kernels
    assert torch.allclose(E, E2, atol=1e-12) and torch.allclose(g, g2, atol=1e-12)


def test_update_is_taken_with_respect_to_probabilities():
    model = tiny_ebt().eval()
    x, z = torch.randint(0, 23, (1, 7)), torch.randn(1, 7, 23, dtype=torch.float64)
    logits, energies = unroll(model, x, z, 1, stochastic=False, build_graph=False)
    E, g = energy_and_grad(model, x, z)
    assert torch.allclose(logits[0], torch.softmax(z, -1) - 3.0 * g, atol=1e-12)
    assert torch.allclose(energies[0], E, rtol=1e-12, atol=1e-12)  # inference contexts use fused attention


def test_s1_and_s2_recipes():
    s1, s2 = recipe("s1"), recipe("s2")
    assert (s1.landscapes, s1.alpha, s1.alpha_learnable, s1.alpha_lr_mult, s1.detach, s1.truncate) == (2, 500, True, 1500, True, False)
    assert (s2.landscapes, s2.alpha, s2.alpha_learnable, s2.rand_steps, s2.eval_steps) == (1, 5, False, 2, 3)
    assert (s2.langevin, s2.replay_buffer, s2.alpha_rand_scale, s2.loss_last_only) == (3.0, 192, 2.0, True)
    assert recipe("s2", langevin=0.0).langevin == 0.0  # every knob overridable
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe("s3")
    with pytest.raises(ConfigError, match="variant"):
        EBTConfig(variant="other")


def test_alpha_gets_its_own_group_with_multiplier_and_no_decay():
    model = build_model(ModelConfig(model="ebt", size="4xs", vocab_size=50, context_length=8))
    opt, _ = make_optimizer(model, TrainConfig(), 1e-3, torch.device("cpu"))
    g = [g for g in opt.param_groups if g["name"] == "alpha"][0]
    assert g["params"][0] is model.alpha and g["initial_lr"] == pytest.approx(1.5) and g["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    fixed = build_model(ModelConfig(model="ebt", size="4xs", vocab_size=50, context_length=8, ebt=recipe("s2")))
    opt, _ = make_optimizer(fixed, TrainConfig(), 1e-3, torch.device("cpu"))
    g = [g for g in opt.param_groups if g["name"] == "alpha"][0]  # as the official trainer: an idle group
    assert g["params"][0] is fixed.alpha and not fixed.alpha.requires_grad and g["weight_decay"] == 0.0


def test_s2_training_randomness():
    model = tiny_ebt(landscapes=1, rand_steps=2, rand_steps_min=2, alpha_rand_scale=2.0, langevin=3.0,
                     detach=False, truncate=True, loss_last_only=True, replay_buffer=5).train()
    steps = {draw_steps(model.cfg.ebt, model.training) for _ in range(60)}
    assert steps == {2, 3}
    a = model.step_alpha((4, 7, 23), stochastic=True)
    assert a.shape == (4, 7, 1) and (a >= 1.5).all() and (a <= 6.0).all() and a.std() > 0.3
    assert torch.equal(model.step_alpha((4, 7, 23), stochastic=False), model.alpha.clamp(min=1e-4))
    w = torch.randint(0, 23, (4, 8))
    out = model(w)
    assert float(out["replay_rows"]) == 0 and len(model.replay) == 4
    out = model(w)
    assert float(out["replay_rows"]) == 2 and len(model.replay) == 5  # 0.5 x batch replayed; only fresh pushed
    model.eval()
    assert draw_steps(model.cfg.ebt, model.training) == 3


def test_replay_buffer_is_bounded_fifo_and_round_trips():
    buf = ReplayBuffer(3)
    for i in range(5):
        buf.push(torch.full((1, 4), i), torch.full((1, 3, 2), float(i)))
    assert len(buf) == 3 and sorted(buf.windows[:, 0].tolist()) == [2, 3, 4]  # oldest dropped first
    assert buf.nbytes == 3 * 4 * 8 + 3 * 3 * 2 * 4
    other = ReplayBuffer(3)
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.logits, buf.logits) and other.next == buf.next
    with pytest.raises(ConfigError, match="replay buffer"):
        ReplayBuffer(4).load_state_dict(buf.state_dict())


def test_eval_mode_needs_no_grad_and_gives_token_weighted_counts():
    model = tiny_ebt().eval()
    w = torch.randint(0, 23, (3, 8))
    with torch.no_grad():
        out = model(w)
    assert not out["loss"].requires_grad and int(out["n_tokens"]) == 21 - int((w[:, 1:] == 0).sum())


def test_convert_official_lightning_checkpoint(reference_dir, tmp_path):
    meta, t = load_reference(reference_dir / "official_ebt_s1_small.safetensors")
    state = {"model." + k[6:]: v for k, v in t.items() if k.startswith("param.")}
    torch.save({"state_dict": state, "hyper_parameters": meta["hparams"], "epoch": 3}, tmp_path / "o.ckpt")
    r = subprocess.run([sys.executable, "-m", "ebt.cli", "convert-official", str(tmp_path / "o.ckpt"),
                        str(tmp_path / "conv")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model = from_pretrained(tmp_path / "conv").double().eval()
    assert model.cfg.ebt.alpha_lr_mult == 1500 and model.cfg.vocab_size == 97
    logits, _ = unroll(model, t["input.tokens"][:, :-1], t["input.init_logits"], 2, False, False)
    # weights were stored in float32 (our checkpoints' dtype), so agreement is to float32 precision
    assert (logits[-1] - t["step1.logits"]).abs().max() / t["step1.logits"].abs().max() < 1e-4
    torch.save({"weights": state}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        convert_official(tmp_path / "bad.ckpt", tmp_path / "x")
    hp = dict(meta["hparams"], contrastive_loss=True)
    torch.save({"state_dict": state, "hyper_parameters": hp}, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match="not implemented here.*contrastive_loss"):
        convert_official(tmp_path / "c.ckpt", tmp_path / "y")
