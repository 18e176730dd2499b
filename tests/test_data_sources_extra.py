"""The optional dictionary sources (GCIDE, WordNet, FOLDOC, Jargon File, Devil's Dictionary) on tiny
files written here in the packages' real formats, and the default corpus left as it was."""

import argparse
import gzip
import json

import pytest

from ebt.data import corpus, dictionaries, sources
from ebt.data.cli import _source_names, add_data_commands
from ebt.data.corpus import DEFAULT_SOURCES, build_corpus
from ebt.data.dictionaries import (b64_number, clean_devil, clean_foldoc, clean_gcide, clean_jargon,
                                   parse_dictd, parse_wordnet_dir, read_dictd)
from ebt.data.fetch import SourceUnavailable

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(n):
    digits = ""
    while True:
        digits = B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def write_dictd(folder, name, articles):
    """What dictfmt writes: NAME.dict.dz (gzip) and NAME.index, one line per headword, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    body, lines = b"", []
    for heads, text in articles:
        data = text.encode("utf-8") if isinstance(text, str) else text
        lines += [f"{h}\t{_b64(len(body))}\t{_b64(len(data))}" for h in heads]
        body += data
    (folder / f"{name}.index").write_text("\n".join(sorted(lines)) + "\n", encoding="utf-8")
    with gzip.open(folder / f"{name}.dict.dz", "wb") as f:
        f.write(body)
    return folder / f"{name}.index", folder / f"{name}.dict.dz"


META = [(["00-database-info"], "00-database-info\n   This file was converted from the original database\n"),
        (["00databaseshort"], "00-database-short\n     A Dictionary\n")]

ABANDON_V = """Abandon \\A*ban"don\\ ([.a]*b[a^]n"d[u^]n), v. t. [imp. & p. p.
   {Abandoned} (-d[u^]nd); p. pr. & vb. n. {Abandoning}.] [OF.
   abandoner, F. abandonner. See {Ban}.]
   1. To cast or drive out; to banish; to expel; to reject.
      [Obs.]
      [1913 Webster]

            That he might . . . abandon them from him. --Udall.
      [1913 Webster]

   Syn: To give up; yield; forego.
        [WordNet 1.5 +PJC]

"""
ABANDON_N = """Abandon \\A*ban"don\\, n. [F. abandon. fr. abandonner. See
   {Abandon}, v.]
   Abandonment; relinquishment. [Obs.] [PJC]
   [1913 Webster]

"""
BEDOUIN = """Bedouin \\Bed"ou*in\\, Beduin \\Bed"u*in\\
   , n. [F. b['e]douin, OF. b['e]duin, fr. Ar. bedaw[imac]; ent[ae]ne.]
   One of the nomadic Arabs.
   [1913 Webster]

