"""Bad input to `ebt data ...` ends in one line and exit code 2, and nothing a user owns is lost.

prepare / video / reasoning delete or overwrite only what they wrote themselves; garbage tokenizers,
manifests and shards are named, not met with a traceback."""

import json

import numpy as np
import pytest

from test_bad_input import fails

from ebt.cli import main
from ebt.data import shards, video
from ebt.data.loader import TokenData, load_manifest
from ebt.data.reasoning import write_reasoning_set
from ebt.data.shards import prepare_dataset, read_manifest, write_shards
from ebt.data.tokenizers import Tokenizer
from ebt.data.video import write_video_dataset
from ebt.errors import DataError

QUIET = dict(log=lambda *a: None)
THESIS = "My thesis, chapter one: the only copy.\n"
SMALL = ["--vocab-size", "280"]


def _texts(d, n=6):
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"{i}.txt").write_text(f"document {i}: the cat sat on the mat and looked at the moon. " * 3)
    return d


def _refused(argv, capsys, *names):
    """Run the CLI; it must exit 2 with one non-empty stderr line naming every one of names."""
    capsys.readouterr()
    line = fails(capsys, *argv)
    for name in names:
        assert str(name) in line, (name, line)
    return line


def _ok(argv):
    assert main(argv) in (None, 0)


def _prepared(tmp_path):
    out = tmp_path / "d"
    prepare_dataset(out, vocab_size=280, user_paths=[_texts(tmp_path / "in")], val_fraction=0.3, **QUIET)
    return out


# ---------------------------------------------------------------- prepare: inputs and outputs

def test_prepare_never_reads_or_deletes_its_own_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "thesis.txt").write_text(THESIS)
    _refused(["data", "prepare", "--files", "text", "--out", "."] + SMALL, capsys, "--files text", "rewrites")
    _refused(["data", "prepare", "--files", "text/thesis.txt", "--out", "."] + SMALL, capsys,
             "text/thesis.txt")
    _refused(["data", "prepare", "--files", ".", "--out", "sub"] + SMALL, capsys, "--files .", "--out sub")
    _texts(tmp_path / "mine")
    _refused(["data", "prepare", "--files", "mine", "--ood-files", "text", "--out", "."] + SMALL, capsys,
             "--ood-files text")
    assert (tmp_path / "text" / "thesis.txt").read_text() == THESIS
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "sub").exists()  # before any work

    _ok(["data", "prepare", "--files", "mine", "--out", "d"] + SMALL)
    _refused(["data", "prepare", "--tokenizer", "d/tokenizer", "--files", "mine", "--out", "d", "--force"],
             capsys, "--tokenizer d/tokenizer")
    assert Tokenizer.load(tmp_path / "d" / "tokenizer").vocab_size <= 280
    _refused(["data", "prepare", "--files", "nope", "--out", "d"], capsys, "--files nope", "does not exist")
    assert load_manifest(tmp_path / "d")["settings"]  # a typo does not cost the dataset


def test_prepare_sees_through_a_linked_text_folder(tmp_path, capsys):
    mine = _texts(tmp_path / "mine")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "text").symlink_to(mine, target_is_directory=True)
    _refused(["data", "prepare", "--files", str(mine), "--out", str(tmp_path / "proj"), "--force"] + SMALL,
             capsys, f"--files {mine}", "rewrites")
    assert sorted(p.name for p in mine.iterdir()) == [f"{i}.txt" for i in range(6)]


def test_prepare_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    proj, mine = tmp_path / "proj", _texts(tmp_path / "mine")
    (proj / "text").mkdir(parents=True)
    (proj / "text" / "thesis.txt").write_text(THESIS)
    argv = ["data", "prepare", "--files", str(mine), "--out", str(proj)] + SMALL
    _refused(argv, capsys, str(proj), "--force", "not empty")
    assert (proj / "text" / "thesis.txt").read_text() == THESIS and not (proj / "manifest.json").exists()

    _ok(argv + ["--force"])  # written beside the user's file...
    assert (proj / "text" / "thesis.txt").read_text() == THESIS
    assert TokenData(proj, "train", 4).num_windows > 0
    _ok(argv + ["--seed", "1"])  # ...rebuilt over its own output with other settings...
    assert load_manifest(proj)["settings"]["seed"] == 1
    assert (proj / "text" / "thesis.txt").read_text() == THESIS
    _ok(argv + ["--seed", "1", "--force"])  # ...and forced again: still kept
    assert (proj / "text" / "thesis.txt").read_text() == THESIS
    assert sorted(p.name for p in (proj / "text").iterdir()) == ["thesis.txt", "train.jsonl", "val.jsonl"]

    # a download cache alone does not make a folder "not empty"
    (tmp_path / "fresh" / "downloads").mkdir(parents=True)
    (tmp_path / "fresh" / "downloads" / "pkg.whl").write_bytes(b"cached")
    _ok(["data", "prepare", "--files", str(mine), "--out", str(tmp_path / "fresh")] + SMALL)
    assert (tmp_path / "fresh" / "downloads" / "pkg.whl").read_bytes() == b"cached"


