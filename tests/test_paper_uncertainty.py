"""`ebt reproduce uncertainty` (claim 4): the batched energies equal ebt.demo.energy_order's and
thinking_runs'; the statistics by hand; the claim end to end at the tiny scale, then cached."""

import math

import pytest
import torch
from test_paper_thinking import VERDICTS, fail, tiny_ebt, windows
from test_paper_common import tiny_claim
from test_train import tiny_data  # noqa: F401 (a fixture)

from ebt.demo import energy_order, thinking_runs
from ebt.paper.uncertainty import statistics, token_energies


def test_batched_energies_are_energy_orders_and_thinking_runs():
    model, w = tiny_ebt(), windows(5)
    r = token_energies(model, w, seed=0, batch=5)
    assert r["energy"].shape == r["own_nll"].shape == (5, 16)
    torch.testing.assert_close(r["natural"], thinking_runs(model, w, seed=0)["energy"], rtol=1e-9, atol=0)
    ref = energy_order(model, w, r["natural"], seed=0)
    for kind in ("shuffled", "random"):
        assert float(r[kind].mean()) == pytest.approx(ref[kind], rel=1e-9)
    d = r["natural"] - r["shuffled"]
    assert float(d.mean()) == pytest.approx(ref["natural < shuffled"]["difference"], rel=1e-9)


def test_rank_correlation_is_spearman_over_the_non_pad_tokens():
    from ebt.inspect import spearman
    from ebt.paper.uncertainty import rank_correlation

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, generator=g, dtype=torch.float64)
    b = a + torch.randn(4, 6, generator=g, dtype=torch.float64)  # correlated
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2, 3:] = False
    assert rank_correlation(a, b, mask) == pytest.approx(spearman(a[mask], b[mask]), abs=1e-12)
    i = torch.tensor([3, 0, 2])  # a subset of windows, no window twice (no ties)
    assert rank_correlation(a, b, mask, i) == pytest.approx(spearman(a[i][mask[i]], b[i][mask[i]]), abs=1e-12)
    assert rank_correlation(a, a, mask) == pytest.approx(1.0)


def test_statistics_by_hand():
    W, S = 6, 5
    nll = torch.arange(W * S, dtype=torch.float64).reshape(W, S)
    mask = torch.ones(W, S, dtype=torch.bool)
    mask[0, 0] = False
    energy = 2 * nll + 1  # the same order as the Transformer++'s NLL
    energy[0, 0] = 1e9  # a pad target: left out, or it would break the order
    r = {"energy": energy, "own_nll": -nll, "natural": torch.arange(W, dtype=torch.float64),
         "shuffled": torch.arange(W, dtype=torch.float64) + 1, "random": torch.full((W,), 10.0)}
    s = statistics(r, nll, mask, scatter=7, seed=0)
    assert s["energy_tpp_nll"]["point"] == pytest.approx(1.0) and s["energy_tpp_nll"]["interval"] == [
        pytest.approx(1.0), pytest.approx(1.0)]
    assert s["energy_own_nll"]["point"] == pytest.approx(-1.0)
    assert s["natural < shuffled"] == {"point": -1.0, "interval": [-1.0, -1.0]}
    assert s["shuffled < random"]["point"] == pytest.approx(3.5 - 10.0)
    assert s["mean_energy"] == {"natural": 2.5, "shuffled": 3.5, "random": 10.0}
    assert s["tokens"] == W * S - 1 and len(s["scatter"]["energy"]) == 7 and 1e9 not in s["scatter"]["energy"]
    assert all(e == 2 * n + 1 for e, n in zip(s["scatter"]["energy"], s["scatter"]["tpp_nll"]))


def test_uncertainty_claim_end_to_end_then_cached(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    from ebt.paper import reproduce

    root, _ = tiny_data
    out = tmp_path / "reproduce"
    first, saved = tiny_claim("uncertainty", out, root)
    rows = saved["rows"]
    assert len(rows) == 5
    assert all(r["verdict"] in VERDICTS and "FLOPs per token" in r["budget"] for r in rows)
    data = saved["data"]
    assert data["windows"] == 8 and data["snapshots"] == [3, 6] and set(data["per_seed"]) == {"0", "1"}
    for seed in data["per_seed"].values():
        for cell in seed.values():
            for key in ("energy_tpp_nll", "energy_own_nll", "own_nll_tpp_nll"):
                assert -1.0 <= cell[key]["point"] <= 1.0
                assert cell[key]["interval"][0] <= cell[key]["interval"][1]
            assert all(math.isfinite(v) for v in cell["mean_energy"].values())
            assert cell["tokens"] == 8 * 16 and len(cell["scatter"]["energy"]) == 128  # tiny: every token
    monkeypatch.setattr("ebt.train.train", fail)
    monkeypatch.setattr("ebt.models.load_model", fail)
    again = reproduce("uncertainty", "tiny", out=str(out), data_dir=str(root), log=lambda *a: None)
    assert again["rows"] == first["rows"]
