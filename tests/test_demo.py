"""The demo's phase 5 (what the EBT does): verdicts follow the numbers; the phase runs on an untrained EBT."""

import math

import pytest
import torch

from ebt.config import ModelConfig, recipe
from ebt.demo import (FACTORS, energy_descent, interval, ood_advantage, ppl_cell, relative_change,
                      thinking_gain, verdict, what_the_ebt_does)
from ebt.models import build_model

HOLDS, NOT, UNCLEAR = "holds", "does not hold at this size", "unclear: the 95% interval includes no change"


def test_verdict_follows_the_value_and_interval():
    assert verdict(-1.0, -2.0, -0.5) == HOLDS
    assert verdict(-1.0, -2.0, 0.5) == UNCLEAR  # right direction, but the interval reaches no change
    assert verdict(0.5, -1.0, 2.0) == NOT
    assert verdict(0.0, 0.0, 0.0) == NOT


def test_interval_of_a_constant_is_that_constant_and_covers_the_mean():
    assert interval(lambda i: 3.0, 10) == (3.0, 3.0)
    x = torch.arange(20, dtype=torch.float64)
    lo, hi = interval(lambda i: float(x[i].mean()), 20)
    assert lo < 9.5 < hi and hi - lo < 10


def runs_(nll1, nllk, tokens=10.0):
    """thinking_runs' figures built by hand: per-window summed NLL at 1x and at 4x the default steps."""
    n = len(nll1)
    return {"nll": {1: torch.tensor(nll1, dtype=torch.float64), 4: torch.tensor(nllk, dtype=torch.float64)},
            "tokens": torch.full((n,), tokens, dtype=torch.float64)}


def test_thinking_gain_holds_only_when_perplexity_falls():
    base = [20.0 + 0.1 * i for i in range(16)]  # mean NLL about 2 nats per token
    better = runs_(base, [b - 2.0 + 0.01 * (i % 3) for i, b in enumerate(base)])
    g = thinking_gain(better, 4)
    # token-weighted: the summed NLL change over all tokens
    assert g["change"] == pytest.approx(math.expm1((-2.0 * 16 + 0.01 * 15) / 160), rel=1e-12)
    assert g["ppl"] == pytest.approx(math.exp(sum(better["nll"][4].tolist()) / 160), rel=1e-12)
    assert g["interval"][1] < 0 and g["verdict"] == HOLDS
    worse = thinking_gain(runs_(base, [b + 2.0 for b in base]), 4)
    assert worse["change"] > 0 and worse["verdict"] == NOT
    mixed = thinking_gain(runs_(base, [b + (3.0 if i % 2 else -3.2) for i, b in enumerate(base)]), 4)
    assert mixed["change"] < 0 and mixed["verdict"] == UNCLEAR  # a mean gain the windows disagree on


def test_relative_change_is_capped_for_untrained_models():
    assert relative_change(runs_([0.0], [1e6]), 4) == math.expm1(700.0)


def test_ood_advantage_needs_a_larger_gain_out_of_distribution_and_a_gain_there():
    base = [20.0 + 0.1 * i for i in range(16)]
    val = runs_(base, [b - 0.5 for b in base])  # -5% in-domain
    assert ood_advantage(val, runs_(base, [b - 2.0 for b in base]), 4)["verdict"] == HOLDS  # -18% OOD
    assert ood_advantage(val, runs_(base, [b - 0.1 for b in base]), 4)["verdict"] == NOT  # -1% OOD
    worse_both = runs_(base, [b + 1.0 for b in base])
    # OOD gets worse by less than in-domain: "larger gain" would hold on the difference alone
    a = ood_advantage(runs_(base, [b + 2.0 for b in base]), worse_both, 4)
    assert a["difference"] < 0 and a["verdict"] == NOT


def test_energy_descent_verdict_and_every_step():
    falling = torch.tensor([[3.0, 3.2, 2.9], [2.0, 2.1, 1.9], [1.0, 1.1, 0.9]]).double()  # (steps+1, windows)
    d = energy_descent(falling)
    assert d["trace"] == pytest.approx([3.0333333, 2.0, 1.0]) and d["change"] == pytest.approx(-2.0333333)
    assert d["every_step"] and d["verdict"] == HOLDS
    bumpy = torch.tensor([[3.0, 3.2, 2.9], [3.5, 3.4, 3.6], [1.0, 1.1, 0.9]]).double()
    assert not energy_descent(bumpy)["every_step"] and energy_descent(bumpy)["verdict"] == HOLDS
    assert energy_descent(falling.flip(0))["verdict"] == NOT


