"""Scaling studies: FLOP formulas against the counter, fits that recover known slopes, a tiny study end to
end with skip and resume, bad input."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_data  # noqa: F401  (the fixture)

from ebt.config import ModelConfig, recipe
from ebt.errors import ConfigError, DataError
from ebt.flops import count_train_flops, ebt_train_flops, transformer_train_flops
from ebt.models import build_model
from ebt.scale import (StudyConfig, fit_loglog, fit_study, load_study, mean_ci, plan, rate_with_ci, run_study,
                       scaling_rate, study_from_dict)


# ------------------------------------------------------------------------------------------ FLOPs

@pytest.mark.parametrize("L,D,S,V", [(1, 32, 8, 50), (2, 64, 16, 97)])
def test_transformer_flops_formula_matches_counter(L, D, S, V):
    cfg = ModelConfig(size="4xs", n_layer=L, d_model=D, n_head=2, vocab_size=V, context_length=S)
    model = build_model(cfg)
    counted = count_train_flops(model, torch.randint(1, V, (3, S + 1)))
    assert counted == transformer_train_flops(cfg) == 6 * (L * (7 * D * D + 2 * S * D) + D * V)


@pytest.mark.parametrize("rec,over,steps", [("s1", {}, None), ("s1", {"variant": "default"}, None),
                                            ("s1", {"landscapes": 3}, None), ("s2", {"replay_buffer": 0}, 3),
                                            ("s2", {"replay_buffer": 0}, 2)])
@pytest.mark.parametrize("L,D,S,V", [(1, 32, 8, 50), (2, 64, 16, 97)])
def test_ebt_flops_formula_matches_counter(rec, over, steps, L, D, S, V):
    """Every product of the EBT's training step (context stream, candidate stream, dE/dp and its
    second-order backward, the V -> D projection) is in the formula, exactly."""
    cfg = ModelConfig(model="ebt", size="4xs", n_layer=L, d_model=D, n_head=2, vocab_size=V, context_length=S,
                      ebt=recipe(rec, **over))
    torch.manual_seed(0)
    model = build_model(cfg).double()  # float64: alpha 500 on random weights stays finite
    n = steps or cfg.ebt.eval_steps
    counted = count_train_flops(model, torch.randint(1, V, (3, S + 1)), n_steps=n)
    parts = ebt_train_flops(cfg, n)
    assert counted == parts["matmul"]
    assert parts["total"] == parts["matmul"] + parts["self"] and 0 < parts["self"] < 0.05 * parts["total"]


def test_ebt_s1_costs_four_to_six_transformer_steps():
    """Per token, an S1 step on the candidate stream is forward + dE/dp + the second-order backward of
    both (6 passes against the Transformer++'s 3), and each landscape's context adds one Transformer++
    step on the body: 12 VD + 18 P against 3 VD + 3 P, so 4x when the vocabulary dominates and 6x when
    the blocks do (the paper counts 6.66x; the official code 5.3x at xxs, where V = 50277 dominates)."""
    def ratio(**kw):
        tpp, ebt = ModelConfig(**kw), ModelConfig(model="ebt", **kw)
        return ebt_train_flops(ebt)["matmul"] / transformer_train_flops(tpp)

    assert 4.0 < ratio(size="xxs", context_length=256) < 4.6
    assert ratio(size="small", vocab_size=2, context_length=512) == pytest.approx(6.0, rel=0.02)
    assert ratio(size="4xs", vocab_size=10**7, context_length=8) == pytest.approx(4.0, rel=0.01)


# -------------------------------------------------------------------------------------------- fits

def test_fit_recovers_known_slopes_and_rate():
    xs = [1e4, 3e4, 1e5, 3e5, 1e6]
    exact = fit_loglog(xs, [50 * x ** -0.2 for x in xs])
    assert exact["slope"] == pytest.approx(-0.2, abs=1e-12) and exact["intercept"] == pytest.approx(math.log(50))
    assert exact["r2"] == pytest.approx(1.0) and exact["stderr"] < 1e-10
    assert scaling_rate(-0.3, -0.2) == pytest.approx(0.5) and scaling_rate(-0.1, -0.2) == pytest.approx(-0.5)

    # noisy points from 5 seeds: per-seed slopes scatter, the interval over seeds covers the truth
    rng = random.Random(0)
    rows = []
    for seed in range(5):
        for x in xs:
            for model, b in (("ebt", -0.3), ("transformer", -0.2)):
                y = 80 * x ** b * math.exp(rng.gauss(0, 0.02))
                rows.append({"model": model, "seed": seed, "params": x, "flops": 6 * x, "metric": y})
    fits = fit_study(rows, "size", ["transformer", "ebt"])
    for res in ("params", "flops"):
        f = fits[res]["fits"]
        assert f["ebt"]["slope"] == pytest.approx(-0.3, abs=0.02)
        assert f["transformer"]["slope"] == pytest.approx(-0.2, abs=0.02)
        lo, hi = f["ebt"]["slope_over_seeds"]["ci95"]
        assert lo < -0.3 < hi
        rate = fits[res]["scaling_rate"]
        assert rate["interval"] == "t over seeds" and len(rate["per_seed"]) == 5
        assert rate["ci95"][0] < 0.5 < rate["ci95"][1] and rate["mean"] == pytest.approx(0.5, abs=0.1)
    # one seed: a delta-method interval around the rate
    one = rate_with_ci({0: fit_loglog(xs, [x ** -0.3 * (1.01 if i % 2 else 1) for i, x in enumerate(xs)])},
                       {0: fit_loglog(xs, [x ** -0.2 * (1.01 if i % 2 else 1) for i, x in enumerate(xs)])})
    assert one["ci95"][0] < one["mean"] < one["ci95"][1] and "delta" in one["interval"]
    assert mean_ci([1.0, 2.0, 3.0])["ci95"] == pytest.approx([2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)])


def test_fit_refuses_what_cannot_be_fitted():
    with pytest.raises(ConfigError, match="at least 2"):
        fit_loglog([1.0], [2.0])
    with pytest.raises(ConfigError, match="positive"):
        fit_loglog([1.0, 0.0], [2.0, 3.0])
    with pytest.raises(ConfigError, match="distinct"):
        fit_loglog([2.0, 2.0], [2.0, 3.0])


# ---------------------------------------------------------------------------------------- a study

@pytest.fixture(scope="module")
def data_dir(tiny_data):  # the tiny corpus of test_train.py
    return tiny_data[0]


def tiny_study(data_dir, out, **kw) -> StudyConfig:
    d = dict(axis="size", values=["1x16x2", "1x32x2"], out_dir=str(out), data_dir=str(data_dir), context_length=16,
             steps=4, batch_size=4, warmup_steps=1, eval_windows=0, eval_batch_size=4, device="cpu",
             precision="fp64", lr=3e-3)
    d.update(kw)
    return study_from_dict(d)


def test_study_end_to_end_skips_finished_and_resumes_interrupted(data_dir, tmp_path, monkeypatch):
    from ebt.train import train

    study = tiny_study(data_dir, tmp_path / "study")
    # interrupt one run half-way, as a killed job would leave it
    ebt_small = next(r for r in plan(study) if r.model == "ebt" and r.value == "1x32x2")
    ebt_small.run.train.stop_at = 2
    train(ebt_small.run, log=lambda *a: None)
    logs = []
    summary = run_study(study, log=logs.append)
    assert any("resuming" in x for x in logs) and sum("training ->" in x for x in logs) == 3
    out = tmp_path / "study"
    assert (out / "scaling.png").stat().st_size > 1000 and (out / "summary.md").is_file()
    saved = json.loads((out / "summary.json").read_text())
    assert len(saved["runs"]) == 4 and saved["missing_runs"] == 0
    for res in ("params", "flops"):
        fits = saved["fits"][res]
        assert set(fits["fits"]) == {"transformer", "ebt"} and math.isfinite(fits["scaling_rate"]["mean"])
    r0 = next(r for r in summary["runs"] if r["model"] == "ebt" and r["value"] == "1x32x2")
    assert r0["flops"] == pytest.approx(r0["flops_per_token"] * 4 * 4 * 16)

    # the resumed run equals one trained without interruption
    fresh = next(r for r in plan(tiny_study(data_dir, tmp_path / "fresh")) if r.model == "ebt" and r.value == "1x32x2")
    train(fresh.run, log=lambda *a: None)
    a = load_file(str(fresh.out_dir / "checkpoint" / "model.safetensors"))
    b = load_file(str(ebt_small.out_dir / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # running again trains nothing
    import ebt.train as tr

    monkeypatch.setattr(tr, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    logs.clear()
    run_study(study, log=logs.append)
    assert sum("skipped" in x for x in logs) == 4


def test_study_bad_input(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown scaling axis 'params'"):
        tiny_study(data_dir, tmp_path, axis="params")
    with pytest.raises(ConfigError, match="at least 2 values"):
        tiny_study(data_dir, tmp_path, values=["4xs"])
    with pytest.raises(ConfigError, match="unknown model"):
        tiny_study(data_dir, tmp_path, models=["dit"])
    with pytest.raises(ConfigError, match="LAYERSxWIDTHxHEADS"):
        plan(tiny_study(data_dir, tmp_path, values=["huge", "4xs"]))
    with pytest.raises(ConfigError, match="less than one step"):
        plan(tiny_study(data_dir, tmp_path, axis="tokens", values=["10", "1000"]))
    with pytest.raises(ConfigError, match="launcher='torchrun'"):
        tiny_study(data_dir, tmp_path, fsdp=True)
    with pytest.raises(DataError, match="ebt data prepare"):
        plan(tiny_study(tmp_path / "nope", tmp_path))
    toml = tmp_path / "s.toml"
    toml.write_text('axis = "depth"\nvalues = [1, 2]\nstep = 3\n')
    with pytest.raises(ConfigError, match=r"unknown study keys \['step'\]"):
        load_study(toml)
    toml.write_text('axis = "depth"\nvalues = [1, 2]\nsteps = 3\n')
    s = load_study(toml, out_dir=str(tmp_path / "d"), data_dir=str(data_dir), context_length=16)
    assert s.values == ["1", "2"] and s.steps == 3
    assert [r.run.model.n_layer for r in plan(s)] == [1, 1, 2, 2]
    # a study directory keeps its fixed settings
    from ebt.scale import check_study_dir

    check_study_dir(s)
    with pytest.raises(ConfigError, match="other settings.*steps"):
        check_study_dir(study_from_dict({**s.__dict__, "steps": 5}))


def test_axes_set_what_they_vary(data_dir, tmp_path):
    runs = plan(tiny_study(data_dir, tmp_path, axis="tokens", values=["128", "256"], models=["ebt"]))
    assert [r.run.train.steps for r in runs] == [2, 4]
    runs = plan(tiny_study(data_dir, tmp_path, axis="batch", values=["2", "8"], models=["transformer"]))
    assert [r.run.train.batch_size for r in runs] == [2, 8]
    runs = plan(tiny_study(data_dir, tmp_path, axis="width", values=["16", "32"], models=["transformer"],
                           n_head=2, seeds=[0, 1]))
    assert [(r.run.model.d_model, r.seed) for r in runs] == [(16, 0), (16, 1), (32, 0), (32, 1)]


@pytest.mark.slow
def test_study_torchrun_launcher_matches_local(data_dir, tmp_path):
    """launcher='torchrun' runs each run as a 2-process gloo job (DDP): the Transformer++ runs end with
    the weights of the in-process study, and the report is the same."""
    local = run_study(tiny_study(data_dir, tmp_path / "local", models=["transformer"]), log=lambda *a: None)
    dist = run_study(tiny_study(data_dir, tmp_path / "dist", models=["transformer"], launcher="torchrun",
                                nproc_per_node=2, torchrun_args=["--standalone"]), log=lambda *a: None)
    for a, b in zip(local["runs"], dist["runs"]):
        wa = load_file(str(tmp_path / "local" / a["out_dir"].split("local/")[1] / "checkpoint" / "model.safetensors"))
        wb = load_file(str(tmp_path / "dist" / b["out_dir"].split("dist/")[1] / "checkpoint" / "model.safetensors"))
        assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-10) for k in wa)
    assert dist["fits"]["params"]["fits"]["transformer"]["slope"] == pytest.approx(
        local["fits"]["params"]["fits"]["transformer"]["slope"], rel=1e-6)


def test_rate_warns_when_a_curve_does_not_fall():
    xs = [1.0, 2.0, 4.0]
    rows = [{"model": "ebt", "seed": 0, "layers": x, "flops": x, "metric": 10 * x ** 0.05} for x in xs]
    rows += [{"model": "transformer", "seed": 0, "layers": x, "flops": x, "metric": 10 * x ** -0.1} for x in xs]
    fits = fit_study(rows, "depth", ["transformer", "ebt"])
    assert fits["layers"]["scaling_rate"]["mean"] == pytest.approx(-0.5)
    assert "EBT: the fitted slope is >= 0" in fits["layers"]["scaling_rate"]["warning"]


def test_report_of_an_extreme_fit_plots_and_says_it_says_nothing(tmp_path):
    """Two runs 25 orders of magnitude apart: exp(intercept) overflows a float, the report must not."""
    from ebt.scale import StudyConfig, fit_study, plot_study, summary_markdown

    study = StudyConfig(axis="size", values=["2x32x2", "2x64x2"], models=["transformer"], out_dir=str(tmp_path))
    rows = [{"model": "transformer", "value": v, "seed": 0, "out_dir": "", "val_loss": math.log(y), "val_ppl": y,
             "metric": y, "params": p, "params_total": p, "layers": 2, "width": 32, "tokens": 1000, "batch": 4,
             "flops_per_token": 6.0 * p, "flops": 6000.0 * p, "seconds": 1.0}
            for v, p, y in (("2x32x2", 2e4, 1e30), ("2x64x2", 4e4, 1e5))]
    fits = fit_study(rows, "size", ["transformer"])
    assert fits["params"]["fits"]["transformer"]["intercept"] > 709  # math.exp of it alone would overflow
    assert plot_study(rows, fits, study, tmp_path / "scaling.png").is_file()
    assert "The fit says nothing for Transformer++" in summary_markdown(rows, fits, study)
