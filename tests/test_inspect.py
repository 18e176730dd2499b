"""`ebt inspect`'s printed report (ebt/inspect.py report_lines): what a user reads instead of raw JSON."""

import math

import pytest
import torch

from ebt.inspect import report_lines, spearman


def _report(n, **validation):
    report = {"png": "out/energy.png", "tokens": [f" t{i}" for i in range(n)],
              "final_energy": [0.5 + i / 8 for i in range(n)]}
    if validation:
        report["validation"] = {"tokens": 8192, "spearman_energy_nll": 0.42, **validation}
    return report


def test_short_text_every_token():
    assert report_lines(_report(3)) == [
        "energy heatmap: out/energy.png",
        "final energy of each predicted token (3 tokens; lower: more certain)",
        "    #  token                    energy",
        "    1  ' t0'                    0.5000",
        "    2  ' t1'                    0.6250",
        "    3  ' t2'                    0.7500",
    ]


def test_long_text_is_shortened_in_the_middle():
    report = _report(50)
    report["tokens"][1] = "a_very_long_token_indeed"
    lines = report_lines(report, max_tokens=4)
    assert lines[2:] == [
        "    #  token                    energy",
        "    1  ' t0'                    0.5000",
        "    2  'a_very_long_tok...'     0.6250",
        "  ...  (46 tokens left out)",
        "   49  ' t48'                   6.5000",
        "   50  ' t49'                   6.6250",
    ]
    assert len(report_lines(report)) == 2 + 1 + 40 + 1  # the default shows 40 tokens


def test_validation_statistics_and_their_reading():
    lines = report_lines(_report(1, mean_energy_natural=1.0, mean_energy_shuffled=2.0, mean_energy_random=3.5))
    assert lines[-7:] == [
        "validation windows (8,192 tokens): mean final energy",
        "  natural text      1.0000",
        "  the same shuffled 2.0000",
        "  random tokens     3.5000",
        "  natural < shuffled < random holds: real text gets the lowest energy, random tokens the highest",
        "Spearman correlation of final energy with the model's own NLL: +0.420",
        "  energy tracks the model's own loss: it is higher where the prediction is worse",
    ]
    bad = _report(1, mean_energy_natural=2.0, mean_energy_shuffled=3.0, mean_energy_random=1.0,
                  spearman_energy_nll=-0.25)
    lines = report_lines(bad)
    assert lines[-3] == ("  natural < shuffled < random does not hold (the order is random < natural < "
                         "shuffled): the model does not yet give real text lower energy than scrambled or "
                         "random tokens")
    assert lines[-2].endswith("-0.250")
    assert lines[-1] == ("  energy runs against the model's own loss (lower where the prediction is worse): "
                         "not yet a sign of uncertainty")
    for rho, reading in ((0.15, "a weak link"), (0.0, "no link"), (math.nan, "undefined")):
        lines = report_lines(_report(1, mean_energy_natural=1.0, mean_energy_shuffled=2.0,
                                     mean_energy_random=3.0, spearman_energy_nll=rho))
        assert lines[-1].startswith(f"  {reading}")


def test_spearman_ranks():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.6)
