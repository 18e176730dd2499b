"""`ebt reproduce scaling` (claim 1): the data-axis points, the size parsing, the scaling-rate verdict, and
the whole claim at the tiny scale, reused on a second call."""

import json
import math

import pytest

from ebt.errors import ConfigError
from ebt.paper.common import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from ebt.paper.scaling import data_points, size_points, size_scale, steeper, val_history
from test_paper_common import tiny_claim
from test_train import tiny_data  # noqa: F401  (the fixture)


def fits(slopes: dict) -> dict:
    return {m: {seed: {"slope": v, "stderr": 0.01, "n": 5} for seed, v in enumerate(vals)}
            for m, vals in slopes.items()}


def test_the_rate_is_paired_by_seed_with_a_t_interval():
    out = steeper(fits({"ebt": [-0.2, -0.3, -0.25], "transformer": [-0.1, -0.2, -0.15]}))
    per_seed = [1.0, 0.5, 0.25 / 0.15 - 1]  # |slope_EBT| / |slope_T++| - 1, seed by seed
    mean = sum(per_seed) / 3
    sd = math.sqrt(sum((r - mean) ** 2 for r in per_seed) / 2)
    assert out["rate"] == pytest.approx(mean)
    assert out["rate_ci95"] == pytest.approx([mean - 4.303 * sd / math.sqrt(3), mean + 4.303 * sd / math.sqrt(3)])
    assert out["difference"] == pytest.approx(-0.1) and out["basis"] == "scaling rate"
    assert out["verdict"] == REPRODUCED  # every seed's rate is well above 0
    flat = steeper(fits({"ebt": [-0.1, -0.3, -0.2], "transformer": [-0.2, -0.1, -0.2]}))
    assert flat["verdict"] == INCONCLUSIVE  # rates -0.5 / +2 / 0 spread across 0


def test_a_rising_ebt_is_judged_by_the_signed_slopes_not_the_ratio():
    # |+0.3| / |-0.1| - 1 = +2 would read as "scales faster"; the loss rising with the resource is the opposite
    out = steeper(fits({"ebt": [0.3, 0.31, 0.29], "transformer": [-0.1, -0.11, -0.09]}))
    assert out["rate"] == pytest.approx(2.0, abs=0.3) and not out["all_falling"]
    assert out["basis"].startswith("slope difference") and out["verdict"] == NOT_REPRODUCED


def test_the_data_axis_fits_from_the_start_fraction_on_and_the_size_axis_at_the_end():
    row = {"tokens_per_step": 64, "params": 100, "flops_per_token": 10.0,
           "seeds": {0: {0: 9.0, 2: 5.0, 4: 4.0, 6: 3.5, 8: 3.0}}}
    assert data_points(row, 0, 8, 0.25) == ([128, 256, 384, 512], [5.0, 4.0, 3.5, 3.0])
    assert data_points(row, 0, 8, 0.5) == ([256, 384, 512], [4.0, 3.5, 3.0])
    small = {"tokens_per_step": 64, "params": 10, "flops_per_token": 2.0, "seeds": {0: {8: 4.0}}}
    assert size_points({"a": small, "b": row}, 0, 8, "params") == ([10, 100], [4.0, 3.0])
    assert size_points({"a": small, "b": row}, 0, 8, "flops") == ([2.0 * 64 * 8, 10.0 * 64 * 8], [4.0, 3.0])


def test_sizes_are_named_or_layers_x_width_x_heads():
    assert size_scale({"size": "4xs"}, "2x64x2") == {"size": "4xs", "n_layer": 2, "d_model": 64, "n_head": 2}
    assert size_scale({"size": "4xs", "n_layer": 2}, "xxs") == {"size": "xxs", "n_layer": None,
                                                               "d_model": None, "n_head": None}
    with pytest.raises(ConfigError, match="size 'big' is neither a named size nor LAYERSxWIDTHxHEADS"):
        size_scale({"size": "4xs"}, "big")


def test_the_history_comes_from_the_metrics_file_the_last_row_of_a_step_winning(tmp_path):
    rows = [{"split": "val", "step": 0, "loss": 9.0}, {"split": "train", "step": 2, "loss": 7.0},
            {"split": "val", "step": 2, "loss": 6.5}, {"split": "val", "step": 2, "loss": 6.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert val_history(tmp_path) == {0: 9.0, 2: 6.0}


@pytest.mark.slow
def test_the_scaling_claim_end_to_end_at_tiny_scale_then_from_its_cache(tmp_path, tiny_data, monkeypatch):
    import ebt.train
    from ebt.paper import reproduce
    from ebt.paper.scaling import SCALES

    out = tmp_path / "rep"
    first, _ = tiny_claim("scaling", out, tiny_data[0])
    assert first["rows"][0]["finding"].startswith("The EBT scales faster") and len(first["rows"]) == 5
    assert "FLOPs per token" in first["rows"][0]["budget"] and "EBT spends" in first["rows"][0]["budget"]
    s = SCALES["tiny"]
    for axis, n in (("tokens", s["steps"] // s["eval_every"]), ("params", 2), ("flops", 2)):
        f = first["data"]["fits"][axis]
        assert math.isfinite(f["rate"]) and math.isfinite(f["difference"])
        assert all(fit["n"] == n and math.isfinite(fit["slope"])
                   for per_model in f["fits"].values() for fit in per_model.values())
    assert first["data"]["flops_ratio"] > 3  # the EBT's several-fold FLOPs per token
    monkeypatch.setattr(ebt.train, "train", lambda *a, **k: pytest.fail("a finished training ran again"))
    again = reproduce("scaling", scale="tiny", out=str(out), data_dir=str(tiny_data[0]), log=lambda *a: None)
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)  # (nan != nan as floats)
