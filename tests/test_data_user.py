"""Users' own files, Hugging Face datasets (local builders, no network) and the `ebt data` CLI."""

import argparse
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ebt.data.cli import add_data_commands
from ebt.data.user import iter_hf_documents, iter_user_documents
from ebt.errors import DataError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path, texts, field="text"):
    # small row groups so the reader has to walk several
    pq.write_table(pa.table({field: texts, "n": list(range(len(texts)))}), path, row_group_size=2)
    return path


def test_text_jsonl_json_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("one whole file\n\nis one document")
    (tmp_path / "b.md").write_text("# notes")
    _jsonl(tmp_path / "c.jsonl", [{"text": "j1"}, {"text": ""}, {"text": "j2", "x": 1}])
    (tmp_path / "d.json").write_text(json.dumps([{"text": "arr1"}, {"text": "arr2"}]))
    _parquet(tmp_path / "e.parquet", ["p1", "p2", "p3", "p4", "p5"])
    names = ["a.txt", "b.md", "c.jsonl", "d.json", "e.parquet"]
    docs = list(iter_user_documents([tmp_path / n for n in names]))
    assert docs == ["one whole file\n\nis one document", "# notes", "j1", "j2", "arr1", "arr2",
                    "p1", "p2", "p3", "p4", "p5"]  # the empty document is skipped
    assert list(iter_user_documents(str(tmp_path / "c.jsonl"))) == ["j1", "j2"]  # a single path works


def test_folder_recursive(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "sub" / "a.txt").write_text("A")
    (tmp_path / "sub" / "deeper" / "c.jsonl").write_text('{"body": "C"}\n')
    (tmp_path / ".hidden.bin").write_text("ignored")
    assert list(iter_user_documents([tmp_path], text_field="body")) == ["B", "A", "C"]


def test_user_file_errors(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b")
    with pytest.raises(DataError, match=r"x\.csv.*unsupported.*\.parquet"):
        list(iter_user_documents([bad]))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_user_documents([tmp_path / "nope.txt"]))
    j = _jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, {"content": "no text field"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2 has no field 'text'.*--text-field"):
        list(iter_user_documents([j]))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2 is not valid JSON"):
        list(iter_user_documents([tmp_path / "broken.jsonl"]))
    p = _parquet(tmp_path / "p.parquet", ["a"], field="content")
    with pytest.raises(DataError, match=r"p\.parquet has no column 'text'.*--text-field"):
        list(iter_user_documents([p]))
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        list(iter_user_documents([tmp_path / "latin.txt"]))


def test_hf_local_json_and_parquet(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    j = _jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    assert list(iter_hf_documents("json", data_files=str(j))) == [f"doc {i}" for i in range(5)]
    assert list(iter_hf_documents("json", data_files=str(j), limit=2)) == ["doc 0", "doc 1"]
    p = _parquet(tmp_path / "d.parquet", ["x", "y", "z"])
    assert list(iter_hf_documents("parquet", data_files=str(p), streaming=False)) == ["x", "y", "z"]
    with pytest.raises(DataError, match="no column 'body'"):
        list(iter_hf_documents("parquet", data_files=str(p), text_field="body"))
    with pytest.raises(DataError, match="could not load"):
        list(iter_hf_documents("json", data_files=str(tmp_path / "missing.jsonl")))


# ---------------------------------------------------------------- CLI

def _parser():
    p = argparse.ArgumentParser(prog="ebt")
    data = p.add_subparsers(dest="cmd").add_parser("data")
    add_data_commands(data.add_subparsers(dest="data_cmd", required=True))
    return p


def test_cli_parsers_have_help_and_funcs():
    p = _parser()
    sub = next(a for a in p._subparsers._group_actions[0].choices["data"]._actions
               if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"prepare", "info", "verify"}
    for name, sp in sub.choices.items():
        assert sp.description and "ebt data " + name in sp.epilog
        assert callable(sp.get_default("func"))
    a = p.parse_args(["data", "prepare", "--sources", "shakespeare,bible", "austen", "--ood-source", "none"])
    assert a.sources == ["shakespeare,bible", "austen"] and a.out == "data/default" and a.vocab_size == 8192


def test_cli_prepare_info_verify(tmp_path, capsys):
    files = tmp_path / "files"
    files.mkdir()
    for i in range(6):
        (files / f"{i}.txt").write_text(f"text number {i} " * 20)
    out = tmp_path / "d"
    p = _parser()
    for argv in (["prepare", "--files", str(files), "--vocab-size", "280", "--out", str(out)],
                 ["info", str(out)], ["verify", str(out)]):
        a = p.parse_args(["data"] + argv)
        assert a.func(a) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "tokenizer bpe (vocab " in printed and "ok: 2 shard(s)" in printed
    shard = out / "val_00000.bin"
    shard.write_bytes(b"\0\0" + shard.read_bytes()[2:])
    a = p.parse_args(["data", "verify", str(out)])
    with pytest.raises(DataError, match="val_00000.bin fails its sha256"):
        a.func(a)
