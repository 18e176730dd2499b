"""The frame every `ebt reproduce` claim shares: verdicts from intervals, intervals, cached trainings and the
snapshots along a run."""

import json
import math

import pytest
import torch

from ebt.paper.common import (INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Claim, Context, Result, Row,
                              bootstrap, run_dir, seed_interval, verdict, write_report)
from test_train import run_config, tiny_data  # noqa: F401  (the fixture)


def tiny_claim(name: str, out, data_dir) -> tuple[dict, dict]:
    """Run a claim at tiny scale and check what every claim's report must be: its three files written, the
    JSON the returned content, every verdict one of the three and the claim's its first row's. Returns the
    content as returned and as saved."""
    from ebt.paper import reproduce

    first = reproduce(name, "tiny", out=str(out), data_dir=str(data_dir), log=lambda *a: None)
    folder = out / name
    assert all((folder / f"{name}.{ext}").stat().st_size > 0 for ext in ("md", "json", "png"))
    saved = json.loads((folder / f"{name}.json").read_text())
    assert saved == json.loads(json.dumps(first)) and saved["verdict"] == saved["rows"][0]["verdict"]
    assert all(r["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE) for r in saved["rows"])
    return first, saved


def test_verdict_comes_from_the_interval_on_the_papers_side():
    assert verdict(-0.2, -0.3, -0.1) == REPRODUCED
    assert verdict(0.2, 0.1, 0.3) == NOT_REPRODUCED
    assert verdict(-0.2, -0.5, 0.1) == INCONCLUSIVE  # the point agrees, the interval does not decide
    assert verdict(0.2, 0.1, 0.3, expect="above") == REPRODUCED
    assert verdict(-0.2, -0.3, -0.1, expect="above") == NOT_REPRODUCED
    assert verdict(1.0, float("nan"), float("nan"), expect="above") == INCONCLUSIVE  # one seed: no interval
    with pytest.raises(ValueError):
        verdict(0, -1, 1, expect="down")


def test_seed_interval_is_the_student_t_interval():
    mean, lo, hi = seed_interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert mean == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    assert math.isnan(seed_interval([5.0])[1])


def test_bootstrap_of_a_constant_is_that_constant_and_covers_the_mean():
    x = torch.full((50,), 3.0)
    assert bootstrap(lambda i: float(x[i].mean()), 50) == (3.0, 3.0)
    y = torch.randn(400, generator=torch.Generator().manual_seed(0)) + 1.0
    lo, hi = bootstrap(lambda i: float(y[i].mean()), 400)
    assert lo < float(y.mean()) < hi and 0.1 < hi - lo < 0.3  # about 4 standard errors of 0.05


def test_run_folders_differ_by_config_not_by_where_or_where_it_pauses(tmp_path, tiny_data):
    a = run_config(tiny_data[0], tmp_path / "a")
    b = run_config(tiny_data[0], tmp_path / "b", stop_at=3, progress=True)
    c = run_config(tiny_data[0], tmp_path / "a", lr=1e-3)
    assert run_dir(tmp_path, "x", a) == run_dir(tmp_path, "x", b)
    assert run_dir(tmp_path, "x", a) != run_dir(tmp_path, "x", c)


def test_a_series_snapshots_one_run_and_is_reused(tmp_path, tiny_data, monkeypatch):
    import ebt.train
    from ebt.models import load_model
    from ebt.paper.lm import train_series

    ctx = Context(claim="t", scale="tiny", out=tmp_path / "o", runs=tmp_path / "runs",
                  data_dir=str(tiny_data[0]), seeds=(0,), log=lambda *a: None)
    run = run_config(tiny_data[0], tmp_path / "ignored")
    snaps = train_series(ctx, "tpp", run, [3])
    assert sorted(snaps) == [3, 6] and snaps[3].parent == snaps[6].parent
    final = dict(load_model(snaps[6]).state_dict())
    assert any(not torch.equal(v, final[k]) for k, v in load_model(snaps[3]).state_dict().items())
    # the whole run, trained without pausing, ends where the series ends: the pause changes nothing
    straight = run_config(tiny_data[0], tmp_path / "straight")
    ebt.train.train(straight, log=lambda *a: None)
    again = load_model(tmp_path / "straight")
    assert all(torch.equal(v, final[k]) for k, v in again.state_dict().items())
    monkeypatch.setattr(ebt.train, "train", lambda *a, **k: pytest.fail("a finished series trained again"))
    assert train_series(ctx, "tpp", run, [3]) == snaps
    with pytest.raises(RuntimeError, match="already past step 4 without a snapshot"):
        train_series(ctx, "tpp", run, [3, 4])


def test_the_report_is_markdown_json_and_the_first_row_is_the_claim(tmp_path):
    ctx = Context(claim="c", scale="tiny", out=tmp_path, runs=tmp_path / "runs", data_dir="", seeds=(0, 1))
    rows = [Row("the claim", "-1 [-2, -0.5]", REPRODUCED, "6 steps"), Row("a control", "+1", INCONCLUSIVE)]
    content = write_report(ctx, Claim("c", "A claim", "Fig. 1"), Result(rows, data={"x": 1.5}), "ebt reproduce c")
    assert content["verdict"] == REPRODUCED and json.loads((tmp_path / "c.json").read_text()) == content
    md = (tmp_path / "c.md").read_text()
    assert "| the claim | -1 [-2, -0.5] | reproduced | 6 steps |" in md and "`ebt reproduce c`" in md


def test_a_conjunction_is_reproduced_only_if_every_part_is_and_refuted_by_any_part():
    from ebt.paper.common import pooled_verdict

    assert pooled_verdict([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert pooled_verdict([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert pooled_verdict([INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED]) == NOT_REPRODUCED
    assert pooled_verdict([]) == INCONCLUSIVE


def test_the_cli_lists_every_claim_and_refuses_an_unknown_one_in_one_line(capsys):
    from ebt.cli import main
    from ebt.paper import CLAIMS

    main(["reproduce", "--list"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert listed == list(CLAIMS)
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "nonsense"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "invalid choice: 'nonsense'" in err[0]


def test_the_summary_says_which_claims_have_not_run(tmp_path, capsys):
    from ebt.paper import summary

    ctx = Context(claim="video", scale="tiny", out=tmp_path / "video", runs=tmp_path / "runs", data_dir="",
                  seeds=(0, 1))
    ctx.out.mkdir(parents=True)
    write_report(ctx, Claim("video", "A claim", "Fig. 9"), Result([Row("the claim", "+1 [0.5, 2]", REPRODUCED,
                                                                       "4 steps")]), "ebt reproduce video")
    text = summary(str(tmp_path))
    assert "| video: A claim | Fig. 9 | +1 [0.5, 2] (tiny scale; 4 steps) | reproduced |" in text
    assert "| thinking | Fig. 6a, 6b, 7 (S2 thinking, OOD) | not run | - | `ebt reproduce thinking` |" in text