@pytest.mark.parametrize("name", ["manifest.json", "corpus.json", "text/train.jsonl",
                                  "tokenizer/tokenizer.json", "train_00000.bin", "tokenizer"])
def test_prepare_force_never_overwrites_a_user_file(tmp_path, capsys, name):
    proj, mine = tmp_path / "proj", _texts(tmp_path / "mine")
    (proj / name).parent.mkdir(parents=True, exist_ok=True)
    (proj / name).write_text('{"name": "my web app"}')
    _refused(["data", "prepare", "--files", str(mine), "--out", str(proj), "--force"] + SMALL, capsys,
             str(proj / name), "never overwritten")
    assert (proj / name).read_text() == '{"name": "my web app"}'
    assert sorted(p.relative_to(proj).as_posix() for p in proj.rglob("*") if p.is_file()) == [name]


def test_prepare_clears_only_what_it_wrote(tmp_path):
    mine, out = _texts(tmp_path / "mine"), tmp_path / "d"
    (tmp_path / "far.txt").write_text("far away text " * 10)
    kw = dict(vocab_size=280, user_paths=[mine], val_fraction=0.3, **QUIET)
    prepare_dataset(out, ood_paths=[tmp_path / "far.txt"], **kw)
    assert (out / "ood_00000.bin").is_file() and (out / "text" / "ood.jsonl").is_file()
    (out / "text" / "notes.md").write_text("mine")
    (out / "tokenizer" / "README").write_text("mine too")
    (out / "val_99999.txt").write_text("not a shard name")
    m = prepare_dataset(out, **kw)  # other settings (no ood files): rebuilt without the ood split
    assert set(m["splits"]) == {"train", "val"} and "preparing" not in m
    assert not (out / "ood_00000.bin").exists() and not (out / "text" / "ood.jsonl").exists()
    kept = {"text/notes.md": "mine", "tokenizer/README": "mine too", "val_99999.txt": "not a shard name"}
    assert {name: (out / name).read_text() for name in kept} == kept


def test_prepare_interrupted_is_rerunnable(tmp_path, monkeypatch, capsys):
    mine, out = _texts(tmp_path / "mine"), tmp_path / "d"
    (out / "text").mkdir(parents=True)
    (out / "text" / "thesis.txt").write_text(THESIS)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "get_tokenizer", interrupted)  # dies while training the tokenizer
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(out, vocab_size=280, user_paths=[mine], force=True, **QUIET)
    monkeypatch.undo()
    assert read_manifest(out)["preparing"] and (out / "text" / "train.jsonl").is_file()
    _refused(["data", "info", str(out)], capsys, "manifest.json", "did not finish", "--force")
    with pytest.raises(DataError, match="did not finish"):
        TokenData(out, "train", 4)
    _ok(["data", "prepare", "--files", str(mine), "--out", str(out)] + SMALL)  # ours: no --force needed
    assert "settings" in load_manifest(out) and (out / "text" / "thesis.txt").read_text() == THESIS

    # a marker and the leftovers of a run killed while writing shards
    marked = tmp_path / "m"
    marked.mkdir()
    marker = {"format": "ebt-tokens-v1", "splits": {}, "preparing": True}
    (marked / "manifest.json").write_text(json.dumps(marker))
    (marked / "train_00003.bin.tmp").write_bytes(b"\0" * 6)
    (marked / "train_00007.bin").write_bytes(b"\0" * 6)
    _ok(["data", "prepare", "--files", str(mine), "--out", str(marked)] + SMALL)
    assert sorted(p.name for p in marked.glob("train_*")) == ["train_00000.bin"]


def test_write_shards_keeps_foreign_files(tmp_path):
    class Tok:
        name, eos_id, pad_id, vocab_size = "num", 1, 0, 100

        def encode_batch(self, texts):
            return [[int(x) for x in t.split()] for t in texts]

        def save(self, d):
            d.mkdir(parents=True, exist_ok=True)

    (tmp_path / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(DataError, match="manifest.json was not written by"):
        write_shards(["2 3"], Tok(), tmp_path, "train")
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "train_00000.bin").write_bytes(b"mine")
    with pytest.raises(DataError, match="train_00000.bin already exists"):
        write_shards(["2 3"], Tok(), tmp_path, "train")
    assert (tmp_path / "train_00000.bin").read_bytes() == b"mine"


