"""`ebt reproduce verification` (claim 3): the candidates and the lowest-energy pick equal ebt.think.think's
with several candidates; the comparisons by hand; the claim end to end at the tiny scale, then cached."""

import math

import pytest
import torch
from test_paper_thinking import VERDICTS, fail, tiny_ebt, windows
from test_paper_common import tiny_claim
from test_train import tiny_data  # noqa: F401 (a fixture)

from ebt.fast.plan import resolve_plan
from ebt.paper.lm import target_mask, window_nll
from ebt.paper.verification import CANDIDATES, candidate_nll, change
from ebt.runtime import seeded
from ebt.think import ThinkConfig, think


def test_candidates_and_the_pick_are_think_with_several_candidates():
    model, w = tiny_ebt(), windows(5)
    r = candidate_nll(model, w, n=3, seed=0, batch=5)
    targets = w[:, 1:]
    mask = target_mask(targets, 0)
    for k in (1, 3):
        cfg = ThinkConfig(candidates=k)  # official inference noise: the trained std, as in candidate_nll
        with seeded(0, w.device):
            out = think(model, w[:, :-1], cfg, step=resolve_plan(model, w.device).think_step(model, cfg))
        torch.testing.assert_close(r["picked"][k], window_nll(out.z, targets, mask), rtol=1e-9, atol=0)
    assert torch.equal(r["picked"][1], r["single"][0])
    assert r["single"].shape == (3, 5) and torch.equal(r["tokens"], mask.sum(1).double())
    assert not torch.allclose(r["single"][0], r["single"][1])  # the noise makes candidates differ


def test_changes_against_one_candidate_and_a_random_pick_by_hand():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    r = {"single": t([10.0, 20.0], [16.0, 18.0]), "picked": {1: t(10.0, 20.0), 2: t(9.0, 15.0)},
         "tokens": t(5.0, 5.0)}
    assert change(r, 2) == pytest.approx(math.expm1((24.0 - 30.0) / 10.0), rel=1e-12)
    assert change(r, 2, against="random") == pytest.approx(math.expm1((24.0 - 32.0) / 10.0), rel=1e-12)
    assert change(r, 2, "random", "one") == pytest.approx(math.expm1(2.0 / 10.0), rel=1e-12)
    assert change(r, 2, i=torch.tensor([1])) == pytest.approx(math.expm1(-5.0 / 5.0), rel=1e-12)
    assert change(r, 1) == 0.0


def test_verification_claim_end_to_end_then_cached(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    from ebt.paper import reproduce

    root, _ = tiny_data
    out = tmp_path / "reproduce"
    first, saved = tiny_claim("verification", out, root)
    rows = saved["rows"]
    assert len(rows) == 9
    assert all(r["verdict"] in VERDICTS and "FLOPs per token" in r["budget"] for r in rows)
    data = saved["data"]
    assert data["candidates"] == list(CANDIDATES) and set(data["per_seed"]) == {"0", "1"}
    for seed in data["per_seed"].values():
        for snap in seed["snapshots"].values():
            for cell in snap.values():
                assert all(0 < cell[f"ppl_{how}{k}"] < math.inf for how in ("best", "random")
                           for k in CANDIDATES)
                assert cell["ppl_best1"] == cell["ppl_random1"]  # one candidate: nothing to pick
                assert all(math.isfinite(cell[f"{key}{k}"]["point"]) for key in ("best", "best_vs_random")
                           for k in CANDIDATES[1:])
    monkeypatch.setattr("ebt.train.train", fail)
    monkeypatch.setattr("ebt.models.load_model", fail)
    again = reproduce("verification", "tiny", out=str(out), data_dir=str(root), log=lambda *a: None)
    assert again["rows"] == first["rows"]
