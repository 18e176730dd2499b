"""Token windows: packed (ours) and document (the official pipeline's), and the paper preset."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ebt.cli import build_parser, main, run_config_from_args
from ebt.config import PRESETS, DataConfig, ModelConfig, RunConfig, TrainConfig
from ebt.data.loader import TokenData, document_bounds
from ebt.data.shards import write_shards
from ebt.data.tokenizers import EOS, Tokenizer, get_tokenizer
from ebt.errors import ConfigError
from ebt.evaluate import evaluate_lm
from ebt.models import build_model
from ebt.train import open_split, train

TEST_CACHE = Path(os.environ.get("EBT_TEST_CACHE", Path.home() / ".cache" / "ebt-tests"))
WORDS = ["kings", "queens", "rivers", "mountains", "ships", "stars", "bread", "wine"]
# lengths from a few tokens to several windows, so some documents are padded and some truncated
TEXT = [" ".join(f"{WORDS[(i + k) % 8]} {k}" for k in range(1 + (i * 7) % 23)) + "." for i in range(30)]
QUIET = dict(log=lambda *a: None)


def neox_like(texts):
    """A small byte-level BPE laid out as GPT-NeoX-20B's: eos <|endoftext|> is id 0, <|padding|> id 1."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS, "<|padding|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    return Tokenizer(tk, "neox", 0, 1)


def prepare(root, tok, shard_tokens=53):
    # small shards: documents run on from one shard file into the next
    write_shards(TEXT[:24], tok, root, "train", shard_tokens=shard_tokens)
    write_shards(TEXT[24:], tok, root, "val", shard_tokens=shard_tokens)
    return root


@pytest.fixture(scope="module")
def neox_data(tmp_path_factory):
    tok = neox_like(TEXT)
    return prepare(tmp_path_factory.mktemp("neox"), tok), tok


def official_window(tok, text, S):
    """The official rule, written out: tokenise the document alone, keep its first S+1 tokens, right-pad
    with eos (data/nlp/collator.py sets pad_token_id = eos_token_id)."""
    ids = tok.encode(text)[: S + 1]
    return ids + [tok.eos_id] * (S + 1 - len(ids))


@pytest.mark.parametrize("S", [4, 16, 64])
def test_document_windows_are_the_official_ones(neox_data, S):
    data_dir, tok = neox_data
    for split, texts in (("train", TEXT[:24]), ("val", TEXT[24:])):
        d = TokenData(data_dir, split, S, windows="document")
        assert len(d) == len(texts) and len(d.shards) > 1
        got = [d.window(i).tolist() for i in range(len(d))]
        assert got == [official_window(tok, t, S) for t in texts]
    d = TokenData(data_dir, "train", S, windows="document")
    ids = d.sampler.batch_ids(3, 8, seed=5)
    assert d.train_batch(3, 8, seed=5).tolist() == [official_window(tok, TEXT[i], S) for i in ids]
    assert d.loss_pad_id == 0 == tok.eos_id  # padded with eos 0, as the official loss ignores


def test_document_bounds_read_the_stream_across_shards():
    shards = [np.array([5, 6, 0, 7]), np.array([8, 0, 0]), np.array([9, 4])]
    starts, ends = document_bounds(shards, 0)
    assert starts.tolist() == [0, 3, 6, 7] and ends.tolist() == [2, 5, 6, 9]  # an empty document, a tail
    assert [x.tolist() for x in document_bounds([np.array([3, 0])], 0)] == [[0], [1]]


@pytest.mark.network
def test_document_windows_with_the_real_neox_tokenizer(tmp_path):
    tok = get_tokenizer("neox", TEST_CACHE / "tokenizers")
    d = TokenData(prepare(tmp_path, tok, shard_tokens=97), "train", 16, windows="document")
    assert [d.window(i).tolist() for i in range(len(d))] == [official_window(tok, t, 16) for t in TEXT[:24]]
    assert d.eos_id == 0 and d.pad_id == 1 and d.loss_pad_id == 0