# ---------------------------------------------------------------- garbage read back

@pytest.mark.parametrize("file,text", [
    ("tokenizer.json", "not json at all"),
    ("tokenizer.json", '{"version": "1.0"}'),
    ("tokenizer_meta.json", "{not json"),
    ("tokenizer_meta.json", '{"name": "bpe", "vocab_size": 280}'),
    ("tokenizer_meta.json", '["a", "list"]'),
    ("tokenizer_meta.json", '{"name": "bpe", "vocab_size": 280, "eos_id": 999, "pad_id": 0}'),
])
def test_garbage_tokenizer(tmp_path, capsys, file, text):
    out = _prepared(tmp_path)
    (out / "tokenizer" / file).write_text(text)
    with pytest.raises(DataError, match=file):
        Tokenizer.load(out / "tokenizer")
    _refused(["data", "prepare", "--tokenizer", str(out / "tokenizer"), "--files", str(tmp_path / "in"),
              "--out", str(tmp_path / "new")], capsys, file)
    assert not (tmp_path / "new").exists()


def _without(m, *path):
    m = json.loads(json.dumps(m))
    d = m
    for k in path[:-1]:
        d = d[k]
    del d[path[-1]]
    return m


@pytest.mark.parametrize("broken", [
    "not json", "[1, 2]",
    lambda m: _without(m, "tokenizer"), lambda m: _without(m, "tokenizer", "eos_id"),
    lambda m: _without(m, "tokenizer", "vocab_size"), lambda m: _without(m, "dtype"),
    lambda m: _without(m, "splits"), lambda m: _without(m, "splits", "train", "shards"),
    lambda m: _without(m, "splits", "train", "shards", 0, "file"),
    lambda m: {**m, "dtype": "float64"},
    lambda m: {**m, "splits": {**m["splits"], "train": {**m["splits"]["train"], "shards": [
        {"file": "../../etc/passwd", "tokens": 1, "sha256": "x"}]}}},
    lambda m: {**m, "format": "something-else"},
])
def test_garbage_manifest(tmp_path, capsys, broken):
    out = _prepared(tmp_path)
    m = read_manifest(out)
    (out / "manifest.json").write_text(broken if isinstance(broken, str) else json.dumps(broken(m)))
    for cmd in ("info", "verify"):
        _refused(["data", cmd, str(out)], capsys, "manifest.json")
    with pytest.raises(DataError, match="manifest.json"):
        TokenData(out, "train", 4)


def test_verify_names_a_corrupt_shard_in_one_line(tmp_path, capsys):
    out = _prepared(tmp_path)
    for f in ("train_00000.bin", "val_00000.bin"):
        raw = (out / f).read_bytes()
        (out / f).write_bytes(bytes([raw[0] ^ 1]) + raw[1:])
    err = _refused(["data", "verify", str(out)], capsys, "2 problem(s)", "sha256", "1 more")
    assert "train_00000.bin" in err or "val_00000.bin" in err