"""


def test_b64_numbers_are_dictds():
    assert [b64_number(s) for s in ("A", "B", "/", "BA", "5I", "Bkwm")] == [0, 1, 63, 64, 3656, 412710]
    assert all(b64_number(_b64(n)) == n for n in (0, 1, 63, 64, 4095, 4096, 39952321))


def test_read_dictd_groups_headwords_of_one_article_in_file_order(tmp_path):
    index, dz = write_dictd(tmp_path, "x", [(["zebra"], "first\n"), (["apple", "Apple"], "second\n")])
    assert read_dictd(index, dz) == [(["zebra"], "first\n"), (["Apple", "apple"], "second\n")]


def test_gcide_articles_lose_pronunciations_tags_and_codes(tmp_path):
    index, dz = write_dictd(tmp_path, "gcide", META + [(["Abandon"], ABANDON_V), (["Abandon"], ABANDON_N),
                                                       (["Bedouin", "Beduin"], BEDOUIN)])
    docs = parse_dictd("gcide", index, dz, clean_gcide)
    assert [d.doc_id for d in docs] == ["gcide/Abandon", "gcide/Abandon#2", "gcide/Bedouin"]
    assert [d.title for d in docs] == ["Abandon", "Abandon", "Bedouin"]
    assert {d.source for d in docs} == {"gcide"}
    assert docs[0].text == ("Abandon, v. t. [imp. & p. p.\nAbandoned; p. pr. & vb. n. Abandoning.] [OF.\n"
                            "abandoner, F. abandonner. See Ban.]\n"
                            "1. To cast or drive out; to banish; to expel; to reject.\n[Obs.]\n\n"
                            "That he might . . . abandon them from him. --Udall.\n\n"
                            "Syn: To give up; yield; forego.")
    assert docs[1].text == "Abandon, n. [F. abandon. fr. abandonner. See\nAbandon, v.]\n" \
                           "Abandonment; relinquishment. [Obs.]"
    assert docs[2].text == ("Bedouin, Beduin, n. [F. bédouin, OF. béduin, fr. Ar. bedawī; entæne.]\n"
                            "One of the nomadic Arabs.")


def test_gcide_decodes_a_stray_windows_byte(tmp_path):
    index, dz = write_dictd(tmp_path, "gcide", [(["rust"], b"Rust \\Rust\\, n.\n   rusts that haven\x92t\n")])
    assert parse_dictd("gcide", index, dz, clean_gcide)[0].text == "Rust, n.\nrusts that haven\u2019t"


JARGON = [(["(tm)"], "(TM)\n //\n\n    [Usenet] ASCII rendition of the \u2122. See also {UN*X}.\n\n\n"),
          (["proggy"], "proggy\n n.\n\n    1. A program that contains {proglet}\n    s.\n\n"
                       "    2. Large enough to be distributed as an RPM or {\n    tarball}.\n\n"),
          (["dilbert"], "Dilbert\n\n\n    n. A satire of idiotic {\n    management} practices.\n\n")]


def test_jargon_entries(tmp_path):
    index, dz = write_dictd(tmp_path, "jargon", [(["00-database-allchars"], "\n")] + JARGON)
    docs = parse_dictd("jargon", index, dz, clean_jargon)
    assert [d.doc_id for d in docs] == ["jargon/(tm)", "jargon/proggy", "jargon/dilbert"]
    assert docs[0].text == "(TM)\n\n[Usenet] ASCII rendition of the \u2122. See also UN*X."
    assert docs[1].text == ("proggy\nn.\n\n1. A program that contains proglets.\n\n"
                            "2. Large enough to be distributed as an RPM or tarball.")
    assert docs[2].text == "Dilbert\n\nn. A satire of idiotic management practices."


FOLDOC = [(["!", "excl", "exclamation mark"],
           "exclamation mark\n!\nexcl\n\n   <character> The character \"!\" with {ASCII} code 33.\n\n"
           "   (1998-09-17)\n\n\n"),
          (["missing"],
           "Missing definition\nmissing\n\n   <introduction> This is a __computing__ dictionary; try\n"
           "   {(http://wikipedia.org/)} or the {most requested terms (missing.html)} or {wiki\n"
           "   entry (http://esolangs.org/wiki/X)}.  The set {x : P(x)} &amp; {loops (loop)}.\n\n"
           "   2. <programming> A {hash\n   coding}.\n\n   (2014-09-20)\n\n\n")]


def test_foldoc_entries(tmp_path):
    index, dz = write_dictd(tmp_path, "foldoc", META + FOLDOC)
    docs = parse_dictd("foldoc", index, dz, clean_foldoc)
    assert [(d.doc_id, d.title) for d in docs] == [("foldoc/!", "!"), ("foldoc/missing", "missing")]
    assert docs[0].text == "exclamation mark\nThe character \"!\" with ASCII code 33."  # no aliases, no date
    assert docs[1].text == ("Missing definition\nThis is a computing dictionary; try\n"
                            "http://wikipedia.org/ or the most requested terms or wiki\n"
                            "entry.  The set x : P(x) & loops.\n\n2. A hash\ncoding.")


def test_devil_entries_keep_their_verse(tmp_path):
    verse = ("ABDICATION, n.  An act whereby a sovereign attests his sense of the\n"
             "high temperature of the throne.\n\n"
             "    Poor Isabella's Dead, whose abdication\n"
             "    Set all tongues wagging in the Spanish nation.\n"
             "                                                    G.J.\n\n\n")
    alphabet = (["00databasealphabet"], " abcdefghijklmnopqrstuvwxyz\n")
    index, dz = write_dictd(tmp_path, "devil", META + [alphabet, (["abdication"], verse)])
    docs = parse_dictd("devil", index, dz, clean_devil)
    assert [(d.doc_id, d.title) for d in docs] == [("devil/abdication", "abdication")]
    assert docs[0].text == ("ABDICATION, n.  An act whereby a sovereign attests his sense of the\n"
                            "high temperature of the throne.\n\nPoor Isabella's Dead, whose abdication\n"
                            "Set all tongues wagging in the Spanish nation.\nG.J.")


WORDNET_HEADER = ("  1 This software and database is being provided to you, the LICENSEE, by  \n"
                  "  2 Princeton University under the following license.  |  By obtaining  \n")
WORDNET = {
    "noun": "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | "
            "that which is perceived or known or inferred to have its own distinct existence  \n"
            "09403734 17 n 06 range 0 mountain_range 0 range_of_mountains 0 chain 0 mountain_chain 0 "
            "chain_of_mountains 0 001 @ 09287968 n 0000 | a series of hills or mountains; "
            "\"the valley was between two ranges of hills\"  \n",
    "verb": "00095747 29 v 01 leaf 0 003 @ 00094460 v 0000 + 13152742 n 0101 01 + 01 00 | produce leaves, "
            "of plants  \n",
    "adj": "00034924 00 s 01 activated 0 002 & 00034710 a 0000 ;c 08199025 n 0000 | (military) set up and "
           "placed on active assignment; \"a newly activated unit\"  \n"
           "01392249 00 s 02 galore(ip) 0 in_abundance(ip) 0 001 & 01391351 a 0000 | in great numbers  \n",
    "adv": "00388494 02 r 02 lento 0 slowly 0 000 | in music; \"Play this lento, please\"  \n",
}


def write_wordnet(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for pos, lines in WORDNET.items():
        (folder / f"data.{pos}").write_text(WORDNET_HEADER + lines, encoding="utf-8")
    return folder


def test_wordnet_one_document_per_synset(tmp_path):
    docs = parse_wordnet_dir(write_wordnet(tmp_path))
    assert [d.doc_id for d in docs] == ["wordnet/n00001740", "wordnet/n09403734", "wordnet/v00095747",
                                        "wordnet/s00034924", "wordnet/s01392249", "wordnet/r00388494"]
    assert [d.title for d in docs] == ["entity", "range", "leaf", "activated", "galore", "lento"]
    assert docs[1].text == ("range, mountain range, range of mountains, chain, mountain chain, chain of "
                            "mountains (noun): a series of hills or mountains; "
                            "\"the valley was between two ranges of hills\"")
    assert docs[4].text == "galore, in abundance (adjective): in great numbers"
    assert docs[5].text == "lento, slowly (adverb): in music; \"Play this lento, please\""
    (tmp_path / "data.adv").unlink()
    with pytest.raises(SourceUnavailable, match="has no data.adv"):
        parse_wordnet_dir(tmp_path)
    (tmp_path / "data.verb").write_text("00095747 29 v zz leaf 0 | produce leaves\n", encoding="utf-8")
    with pytest.raises(SourceUnavailable, match="line is not a synset"):
        parse_wordnet_dir(tmp_path)


# ---------------------------------------------------------------- loaders, registry, CLI

PACKAGES = {"gcide": ("dict-gcide", [(["Abandon"], ABANDON_N)]), "jargon": ("dict-jargon", JARGON),
            "foldoc": ("dict-foldoc", FOLDOC), "devil": ("dict-devil", [(["husband"], "HUSBAND, n.  A.\n")])}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A download cache as apt-get download + dpkg-deb -x leave it, without the network or root."""
    monkeypatch.setattr(dictionaries, "have_apt", lambda: True)
    monkeypatch.setattr(corpus, "have_apt", lambda: True)
    for name, (package, articles) in PACKAGES.items():
        (tmp_path / f"{package}_1.0_all.deb").write_bytes(b"")  # the cached download apt_download finds
        write_dictd(tmp_path / package / "usr/share/dictd", name, articles)
    (tmp_path / "wordnet-base_1%3a3.0-37_all.deb").write_bytes(b"")
    write_wordnet(tmp_path / "wordnet-base/usr/share/wordnet")
    return tmp_path


