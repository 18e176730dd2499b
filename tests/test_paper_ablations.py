"""`ebt reproduce ablations` (claim 7, the paper's Table 2): each variant removes one piece of the S2 recipe,
the comparison is paired by seed against the shared full runs, and the whole claim runs at the tiny scale,
reused on a second call."""

import json
import math

import pytest

from ebt.config import recipe, to_dict
from ebt.paper.ablations import FULL, PAPER, VARIANTS, compare, expectation, gain, weights_at
from ebt.paper.common import NOT_REPRODUCED, REPRODUCED, Context
from test_paper_common import tiny_claim
from test_train import run_config, tiny_data  # noqa: F401  (the fixture)


def test_each_variant_changes_only_its_piece_and_fixed_steps_keep_the_default_thinking():
    from ebt.recipe import inference_steps, step_range

    full = to_dict(recipe("s2"))
    changed = {name: {k for k, v in to_dict(recipe("s2", **o)).items() if v != full[k]}
               for name, (_, o) in VARIANTS.items()}
    assert changed == {FULL: set(), "no random alpha": {"alpha_rand_scale"}, "no random steps": {"rand_steps"},
                       "no Langevin": {"langevin"}, "no replay buffer": {"replay_buffer"}}
    fixed = recipe("s2", **VARIANTS["no random steps"][1])
    assert step_range(recipe("s2")) == [2, 3] and step_range(fixed) == [2]  # training: 2 or 3 steps, then 2
    assert inference_steps(fixed) == inference_steps(recipe("s2")) == 2 and fixed.eval_steps == 2


def test_the_papers_signs_set_each_rows_expectation():
    # thinking longer: random alpha and steps help it, Langevin and replay hurt it; with verification all help
    assert [expectation(n, 0) for n in list(VARIANTS)[1:]] == ["above", "above", "below", "below"]
    assert [expectation(n, 1) for n in list(VARIANTS)[1:]] == ["above"] * 4
    assert PAPER[FULL] == (7.19, 18.7)


def result(val, val_long, ood, ood_long, ood_verify):
    return {"val": {"default": {"ppl": val}, "longer": {"ppl": val_long}},
            "ood": {"default": {"ppl": ood}, "longer": {"ppl": ood_long}, "verify": {"ppl": ood_verify}}}


def test_gains_are_percent_improvements_and_drops_are_paired_by_seed():
    r = result(100.0, 90.0, 200.0, 190.0, 150.0)
    assert gain(r, "val", "longer") == pytest.approx(10.0) and gain(r, "ood", "verify") == pytest.approx(25.0)
    full = [result(100.0, 90.0, 200.0, 180.0, 150.0), result(110.0, 99.0, 220.0, 198.0, 176.0),
            result(90.0, 81.0, 180.0, 171.0, 144.0)]  # OOD verify gains 25, 20, 20
    worse = [result(105.0, 100.0, 200.0, 200.0, 190.0), result(120.0, 110.0, 220.0, 220.0, 209.0),
             result(100.0, 95.0, 180.0, 180.0, 171.0)]  # OOD verify gains 5, 5, 5; longer 0, 0, 0
    evals = {name: {"results": worse} for name in VARIANTS}
    evals[FULL] = {"results": full}
    stats = compare(evals)
    d = stats["no random alpha"]["drop_ood_verify"]
    drops = [20.0, 15.0, 15.0]
    mean = sum(drops) / 3
    half = 4.303 * math.sqrt(sum((x - mean) ** 2 for x in drops) / 2) / math.sqrt(3)
    assert d["mean"] == pytest.approx(mean) and d["ci95"] == pytest.approx([mean - half, mean + half])
    assert d["verdict"] == REPRODUCED  # every seed's gain fell by 15-20 points
    # the OOD gain from thinking longer fell from 10, 10, 5 to 0: what the paper expects without random alpha,
    # the opposite of what it reports without Langevin noise
    assert stats["no random alpha"]["drop_ood_longer"]["mean"] == pytest.approx(25 / 3)
    assert stats["no Langevin"]["drop_ood_longer"]["verdict"] == NOT_REPRODUCED
    assert stats["no replay buffer"]["val_ppl_minus_full"]["mean"] == pytest.approx(25 / 3)


def test_a_variant_pauses_where_compared_and_the_series_continues_it(tmp_path, tiny_data, monkeypatch):
    import ebt.train
    from ebt.paper.lm import train_series

    ctx = Context(claim="t", scale="tiny", out=tmp_path / "o", runs=tmp_path / "runs",
                  data_dir=str(tiny_data[0]), seeds=(0,), log=lambda *a: None)
    run = run_config(tiny_data[0], tmp_path / "ignored", eval_every=0)
    snap = weights_at(ctx, "tpp", run, 4, points=[2, 6])
    assert snap.name == "step_4" and (snap.parent / "step_2").is_dir() and not (snap.parent / "step_6").exists()
    assert not (snap.parent / "final_metrics.json").exists()  # trained only as far as needed
    assert weights_at(ctx, "tpp", run, 4) == snap
    series = train_series(ctx, "tpp", run, [2, 4])  # another claim's series finds the snapshots and goes on
    assert series[4] == snap and series[2] == snap.parent / "step_2" and (snap.parent / "step_6").is_dir()
    monkeypatch.setattr(ebt.train, "train", lambda *a, **k: pytest.fail("a finished run trained again"))
    assert weights_at(ctx, "tpp", run, 4) == snap and weights_at(ctx, "tpp", run, 6) == series[6]
    with pytest.raises(RuntimeError, match="already past step 5 without a snapshot"):
        weights_at(ctx, "tpp", run, 5)


@pytest.mark.slow
def test_the_ablations_claim_end_to_end_at_tiny_scale_then_from_its_cache(tmp_path, tiny_data, monkeypatch):
    import ebt.evaluate
    import ebt.train
    from ebt.paper import reproduce
    from ebt.paper.lm import LM_SCALES, shared_series

    out = tmp_path / "rep"
    first, _ = tiny_claim("ablations", out, tiny_data[0])
    rows = first["rows"]
    assert rows[0]["finding"].startswith("Each of the S2 recipe's") and len(rows) == 1 + 2 * 4
    assert "FLOPs per token" in rows[0]["budget"] and "6 steps" in rows[0]["budget"]
    evals = first["data"]["evaluations"]
    assert set(evals) == set(VARIANTS) and all(len(v["results"]) == 2 for v in evals.values())
    assert all(math.isfinite(r[split][how]["ppl"]) for v in evals.values() for r in v["results"]
               for split, hows in (("val", ("default", "longer")), ("ood", ("default", "longer", "verify")))
               for how in hows)
    stats = first["data"]["stats"]
    assert all(math.isfinite(stats[n]["drop_ood_verify"]["mean"]) for n in list(VARIANTS)[1:])
    monkeypatch.setattr(ebt.train, "train", lambda *a, **k: pytest.fail("a finished training ran again"))
    monkeypatch.setattr(ebt.evaluate, "evaluate_thinking", lambda *a, **k: pytest.fail("evaluated again"))
    again = reproduce("ablations", scale="tiny", out=str(out), data_dir=str(tiny_data[0]), log=lambda *a: None)
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)
    # the full recipe's runs are the text claims' shared runs, snapshots included
    ctx = Context(claim="thinking", scale="tiny", out=out / "thinking", runs=out / "runs",
                  data_dir=str(tiny_data[0]), seeds=(0, 1), log=lambda *a: None)
    shared = shared_series(ctx, LM_SCALES["tiny"], "ebt")
    assert all(set(shared[seed]) == {3, 6} for seed in (0, 1))