def test_token_ids_outside_the_vocabulary(tmp_path):
    out = _prepared(tmp_path)
    td = TokenData(out, "train", 4)
    assert td.train_batch(0, 2, seed=0).max() < td.vocab_size  # sound shards pass the check
    f = out / "train_00000.bin"
    f.write_bytes(np.full(f.stat().st_size // 2, 60000, dtype="<u2").tobytes())  # same size, ids past vocab
    td = TokenData(out, "train", 4)
    with pytest.raises(DataError) as e:
        td.train_batch(0, 2, seed=0)
    msg = str(e.value)
    assert "'train'" in msg and str(out) in msg and "60000" in msg and str(td.vocab_size) in msg
    assert f"ebt data prepare --force --out {out}" in msg and "\n" not in msg
    with pytest.raises(DataError, match="60000"):
        next(td.eval_batches(2))


# ---------------------------------------------------------------- numeric flags

@pytest.mark.parametrize("argv,flag", [
    (["prepare", "--vocab-size", "5"], "--vocab-size"),
    (["prepare", "--vocab-size", "lots"], "--vocab-size"),
    (["prepare", "--vocab-size", "70000"], "--vocab-size"),
    (["prepare", "--val-fraction", "0"], "--val-fraction"),
    (["prepare", "--val-fraction", "1"], "--val-fraction"),
    (["prepare", "--val-fraction", "nan"], "--val-fraction"),
    (["prepare", "--limit", "0"], "--limit"),
    (["prepare", "--seed", "-1"], "--seed"),
    (["video", "--train", "0"], "--train"),
    (["video", "--val", "-5"], "--val"),
    (["video", "--test", "0"], "--test"),
    (["video", "--frames", "0"], "--frames"),
    (["video", "--seed", "-1"], "--seed"),
    (["images", "mnist", "--size", "0"], "--size"),
    (["images", "mnist", "--channels", "2"], "--channels"),
])
def test_numeric_flags_are_range_checked(tmp_path, capsys, argv, flag):
    where = "--cache" if argv[0] == "images" else "--out"
    _refused(["data"] + argv + [where, str(tmp_path / "o")], capsys, flag)
    assert not (tmp_path / "o").exists()


def test_prepare_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text(THESIS)
    argv = ["data", "prepare", "--files", str(_texts(tmp_path / "in")), "--out", str(tmp_path / "f")] + SMALL
    _refused(argv, capsys, "--out", "is a file")
    assert (tmp_path / "f").read_text() == THESIS


# ---------------------------------------------------------------- video and reasoning sets

def test_video_never_overwrites_user_files(tmp_path, capsys):
    clips = tmp_path / "clips.npy"
    np.save(clips, np.random.default_rng(0).integers(0, 256, (8, 5, 64, 64), dtype=np.uint8))
    out = tmp_path / "vid"
    out.mkdir()
    np.save(out / "train.npy", np.arange(3))
    base = ["data", "video", "--source", str(clips), "--out", str(out), "--train", "4", "--val", "1",
            "--test", "1", "--frames", "4"]
    for extra in ([], ["--force"]):
        _refused(base + extra, capsys, str(out / "train.npy"), "never overwritten")
        assert np.load(out / "train.npy").tolist() == [0, 1, 2]
        assert not (out / "video.json").exists()

    (out / "train.npy").unlink()
    _ok(base)  # an empty folder is fine
    info = json.loads((out / "video.json").read_text())
    assert info["counts"] == {"train": 4, "val": 1, "test": 1}
    _refused(["data", "video", "--source", str(out / "train.npy"), "--out", str(out), "--force"], capsys,
             "--source")

    # a run that died after its marker is rebuilt, not refused
    (out / "video.json").write_text(json.dumps({"format": "ebt-video-v1", "writing": True}))
    _ok(base)
    assert json.loads((out / "video.json").read_text())["counts"] == info["counts"]


def test_video_rebuild_removes_only_its_own_stale_files(tmp_path, monkeypatch):
    images = np.zeros((50, 28, 28), dtype=np.uint8)
    images[:, 4:24, 6:22] = 200
    monkeypatch.setattr(video, "load_mnist_digits", lambda cache_dir: (images, np.repeat(np.arange(10), 5)))
    out, kw = tmp_path / "vid", dict(n_train=4, n_val=1, n_test=1, frames=4, size=32, **QUIET)
    write_video_dataset(out, **kw)
    assert (out / "train_bounces.npy").is_file()
    (out / "notes.txt").write_text("mine")
    np.save(tmp_path / "clips.npy", np.zeros((8, 4, 32, 32), dtype=np.uint8))
    info = write_video_dataset(out, source=tmp_path / "clips.npy", **kw)  # ours: rebuilt from user clips
    assert "train_bounces" not in info["files"] and not (out / "train_bounces.npy").exists()
    assert (out / "notes.txt").read_text() == "mine"


def test_reasoning_set_never_overwrites_user_files(tmp_path):
    d = tmp_path / "reasoning"
    d.mkdir()
    (d / "dyck.jsonl").write_text('{"text": "my own brackets"}\n')
    with pytest.raises(DataError, match="dyck.jsonl already exists"):
        write_reasoning_set("dyck", tmp_path, n=5, seed=1)
    assert (d / "dyck.jsonl").read_text() == '{"text": "my own brackets"}\n'
    (d / "arithmetic.json").write_text("{garbage")
    with pytest.raises(DataError, match="arithmetic.json already exists"):
        write_reasoning_set("arithmetic", tmp_path, n=5, seed=1)
    assert (d / "arithmetic.json").read_text() == "{garbage"

    (d / "dyck.jsonl").unlink()
    path = write_reasoning_set("dyck", tmp_path, n=5, seed=1)
    assert len(path.read_text().splitlines()) == 5
    assert write_reasoning_set("dyck", tmp_path, n=6, seed=1) == path  # ours: rewritten with the new n
    assert len(path.read_text().splitlines()) == 6
