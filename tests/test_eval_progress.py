"""Long evaluations show progress: one bar for a whole thinking grid, its total known before it starts."""

import io
import math

import torch
from test_train import tiny_data  # noqa: F401  (a module-scoped fixture: the tiny shards)

from ebt.config import ModelConfig
from ebt.data.loader import TokenData
from ebt.evaluate import eval_batch_count, evaluate_lm, progress_bar, thinking_grid
from ebt.models import build_model


def models(vocab, pad):
    torch.manual_seed(0)
    kw = dict(size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=vocab, context_length=16,
              pad_token_id=pad)
    return build_model(ModelConfig(model="ebt", **kw)).eval(), build_model(ModelConfig(**kw)).eval()


def test_batch_count_matches_the_batches(tiny_data):  # noqa: F811
    val = TokenData(tiny_data[0], "val", 16)
    for batch_size, windows in ((3, None), (3, 5), (4, 4), (2, 10**6)):
        expected = sum(1 for _ in val.eval_batches(batch_size, max_windows=windows))
        assert eval_batch_count(val, batch_size, windows) == expected
    assert eval_batch_count(val, 3, 5) == math.ceil(5 / 3)


def test_grid_bar_ends_exactly_at_its_total(tiny_data, capsys):  # noqa: F811
    data_dir, _ = tiny_data
    splits = {s: TokenData(data_dir, s, 16) for s in ("val", "ood")}
    ebt, tpp = models(splits["val"].vocab_size, splits["val"].pad_id)
    rows = []
    grid = thinking_grid(ebt, splits, [1, 2], [1, 2], 0.01, batch_size=3, max_windows=5, baseline=tpp,
                         log=rows.append, progress=True)
    # 2 batches per split, each weighing (steps + the final scoring) x candidates, then 4 baseline batches:
    # (2 + 4 + 3 + 6 and the tol rows 3 + 6) x 4 + 4
    err = capsys.readouterr().err
    assert "100/100" in err and "Transformer++ | ood" in err and "101/100" not in err
    assert len(rows) == len(grid["rows"]) == 6 and rows[0].startswith("  steps  1 x  1 cand")
    grid_quiet = thinking_grid(ebt, splits, [1], [1], None, batch_size=3, max_windows=5, log=rows.append)
    assert capsys.readouterr().err == ""  # progress off by default (library calls, tests)
    assert grid_quiet["rows"][0]["results"]["val"]["ppl"] == grid["rows"][0]["results"]["val"]["ppl"]


def test_evaluate_lm_advances_the_bar_once_per_batch(tiny_data):  # noqa: F811
    val = TokenData(tiny_data[0], "val", 16)
    _, tpp = models(val.vocab_size, val.pad_id)
    bar = progress_bar(eval_batch_count(val, 4), enabled=True, file=io.StringIO())
    with_bar = evaluate_lm(tpp, val, 4, bar=bar)
    assert bar.n == bar.total == eval_batch_count(val, 4) > 1
    assert with_bar == evaluate_lm(tpp, val, 4)  # the bar changes nothing it measures