def test_packed_windows_unchanged(neox_data):
    data_dir, _ = neox_data
    manifest = json.loads((data_dir / "manifest.json").read_text())
    S = 8
    want = []  # non-overlapping S+1 windows tiling each shard of the stream of documents and their eos
    for shard in manifest["splits"]["train"]["shards"]:
        tokens = np.fromfile(data_dir / shard["file"], dtype=manifest["dtype"]).tolist()
        want += [tokens[k * S: k * S + S + 1] for k in range((len(tokens) - 1) // S)]
    a, b = TokenData(data_dir, "train", S), TokenData(data_dir, "train", S, windows="packed")
    assert [a.window(i).tolist() for i in range(len(a))] == want
    assert all(torch.equal(a.train_batch(s, 4, 1), b.train_batch(s, 4, 1)) for s in range(5))
    assert DataConfig().windows == "packed"


def test_padding_is_ignored_by_the_loss(neox_data):
    data_dir, tok = neox_data
    d = TokenData(data_dir, "train", 32, windows="document")
    i = next(i for i in range(len(d)) if 3 <= len(tok.encode(TEXT[i])) < 30)
    n = len(tok.encode(TEXT[i]))  # the document's tokens: n - 1 targets
    padded = torch.from_numpy(d.window(i).astype(np.int64))[None]
    assert (padded[0, n:] == 0).all() and padded.shape[1] == 33
    torch.manual_seed(0)
    for name in ("transformer", "ebt"):
        cfg = ModelConfig(model=name, size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=300,
                          context_length=32, pad_token_id=d.loss_pad_id)
        model = build_model(cfg).double().eval()
        z = torch.randn(1, 32, 300, dtype=torch.float64)  # EBT: the same starting candidate for the prefix
        full = model(padded, init=z) if name == "ebt" else model(padded)
        prefix = model(padded[:, :n], init=z[:, : n - 1]) if name == "ebt" else model(padded[:, :n])
        assert int(full["n_tokens"]) == int(prefix["n_tokens"]) == n - 1
        assert torch.allclose(full["loss"], prefix["loss"], rtol=1e-12, atol=0), name
        assert torch.allclose(full["nll_sum"], prefix["nll_sum"], rtol=1e-12, atol=0), name


def run_config(data_dir, out, windows="document", pad=0, **train_kw):
    kw = dict(out_dir=str(out), steps=6, batch_size=4, warmup_steps=2, eval_every=3, eval_windows=None,
              eval_batch_size=3, log_every=2, device="cpu", precision="fp32", progress=False, seed=1)
    kw.update(train_kw)
    return RunConfig(model=ModelConfig(size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=300,
                                       context_length=16, pad_token_id=pad),
                     data=DataConfig(data_dir=str(data_dir), ood_splits=[], windows=windows),
                     train=TrainConfig(**kw))


def test_validation_over_documents_counts_no_padding(neox_data):
    data_dir, tok = neox_data
    val = TokenData(data_dir, "val", 16, windows="document")
    model = build_model(run_config(data_dir, "x").model)
    res = evaluate_lm(model, val, batch_size=4)
    assert res["tokens"] == sum(min(len(tok.encode(t)), 17) - 1 for t in TEXT[24:])


def test_resumed_run_sees_the_same_document_batches(neox_data, tmp_path):
    data_dir, _ = neox_data
    a, b = (TokenData(data_dir, "train", 16, windows="document") for _ in range(2))
    assert all(torch.equal(a.train_batch(s, 4, 1), b.train_batch(s, 4, 1)) for s in (5, 0, 3, 11))
    train(run_config(data_dir, tmp_path / "a"), **QUIET)
    train(run_config(data_dir, tmp_path / "b", stop_at=3), **QUIET)
    train(run_config(data_dir, tmp_path / "b"), resume=True, **QUIET)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / r / "checkpoint" / "model.safetensors")) for r in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["data"]["windows"] == "document" and saved["model"]["pad_token_id"] == 0