def test_default_sources_are_unchanged():
    assert DEFAULT_SOURCES == ("shakespeare", "wikipedia", "bible", "austen")
    assert list(sources.SOURCES)[:4] == list(DEFAULT_SOURCES)
    assert not set(sources.EXTRA_SOURCES) & set(DEFAULT_SOURCES)
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers())
    assert _source_names(parser.parse_args(["prepare"]).sources) == list(DEFAULT_SOURCES)


def test_source_groups():
    extra = ["gcide", "wordnet", "foldoc", "jargon", "devil"]
    assert list(sources.EXTRA_SOURCES) == extra and set(extra) <= set(sources.SOURCES)
    assert _source_names(["large"]) == list(DEFAULT_SOURCES) + extra
    assert _source_names(["default,gcide"]) == list(DEFAULT_SOURCES) + ["gcide"]
    assert _source_names(["bible", "default", "wordnet,bible"]) == ["bible", "shakespeare", "wikipedia",
                                                                    "austen", "wordnet"]


def test_prepare_writes_the_groups_out(monkeypatch):
    from ebt.data import shards

    seen = []
    monkeypatch.setattr(shards, "prepare_dataset", lambda out, **kw: seen.append(kw["sources"]))
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers())
    for sources_args in ([], ["--sources", "large"], ["--sources", "default", "gcide"]):
        args = parser.parse_args(["prepare", *sources_args])
        assert args.func(args) == 0
    assert seen == [list(DEFAULT_SOURCES), list(DEFAULT_SOURCES) + list(sources.EXTRA_SOURCES),
                    list(DEFAULT_SOURCES) + ["gcide"]]


