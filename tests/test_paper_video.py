"""`ebt reproduce video` (ebt/paper/video.py): claim 6, the video EBT's scaling against the Transformer++."""

import json
import math

import numpy as np
import pytest
import torch

import ebt.data.video as vd
from ebt.config import ModelConfig, recipe
from ebt.models import build_model
from ebt.paper import video
from ebt.paper.common import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED

QUIET = dict(log=lambda *a: None)


def fake_digits(cache_dir):
    # random blobs stand in for the MNIST wheel: no network in tests
    rng = np.random.default_rng(0)
    return (rng.random((100, 28, 28)) > 0.7).astype(np.uint8) * 255, np.arange(100) % 10


@pytest.mark.slow  # eight tiny trainings
def test_reproduce_video_tiny_end_to_end_and_cached(tmp_path, monkeypatch):
    import ebt.train
    from ebt.paper import reproduce

    monkeypatch.setattr(vd, "load_mnist_digits", fake_digits)
    out = reproduce("video", scale="tiny", out=str(tmp_path / "rep"), data_dir=str(tmp_path / "text"),
                    **QUIET)
    folder = tmp_path / "rep" / "video"
    for name in ("video.md", "video.json", "video.png"):
        assert (folder / name).is_file()
    assert open(folder / "video.png", "rb").read(4) == b"\x89PNG"
    content = json.loads((folder / "video.json").read_text())
    assert content == json.loads(json.dumps(out))
    assert content["scale"] == "tiny" and content["seeds"] == [0, 1]
    widths = video.SCALES["tiny"]["widths"]
    # the claim (slopes), one row per width, the scaling rate
    assert len(content["rows"]) == 1 + len(widths) + 1
    assert content["rows"][0]["finding"].startswith("slope of log next-frame Smooth L1")
    assert all(r["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE) for r in content["rows"])
    assert content["verdict"] == content["rows"][0]["verdict"]
    assert "MFLOP/frame" in content["rows"][1]["budget"] and "the EBT spends" in content["rows"][0]["budget"]
    stats = content["data"]["statistics"]
    over = stats["over_seeds"]
    numbers = [*over["slope_diff"], *[x for iv in over["sizes"] for x in iv]]
    assert all(math.isfinite(x) for x in numbers)
    for seed in ("0", "1"):
        v = stats["per_seed"][seed]
        assert all(d["lo"] <= d["diff"] <= d["hi"] for d in v["sizes"])
        assert math.isclose(v["slopes"]["diff"], v["slopes"]["ebt"] - v["slopes"]["transformer"])
        assert all(x > 0 for m in ("ebt", "transformer") for x in v["mean"][m])
    flops = content["data"]["flops_per_frame"]
    assert all(flops[f"ebt-{w}"] > flops[f"transformer-{w}"] > 0 for w in widths)
    md = (folder / "video.md").read_text()
    assert "| seed | size | Transformer++ | EBT |" in md and "![video](video.png)" in md

    # a second call trains nothing, evaluates nothing and writes no clips: it rewrites the report
    def refuse(*a, **k):
        raise AssertionError("called again")

    monkeypatch.setattr(ebt.train, "train", refuse)
    monkeypatch.setattr(vd, "load_mnist_digits", refuse)
    monkeypatch.setattr(video, "evaluate_run", refuse)
    monkeypatch.setattr(video, "flops_per_frame", refuse)
    again = reproduce("video", scale="tiny", out=str(tmp_path / "rep"), data_dir=str(tmp_path / "text"),
                      **QUIET)
    assert json.loads(json.dumps(again)) == content  # the same numbers, from the cache


# ------------------------------------------------------------------------------------------ statistics

def test_size_difference_is_the_paired_mean_with_a_bootstrap():
    d = video.size_difference([0.5, 0.7, 0.9, 0.3], [0.6, 0.6, 1.0, 0.5])
    assert math.isclose(d["diff"], (-0.1 + 0.1 - 0.1 - 0.2) / 4)
    assert -0.2 <= d["lo"] <= d["diff"] <= d["hi"] <= 0.1  # a mean of resampled clips lies within theirs
    same = video.size_difference([0.4, 0.4, 0.4], [0.5, 0.5, 0.5])  # every clip 0.1 better: no spread
    assert math.isclose(same["lo"], -0.1) and math.isclose(same["hi"], -0.1)


def test_slope_difference_of_power_laws_is_exact_under_resampling():
    params = [1e3, 4e3, 16e3]
    scale = [1.0, 2.0, 0.5, 3.0]  # clip c's error is scale[c] * params^b: every resample has slope b
    ebt = [[a * p ** -0.5 for a in scale] for p in params]
    tpp = [[a * p ** -0.2 for a in scale] for p in params]
    s = video.slope_difference(params, ebt, tpp)
    assert math.isclose(s["ebt"], -0.5) and math.isclose(s["transformer"], -0.2)
    assert math.isclose(s["diff"], -0.3) and math.isclose(s["lo"], -0.3) and math.isclose(s["hi"], -0.3)


def test_claim_statistics_by_hand():
    widths, params = [8, 16], [100.0, 400.0]
    # seed 0: the EBT 0.1 better at both widths; seed 1: 0.3 better; both models' clips alike
    evals = {}
    for seed, gap in ((0, 0.1), (1, 0.3)):
        for w, base in zip(widths, (1.0, 0.8)):
            evals["transformer", w, seed] = {"smooth_l1": [base, base], "mse": [2 * base, 2 * base]}
            evals["ebt", w, seed] = {"smooth_l1": [base - gap, base - gap], "mse": [2 * base, 2 * base]}
    stats = video.claim_statistics((0, 1), widths, params, evals)
    mean, lo, hi = stats["over_seeds"]["sizes"][0]
    half = 12.706 * math.sqrt(0.02) / math.sqrt(2)  # t(1 dof) x sd(-0.1, -0.3) / sqrt(2)
    assert math.isclose(mean, -0.2) and math.isclose(lo, -0.2 - half) and math.isclose(hi, -0.2 + half)
    assert stats["over_seeds"]["mse_sizes"][1][0] == 0.0
    s0 = stats["per_seed"]["0"]["slopes"]
    assert math.isclose(s0["transformer"], math.log(0.8) / math.log(4))
    assert math.isclose(s0["ebt"], math.log(0.7 / 0.9) / math.log(4))
    rate = stats["over_seeds"]["rate"]
    per_seed = [abs(math.log(r)) / abs(math.log(0.8)) - 1 for r in (0.7 / 0.9, 0.5 / 0.7)]
    assert math.isclose(rate["mean"], sum(per_seed) / 2)
    # slope differences -0.020 and -0.082: two seeds this far apart leave the sign open
    slope_diff, lo, hi = stats["over_seeds"]["slope_diff"]
    diffs = [math.log(r) / math.log(4) - math.log(0.8) / math.log(4) for r in (0.7 / 0.9, 0.5 / 0.7)]
    assert math.isclose(slope_diff, sum(diffs) / 2) and lo < 0 < hi
    assert video.verdict(slope_diff, lo, hi, expect="below") == INCONCLUSIVE


# ------------------------------------------------------------------------------------------ evaluation

@pytest.mark.parametrize("kind", ["transformer", "ebt"])
def test_clip_errors_average_to_the_frame_weighted_errors(tmp_path, kind):
    """Every clip has the same windows, so the mean of per-clip errors is ebt.video's next-frame error."""
    from ebt.data.video import ClipData, FrameFeatures
    from ebt.video import next_frame_errors

    rng = np.random.default_rng(0)
    np.save(tmp_path / "test.npy", rng.integers(0, 256, (5, 7, 8, 8), dtype=np.uint8))
    data = ClipData(tmp_path, "test", 4, FrameFeatures("pixels", grid=4))
    torch.manual_seed(0)
    model = build_model(ModelConfig(model=kind, size="4xs", n_layer=1, d_model=16, n_head=2, vocab_size=1,
                                    pad_token_id=None, context_length=4, candidate="frames", feature_dim=16,
                                    ebt=recipe("s1", alpha=1.0) if kind == "ebt" else None))
    per_clip = video.clip_errors(model, data, batch_size=32)
    whole = next_frame_errors(model, data, batch_size=32)
    assert len(per_clip["smooth_l1"]) == 5 and len(per_clip["mse"]) == 5
    assert math.isclose(sum(per_clip["smooth_l1"]) / 5, whole["smooth_l1"], rel_tol=1e-5)
    assert math.isclose(sum(per_clip["mse"]) / 5, whole["mse"], rel_tol=1e-5)
