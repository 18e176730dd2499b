"""`ebt reproduce thinking` (claim 2): one long thinking run gives ebt.demo.thinking_runs' numbers at every
step count; the temperature control, the slope and the conjunction's verdict by hand; the claim end to end
at the tiny scale, a second call reusing every training and evaluation."""

import json
import math

import pytest
import torch
from test_paper_common import tiny_claim
from test_train import tiny_data  # noqa: F401 (a fixture)

from ebt.config import ModelConfig, recipe
from ebt.demo import FACTORS, thinking_runs
from ebt.models import build_model
from ebt.paper.common import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from ebt.paper.lm import all_of
from ebt.paper.thinking import (TEMPERATURES, best_temperature, slope, temperature_change,
                                thinking_nll)

VERDICTS = {REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE}


def tiny_ebt(seed: int = 0):
    """An untrained 1-layer S2 EBT in float64, so different step implementations agree to rounding."""
    torch.manual_seed(seed)
    cfg = ModelConfig(model="ebt", size="4xs", n_layer=1, d_model=32, n_head=2, context_length=16,
                      vocab_size=300, pad_token_id=0, ebt=recipe("s2"))
    return build_model(cfg).eval().double()


def windows(n: int, seed: int = 0) -> torch.Tensor:
    w = torch.randint(1, 300, (n, 17), generator=torch.Generator().manual_seed(seed))
    w[0, -3:] = 0  # pad targets: left out of the NLL and the token count
    return w


def test_one_long_run_reads_off_thinking_runs_at_every_count():
    model, w = tiny_ebt(), windows(6)
    ref = thinking_runs(model, w, seed=0)
    got = thinking_nll(model, w, seed=0, batch=6)
    assert got["steps"] == ref["steps"] == {1: 2, 2: 4, 4: 8}  # S2: 2 default steps
    assert torch.equal(got["tokens"], ref["tokens"]) and got["tokens"][0] == 13
    for f in FACTORS:
        torch.testing.assert_close(got["nll"][f], ref["nll"][f], rtol=1e-9, atol=0)
    assert torch.equal(got["temperature"][1.0], got["nll"][1])  # temperature 1 changes nothing
    assert set(got["temperature"]) == set(TEMPERATURES)
    # batch i is seeded 1000 * seed + i: the first batch of 3 is thinking_runs on those 3 windows
    part = thinking_nll(model, w, seed=0, batch=3)
    torch.testing.assert_close(part["nll"][4][:3], thinking_runs(model, w[:3], seed=0)["nll"][4], rtol=1e-9,
                               atol=0)
    assert not torch.allclose(part["nll"][4][3:], ref["nll"][4][3:])  # other batches draw other noise


def runs_by_hand():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    return {"nll": {1: t(10.0, 20.0)}, "tokens": t(5.0, 5.0),
            "temperature": {0.5: t(12.0, 25.0), 1.0: t(10.0, 20.0), 2.0: t(8.0, 21.0)}}


def test_temperature_control_picks_the_best_temperature_for_the_windows_it_scores():
    r = runs_by_hand()
    assert temperature_change(r) == pytest.approx(math.expm1((29.0 - 30.0) / 10.0), rel=1e-12)  # T = 2
    assert best_temperature(r) == 2.0
    assert temperature_change(r, torch.tensor([0])) == pytest.approx(math.expm1(-2.0 / 5.0), rel=1e-12)
    assert temperature_change(r, torch.tensor([1, 1])) == 0.0  # window 1 alone: temperature 1 is best


def test_slope_and_the_conjunctions_verdict():
    assert slope([0.0, 1.0, 2.0], [1.0, 3.0, 5.0]) == pytest.approx(2.0)
    assert slope([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.2)
    assert math.isnan(slope([1.0, 1.0], [0.0, 5.0]))  # no shift to fit against
    assert all_of([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert all_of([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert all_of([REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE]) == NOT_REPRODUCED  # one part fails: it fails
    assert all_of([]) == INCONCLUSIVE


def fail(*args, **kwargs):
    raise AssertionError("a cached claim trained or loaded a model again")


@pytest.mark.slow
def test_thinking_claim_end_to_end_then_cached(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    from ebt.paper import reproduce

    root, _ = tiny_data
    out = tmp_path / "reproduce"
    folder = out / "thinking"
    first, saved = tiny_claim("thinking", out, root)
    rows = saved["rows"]
    assert len(rows) == 14
    assert all(r["verdict"] in VERDICTS and "FLOPs per token" in r["budget"] for r in rows)
    assert "held-out ood" in rows[0]["finding"] and "8 steps instead of the default 2" in rows[0]["finding"]
    data = saved["data"]
    assert data["snapshots"] == [3, 6] and data["thinking_steps"] == {"1": 2, "2": 4, "4": 8}
    assert set(data["per_seed"]) == {"0", "1"} and data["windows"] == dict.fromkeys(data["splits"], 8)
    for seed in data["per_seed"].values():
        assert seed["shift"]["val"] == 0.0 and all(math.isfinite(v) for v in seed["shift"].values())
        for snap in seed["snapshots"].values():
            for cell in snap.values():
                assert all(0 < v < math.inf for v in cell["ppl"].values())
                assert math.isfinite(cell["change"]["4"]["point"])
                assert cell["temperature"]["point"] <= 0.0 and cell["temperature"]["best"] in TEMPERATURES
    assert math.isfinite(data["pooled"]["slope"]["mean"])
    # the reasoning sets live beside the report, never in the data folder
    assert (folder / "reasoning_data" / "reasoning" / "dyck.jsonl").exists()
    assert set(json.loads((root / "manifest.json").read_text())["splits"]) == {"train", "val", "ood"}

    monkeypatch.setattr("ebt.train.train", fail)
    monkeypatch.setattr("ebt.models.load_model", fail)
    (folder / "thinking.md").unlink()
    again = reproduce("thinking", "tiny", out=str(out), data_dir=str(root), log=lambda *a: None)
    assert again["rows"] == first["rows"] and (folder / "thinking.md").exists()


def test_temperature_nll_is_the_nll_of_the_scaled_logits():
    from ebt.paper.lm import temperature_nll, window_nll

    g = torch.Generator().manual_seed(0)
    z, targets = 4 * torch.randn(3, 5, 40, generator=g), torch.randint(0, 40, (3, 5), generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    for t in (0.5, 2.0):
        torch.testing.assert_close(temperature_nll(z, targets, mask, t), window_nll(z / t, targets, mask),
                                   rtol=1e-5, atol=1e-5)