def test_prepare_help_lists_the_new_sources_and_groups(capsys):
    parser = argparse.ArgumentParser(prog="ebt data")
    add_data_commands(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "valid: shakespeare, wikipedia, bible, austen, gcide, wordnet, foldoc, jargon, devil" in out
    assert "'large' (default + gcide,wordnet,foldoc,jargon,devil)" in out
    assert "ebt data prepare --sources large --out data/large" in out


@pytest.mark.parametrize("name", ["gcide", "wordnet", "foldoc", "jargon", "devil"])
def test_each_new_source_loads_through_the_registry(cache, name):
    source = sources.SOURCES[name]
    docs, meta = corpus.load_source(name, source, cache)
    assert docs and {d.source for d in docs} == {name} and len({d.doc_id for d in docs}) == len(docs)
    package = PACKAGES.get(name, ("wordnet-base",))[0]
    assert meta == {"package_file": next(cache.glob(f"{package}_*.deb")).name}
    assert source.needs_apt and source.package == f"Debian {package}"
    assert source.fix == f"install the Debian package (sudo apt-get install {package})"


def test_build_corpus_records_the_licences(cache):
    info = build_corpus(cache / "out", sources=("devil", "jargon", "gcide"), ood_source="foldoc",
                        cache_dir=cache, log=lambda *a: None)
    lic = json.loads((cache / "out/corpus.json").read_text())["licenses"]
    assert info["sources_used"] == ["devil", "jargon", "gcide", "foldoc"]
    assert lic["devil"]["text"] == "public domain (Ambrose Bierce, The Devil's Dictionary, 1911)"
    assert lic["jargon"]["text"].startswith("public domain (The Jargon File 4.4.7")
    assert lic["gcide"]["text"].startswith("GPL-2+ (GNU Collaborative International Dictionary of English")
    assert lic["foldoc"]["package_license"] == "GFDL-1.1+"
    assert lic["gcide"]["package"] == "Debian dict-gcide"
    assert lic["gcide"]["package_file"] == "dict-gcide_1.0_all.deb"
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in sources.SOURCES["wordnet"].license
    assert info["splits"]["ood"]["documents"] == 2


def test_a_broken_download_names_its_fix(cache, monkeypatch):
    monkeypatch.setattr(dictionaries, "deb_extract", lambda deb, root: root)
    (cache / "dict-devil/usr/share/dictd/devil.index").unlink()
    with pytest.raises(SourceUnavailable, match=r"dict-devil_1.0_all.deb has no usr/share/dictd/devil.index; "
                                                r"delete it so it is downloaded again"):
        dictionaries.load_devil(cache)
    (cache / "dict-jargon/usr/share/dictd/jargon.dict.dz").write_bytes(b"not gzip")
    with pytest.raises(SourceUnavailable, match="is not a readable dictzip file"):
        dictionaries.load_jargon(cache)
    monkeypatch.setattr(dictionaries, "have_apt", lambda: False)
    with pytest.raises(SourceUnavailable, match="apt-get"):
        dictionaries.load_wordnet(cache)