def test_an_untrained_ebt_shows_untrained_at_step_0_only():
    assert ppl_cell("ebt", 0, 1.01e304, 8192) == "untrained"
    assert ppl_cell("ebt", 0, float("nan"), 8192) == "untrained"
    assert ppl_cell("ebt", 0, 900.0, 8192) == "900.00"
    assert ppl_cell("ebt", 50, 1.01e304, 8192) == "1.01e+304"
    assert ppl_cell("transformer", 0, 9000.0, 8192) == "9000.00"


@pytest.mark.parametrize("name", ["s1", "s2"])
def test_the_phase_runs_on_a_tiny_untrained_ebt(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="ebt", size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=19,
                                    context_length=6, pad_token_id=0, ebt=recipe(name)))
    g = torch.Generator().manual_seed(0)
    splits = {"validation": torch.randint(1, 19, (5, 7), generator=g),
              "ood": torch.randint(1, 19, (4, 7), generator=g)}
    lines = []
    found = what_the_ebt_does(model, splits, log=lines.append)
    verdicts = (HOLDS, NOT, UNCLEAR)
    # (a) per split, (b) its two comparisons, (c) per split and factor, the OOD advantage
    assert len(found) == 2 + 2 + 2 * (len(FACTORS) - 1) + 1
    for key, f in found.items():
        assert f["verdict"] in verdicts, key
        numbers = [v for v in f.values() if isinstance(v, float)] + [*f["interval"], *f.get("trace", [])]
        assert numbers and all(math.isfinite(x) for x in numbers), key
    steps = 4 * (2 if name == "s2" else 2)  # 4x the default: S2 2 steps; S1 1 step on each of 2 landscapes
    assert len(found["(a) energy falls on validation"]["trace"]) == steps + 1
    assert sum(line.rstrip().endswith(verdicts) for line in lines) == len(found)
    again = what_the_ebt_does(model, splits, log=lambda line: None)
    assert again == found  # seeded: the same windows give the same findings


def test_a_finished_run_is_reused_and_another_models_run_is_trained_anew(tmp_path, monkeypatch):
    import json

    import ebt.train
    from ebt.config import to_dict
    from ebt.demo import demo_run, train_once

    calls = []
    monkeypatch.setattr(ebt.train, "train", lambda run, **kw: calls.append(kw) or {"step": run.train.steps})
    run = demo_run("ebt", "data/default", tmp_path, 300, 8192, 0)
    assert train_once(run, print) == ({"step": 300}, True) and calls == [{"resume": False, "log": print}]
    (tmp_path / "config.json").write_text(json.dumps(to_dict(run)))
    (tmp_path / "final_metrics.json").write_text(json.dumps({"step": 300, "val": {"ppl": 5.0}}))
    assert train_once(run, print) == ({"step": 300, "val": {"ppl": 5.0}}, False) and len(calls) == 1
    older = demo_run("ebt", "data/default", tmp_path, 300, 8192, 0)
    older.model.ebt = recipe("s1")  # an earlier demo's EBT in the same folder
    (tmp_path / "config.json").write_text(json.dumps(to_dict(older)))
    lines = []
    assert train_once(run, lines.append)[1] and calls[-1] == {"log": lines.append, "force": True}
    assert lines == [f"   ({tmp_path} holds another model: training anew)"]


def test_demo_passes_skip_source_to_the_data_preparation(tmp_path, monkeypatch):
    import ebt.data.shards
    from ebt.cli import main

    seen = {}

    def stop(out_dir, **kw):  # the preparation is where a missing source matters; stop the demo there
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr(ebt.data.shards, "prepare_dataset", stop)
    with pytest.raises(SystemExit):
        main(["demo", "--data", str(tmp_path), "--skip-source", "bible,gutenberg", "--skip-source", "austen"])
    assert seen["skip_sources"] == ("bible", "gutenberg", "austen")
