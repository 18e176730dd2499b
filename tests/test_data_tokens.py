"""Tokenizers, token shards, the deterministic loader and prepare_dataset."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ebt.data import sources
from ebt.data.loader import TokenData, tokenizer_for, verify_dataset
from ebt.data.shards import prepare_dataset, read_manifest, write_shards
from ebt.data.sources import Document, Source
from ebt.data.tokenizers import Tokenizer, get_tokenizer, train_bpe
from ebt.errors import ConfigError, DataError

TEST_CACHE = Path(os.environ.get("EBT_TEST_CACHE", Path.home() / ".cache" / "ebt-tests"))
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. In the beginning God created the heaven and the earth. "
        "To be, or not to be, that is the question. Héllo wörld, naïve café! 12345 + 678 = 13023.\n")
QUIET = dict(log=lambda *a: None)


# ---------------------------------------------------------------- tokenizers

def test_bpe_deterministic_roundtrip_and_save(tmp_path):
    texts = [TEXT * 3, TEXT.upper(), TEXT[::-1]]
    a, b = train_bpe(texts, 300), train_bpe(iter(texts), 300)
    assert a.tk.to_str() == b.tk.to_str()  # same texts -> same tokenizer
    assert a.vocab_size == 300 and a.pad_id == 0 and a.eos_id == 1 and a.name == "bpe"
    for t in texts + ["unseen words: zebra ⚡ 日本"]:  # byte level: anything round-trips
        assert a.decode(a.encode(t)) == t
    assert a.encode_batch(texts[:2]) == [a.encode(texts[0]), a.encode(texts[1])]
    a.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok/tokenizer_meta.json").read_text())
    assert meta == {"name": "bpe", "eos_id": 1, "pad_id": 0, "vocab_size": 300}
    c = get_tokenizer(str(tmp_path / "tok"), tmp_path)  # a saved folder loads by path
    assert c.encode(TEXT) == a.encode(TEXT) and c.vocab_size == 300


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="bpe, neox, gpt2"):
        get_tokenizer("gpt5", tmp_path)
    with pytest.raises(ConfigError, match="258"):
        train_bpe([TEXT], 100)
    with pytest.raises(ConfigError):
        get_tokenizer("bpe", tmp_path)  # needs texts
    with pytest.raises(DataError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


@pytest.mark.network
def test_gpt2_tokenizer(tmp_path):
    tok = get_tokenizer("gpt2", TEST_CACHE / "tokenizers")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256 and tok.pad_id == 50257 and tok.vocab_size == 50258
    assert tok.decode(tok.encode(TEXT)) == TEXT
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).encode("Hello world") == [15496, 995]


@pytest.mark.network
def test_neox_tokenizer():
    tok = get_tokenizer("neox", TEST_CACHE / "tokenizers")
    assert tok.vocab_size == 50277 and tok.eos_id == 0 and tok.pad_id == 1
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode("Hello world") == [12092, 1533]


# ---------------------------------------------------------------- shards

class NumTok:
    """Stand-in tokenizer: the document "3 4 5" is the tokens [3, 4, 5]."""
    name, eos_id, pad_id = "num", 1, 0

    def __init__(self, vocab_size=1000):
        self.vocab_size = vocab_size

    def encode_batch(self, texts):
        return [[int(x) for x in t.split()] for t in texts]

    def save(self, d):
        Path(d).mkdir(parents=True, exist_ok=True)


def _docs(n_docs=30, seed=0, hi=1000):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(2, hi, size=int(rng.integers(1, 40)))) for _ in range(n_docs)]


def _write(out, docs, split="train", vocab=1000, **kw):
    return write_shards((" ".join(map(str, d)) for d in docs), NumTok(vocab), out, split, **kw)


def _stream(docs):
    return [t for d in docs for t in d + [1]]  # eos after every document


def test_shards_roundtrip_and_manifest(tmp_path):
    docs = _docs()
    entry = _write(tmp_path, docs, shard_tokens=100, batch_docs=7)
    m = read_manifest(tmp_path)
    assert m["format"] == "ebt-tokens-v1" and m["dtype"] == "uint16"
    assert m["tokenizer"] == {"name": "num", "vocab_size": 1000, "eos_id": 1, "pad_id": 0}
    assert m["splits"]["train"] == entry and entry["documents"] == 30
    stream = _stream(docs)
    assert entry["tokens"] == len(stream)
    assert [s["tokens"] for s in entry["shards"]][:-1] == [100] * (len(entry["shards"]) - 1)
    got = np.concatenate([np.fromfile(tmp_path / s["file"], dtype="<u2") for s in entry["shards"]])
    assert got.tolist() == stream
    assert verify_dataset(tmp_path) == []

    _write(tmp_path, docs[:3], shard_tokens=100)  # rewriting a split leaves no stale shards behind
    assert sorted(p.name for p in tmp_path.glob("train_*.bin")) == ["train_00000.bin"]


def test_shards_uint32_for_big_vocab(tmp_path):
    docs = _docs(hi=70000)
    entry = _write(tmp_path, docs, vocab=70000)
    assert read_manifest(tmp_path)["dtype"] == "uint32"
    f = tmp_path / entry["shards"][0]["file"]
    assert f.stat().st_size == 4 * entry["tokens"]
    assert np.fromfile(f, dtype="<u4").tolist() == _stream(docs)


def test_shards_refuse_other_tokenizer(tmp_path):
    _write(tmp_path, _docs())
    with pytest.raises(DataError, match="--force"):
        _write(tmp_path, _docs(), split="val", vocab=2000)


# ---------------------------------------------------------------- loader

@pytest.fixture
def data(tmp_path):
    """Three shards (100, 100, 41 tokens) of a known stream, plus a val split."""
    docs = _docs(n_docs=40, seed=1)
    stream = _stream(docs)[:241]
    _write(tmp_path, [stream], shard_tokens=100)  # one "document": shards hold the exact stream + eos
    _write(tmp_path, _docs(5, seed=2), split="val")
    return tmp_path, stream + [1]


def test_windows_tile_each_shard(data):
    d, stream = data
    td = TokenData(d, "train", context_length=8)
    assert td.num_tokens == 242 and td.vocab_size == 1000 and td.eos_id == 1 and td.tokenizer_name == "num"
    shards = [stream[0:100], stream[100:200], stream[200:]]
    assert td.num_windows == sum((len(s) - 1) // 8 for s in shards)
    targets = []
    i = 0
    for k, s in enumerate(shards):
        for j in range((len(s) - 1) // 8):
            w = td.window(i)
            assert w.tolist() == s[j * 8: j * 8 + 9]  # inside one shard, stride S, S+1 tokens
            targets += [(k, p) for p in range(j * 8 + 1, j * 8 + 9)]
            i += 1
    assert len(targets) == len(set(targets))  # every target at most once...
    assert all(p > 0 for _, p in targets)  # ...and a shard's first token never is one


def test_train_batch_pure_and_partitioned(data):
    d, _ = data
    a, b = TokenData(d, "train", 8), TokenData(d, "train", 8)
    x = a.train_batch(5, 4, seed=0)
    assert x.shape == (4, 9) and x.dtype == torch.long
    b.train_batch(0, 4, seed=0)  # another call in between changes nothing
    assert torch.equal(b.train_batch(5, 4, seed=0), x)
    assert not torch.equal(a.train_batch(5, 4, seed=1), x)
    for world in (2, 4):
        parts = [a.train_batch(5, 4, seed=0, rank=r, world_size=world) for r in range(world)]
        assert torch.equal(torch.cat(parts), x)  # ranks split the same global batch


def test_train_batch_epochs(data):
    d, _ = data
    td = TokenData(d, "train", 8)
    g = 5
    per_epoch = td.num_windows // g
    rows = lambda step: {tuple(r) for r in td.train_batch(step, g, seed=2).tolist()}
    epoch0 = [rows(s) for s in range(per_epoch)]
    seen = set().union(*epoch0)
    assert len(seen) == per_epoch * g  # each window at most once per epoch
    expected = {tuple(td.window(i).tolist()) for i in range(td.num_windows)}
    assert seen <= expected
    perm0 = np.random.default_rng([2, 0]).permutation(td.num_windows)
    assert rows(0) == {tuple(td.window(i).tolist()) for i in perm0[:g]}
    perm1 = np.random.default_rng([2, 1]).permutation(td.num_windows)
    assert rows(per_epoch) == {tuple(td.window(i).tolist()) for i in perm1[:g]}  # epoch 1 reshuffles


def test_train_batch_errors(data):
    d, _ = data
    td = TokenData(d, "train", 8)
    with pytest.raises(ConfigError, match="divisible"):
        td.train_batch(0, 5, seed=0, world_size=2)
    with pytest.raises(DataError, match="smaller batch"):
        td.train_batch(0, td.num_windows + 1, seed=0)


def test_eval_batches(data):
    d, _ = data
    td = TokenData(d, "train", 8)
    batches = list(td.eval_batches(4))
    assert [len(b) for b in batches[:-1]] == [4] * (len(batches) - 1) and 0 < len(batches[-1]) <= 4
    allw = torch.cat(batches)
    assert allw.tolist() == [td.window(i).tolist() for i in range(td.num_windows)]
    parts = [torch.cat(list(td.eval_batches(3, rank=r, world_size=3))) for r in range(3)]
    assert sorted(map(tuple, torch.cat(parts).tolist())) == sorted(map(tuple, allw.tolist()))
    assert parts[1][0].tolist() == td.window(1).tolist()  # rank r starts at window r
    assert sum(len(b) for b in td.eval_batches(4, max_windows=6)) == 6
    sub = torch.cat(list(td.eval_batches(4, max_windows=3))).tolist()  # spread over the split, not a prefix
    n = td.num_windows
    assert sub == [td.window(i).tolist() for i in (0, n // 3, 2 * n // 3)]


def test_loader_errors(data, tmp_path_factory):
    d, _ = data
    fix = f"ebt data prepare --force --out {d}"
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DataError, match="manifest.json not found"):
        TokenData(empty, "train", 8)
    with pytest.raises(DataError, match="no 'ood' split"):
        TokenData(d, "ood", 8)
    with pytest.raises(DataError, match="context_length"):
        TokenData(d, "val", 10_000)

    shard = d / "train_00001.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-2])  # truncated
    with pytest.raises(DataError, match="truncated") as e:
        TokenData(d, "train", 8)
    assert "train_00001.bin" in str(e.value) and fix in str(e.value)

    shard.write_bytes(bytes([raw[0] ^ 1]) + raw[1:])  # same size, one bit flipped
    TokenData(d, "train", 8)  # size checks pass...
    with pytest.raises(DataError, match="sha256") as e:
        TokenData(d, "train", 8, verify=True)  # ...the hash does not
    assert fix in str(e.value)
    assert len(verify_dataset(d)) == 1

    shard.unlink()
    with pytest.raises(DataError, match="missing") as e:
        TokenData(d, "train", 8)
    assert fix in str(e.value)


# ---------------------------------------------------------------- prepare_dataset

def _fake(name, n):
    def load(cache_dir, meta=None):
        return [Document(f"{name} {i}: " + TEXT * (1 + i % 3), name, f"{name}/{i}", "") for i in range(n)]
    return Source(load, "public domain", f"pkg-{name}", "MIT")


def test_prepare_dataset_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SOURCES", {"a": _fake("a", 12), "b": _fake("b", 6), "w": _fake("w", 4)})
    out = tmp_path / "d"
    kw = dict(tokenizer="bpe", vocab_size=300, sources=("a", "b"), ood_source="w", **QUIET)
    m = prepare_dataset(out, **kw)
    assert set(m["splits"]) == {"train", "val", "ood"} and m["splits"]["ood"]["documents"] == 4
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 18
    assert m["tokenizer"]["vocab_size"] == 300 and m["corpus"]["sources_used"] == ["a", "b", "w"]
    assert m["settings"]["sources"] == ["a", "b"]
    tok = tokenizer_for(out)
    td = TokenData(out, "train", 16)
    assert tok.decode(td.window(0).tolist()).startswith("a ")  # tokens decode back to the corpus

    shard = out / "train_00000.bin"
    mtime = shard.stat().st_mtime_ns
    logged = []
    assert prepare_dataset(out, **{**kw, "log": logged.append}) == m  # idempotent
    assert shard.stat().st_mtime_ns == mtime and "already prepared" in logged[0]
    prepare_dataset(out, force=True, **kw)  # force redoes the work
    assert shard.stat().st_mtime_ns != mtime
    m2 = prepare_dataset(out, **{**kw, "seed": 1})  # other settings rebuild
    assert m2["settings"]["seed"] == 1
    with pytest.raises(ConfigError, match="valid"):  # bad settings fail before any work
        prepare_dataset(tmp_path / "x", **{**kw, "tokenizer": "nope"})
    with pytest.raises(ConfigError, match="65535"):
        prepare_dataset(tmp_path / "x", **{**kw, "vocab_size": 100_000})
    assert not (tmp_path / "x").exists()


def test_prepare_dataset_user_files(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    for i in range(10):
        (files / f"{i}.txt").write_text(f"document {i}. " + TEXT)
    (tmp_path / "ood.jsonl").write_text(json.dumps({"body": "far away text"}) + "\n")
    (files / "more.jsonl").write_text(json.dumps({"body": "a json document"}) + "\n")
    with pytest.raises(DataError, match="text-field"):
        prepare_dataset(tmp_path / "d", vocab_size=300, user_paths=[files], **QUIET)
    (files / "more.jsonl").unlink()
    m = prepare_dataset(tmp_path / "d", vocab_size=300, user_paths=[files], val_fraction=0.2,
                        ood_paths=[tmp_path / "ood.jsonl"], text_field="body", **QUIET)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 10
    assert m["splits"]["val"]["documents"] >= 2 and m["splits"]["ood"]["documents"] == 1
    assert (tmp_path / "d/text/train.jsonl").exists() and not list((tmp_path / "d/text").glob("*.tmp"))
    m = prepare_dataset(tmp_path / "d2", vocab_size=300, user_paths=[files], **QUIET)
    assert "ood" not in m["splits"]  # no ood split unless ood files are given