def test_document_windows_need_the_eos_pad_and_token_data(neox_data, tmp_path):
    data_dir, _ = neox_data
    with pytest.raises(ConfigError, match="pad_token_id=0"):
        train(run_config(data_dir, tmp_path / "r", pad=1), **QUIET)
    with pytest.raises(ConfigError, match="token data"):
        open_split(DataConfig(data_dir="images:mnist", windows="document"), "train", 16)
    with pytest.raises(ConfigError, match="packed"):
        DataConfig(windows="stream")


def config_from(argv, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return run_config_from_args(build_parser().parse_args(["train", *map(str, argv)]))


def test_preset_sets_the_paper_configuration(neox_data, monkeypatch, capsys):
    data_dir, _ = neox_data
    run = config_from(["--data", data_dir, "--preset", "paper"], monkeypatch)
    p = PRESETS["paper"]
    m, t = run.model, run.train
    assert run.data.windows == "document" and m.pad_token_id == 0 and m.context_length == 256
    assert m.size == "xxs" and m.model == "transformer" and t.lr is None and m.default_lr == 0.0012
    assert (t.batch_size, t.grad_accum, t.steps, t.warmup_steps) == (256, 8, 1_000_000, 10_000)
    assert (t.weight_decay, t.min_lr_ratio, t.grad_clip, t.beta1, t.beta2) == (0.01, 0.1, 1.0, 0.9, 0.999)
    assert t.warmup_base_lr_divider == -1 and p["batch_size"] // p["device_batch"] == 8
    out = capsys.readouterr().out
    assert "preset paper (official job_scripts/nlp/pretrain/baseline_transformer.sh)" in out
    assert "windows=document" in out and "lr=0.0012" in out
    monkeypatch.setenv("WORLD_SIZE", "4")  # 4 processes x 2 micro-steps x 32 rows, as the job scripts ran
    args = build_parser().parse_args(["train", "--data", str(data_dir), "--preset", "paper"])
    assert run_config_from_args(args).train.grad_accum == 2
    ebt = config_from(["--data", data_dir, "--preset", "paper", "--model", "ebt", "--recipe", "s2"],
                      monkeypatch)
    assert ebt.model.ebt.replay_buffer == 192 and "ebt_s2.sh" in capsys.readouterr().out


def test_flags_given_override_the_preset(neox_data, monkeypatch, capsys):
    data_dir, _ = neox_data
    # typed values equal to the flags' own defaults (batch 32, clip 1.0) still win over the preset
    run = config_from(["--data", data_dir, "--preset", "paper", "--batch-size", 32, "--context-length", 64,
                       "--steps", 10, "--windows", "packed", "--size", "4xs", "--grad-clip", 0.5],
                      monkeypatch)
    m, t = run.model, run.train
    assert (t.batch_size, t.grad_accum, t.steps, t.grad_clip) == (32, 1, 10, 0.5)
    assert (m.context_length, m.size, run.data.windows, m.pad_token_id) == (64, "4xs", "packed", 1)
    assert t.warmup_steps == 10_000 and t.weight_decay == 0.01  # the rest still from the preset
    out = capsys.readouterr().out
    assert "kept from flags" in out and "batch_size=32" in out.split("kept from flags")[1]
    plain = config_from(["--data", data_dir], monkeypatch)  # no preset: the defaults as before
    d = TrainConfig()
    assert (plain.model.context_length, plain.model.size, plain.data.windows, plain.model.pad_token_id) == \
        (256, "xxs", "packed", 1)
    assert (plain.train.steps, plain.train.batch_size, plain.train.grad_accum, plain.train.warmup_steps) == \
        (d.steps, d.batch_size, d.grad_accum, d.warmup_steps)
    doc = config_from(["--data", data_dir, "--windows", "document"], monkeypatch)
    assert doc.data.windows == "document" and doc.model.pad_token_id == 0


def test_preset_refuses_data_not_tokenized_with_neox(tmp_path, capsys):
    tok = get_tokenizer("bpe", tmp_path / "cache", texts=TEXT, vocab_size=280)
    prepare(tmp_path / "bpe", tok)
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tmp_path / "bpe"), "--preset", "paper", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "ebt data prepare --tokenizer neox --out DIR" in err and "'bpe'" in err
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tmp_path / "bpe"), "--windows", "stream"])
    assert e.value.code == 2
