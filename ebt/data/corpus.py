"""Build the text corpus: load sources, hold one out as out-of-distribution, split the rest.

Splits are made at document level (a play, an article, a chapter), so no text is shared between
train and val. The split is stratified per source and depends only on the seed.
"""

import json
import os
import zlib
from pathlib import Path

import numpy as np

from ebt.data import sources as src
from ebt.data.fetch import have_apt
from ebt.errors import ConfigError, DataError

DEFAULT_SOURCES = ("shakespeare", "wikipedia", "bible", "austen")
SPLITS = ("train", "val", "ood")


def split_mask(lengths, val_fraction, seed, salt=""):
    """Which documents go to val: shuffle with (seed, salt), then take whole documents until val
    holds >= val_fraction of the characters. At least one document, never all of them (a single
    document stays in train)."""
    n = len(lengths)
    is_val = np.zeros(n, dtype=bool)
    if n < 2:
        return is_val
    rng = np.random.default_rng([seed, zlib.crc32(salt.encode())])
    target = val_fraction * float(np.sum(lengths))
    taken, chars = 0, 0.0
    for i in rng.permutation(n):
        if taken >= 1 and chars >= target or taken == n - 1:
            break
        is_val[i] = True
        taken += 1
        chars += lengths[i]
    return is_val


def write_jsonl(path, records):
    """Write dicts one per line, atomically (a crash never leaves a half file under the real name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def iter_jsonl_texts(path, field="text"):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)[field]


def _stats(docs):
    by_source = {}
    for doc in docs:
        counts = by_source.setdefault(doc.source, {"documents": 0, "chars": 0})
        counts["documents"] += 1
        counts["chars"] += len(doc.text)
    return {"documents": len(docs), "chars": sum(len(doc.text) for doc in docs), "by_source": by_source}


def check_sources(sources, ood_source, skip=()):
    """The source names to load (ood last), or a ConfigError naming the unknown ones."""
    names = list(dict.fromkeys(list(sources) + ([ood_source] if ood_source else [])))
    unknown = [n for n in names if n not in src.SOURCES]
    if unknown:
        raise ConfigError(f"unknown source(s) {unknown}; valid: {sorted(src.SOURCES)}")
    unknown = [n for n in skip if n not in src.SOURCES]
    if unknown:
        raise ConfigError(f"unknown --skip-source name(s) {unknown}; valid: {sorted(src.SOURCES)}")
    return names


SKIPPED = "left out with --skip-source"


def load_source(name, source, cache_dir):
    """(documents, meta) of one source, or a DataError naming it, why it failed and what to do."""
    meta, why = {}, None
    if source.needs_apt and not have_apt():
        why = "needs apt-get and dpkg-deb (Debian/Ubuntu), not found on this machine"
    else:
        try:
            docs = source.load(cache_dir, meta=meta)
            why = None if docs else "no documents found"
        except DataError as e:  # SourceUnavailable and friends
            why = " ".join(str(e).split())  # the error is one line, however the reason was laid out
    if why:
        fix = source.fix or f"make {source.package} available on this machine"
        raise DataError(f"source {name!r} failed to build: {why}; to build it, {fix}; "
                        f"or leave it out with --skip-source {name}")
    return docs, meta


def build_corpus(out_dir, sources=DEFAULT_SOURCES, ood_source="wikipedia", val_fraction=0.05,
                 seed=0, cache_dir=None, log=print, skip=()):
    """A source that fails to build stops the build (DataError) unless it is named in skip."""
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "downloads"
    registry = src.SOURCES  # looked up at call time so tests can swap the registry
    names = check_sources(sources, ood_source, skip)
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1 (got {val_fraction}); try 0.05")

    loaded, skipped, licences = {}, {}, {}
    for name in names:
        s = registry[name]
        if name in skip:
            skipped[name] = SKIPPED
            log(f"[data] skipping {name}: {SKIPPED}")
            continue
        docs, meta = load_source(name, s, cache_dir)
        loaded[name] = docs
        licences[name] = {"text": s.license, "package": s.package,
                          "package_license": meta.get("package_license") or s.package_license,
                          "package_file": meta.get("package_file")}
        log(f"[data] {name}: {len(docs)} documents, {sum(len(d.text) for d in docs):,} chars")

    if ood_source and ood_source not in loaded:
        raise DataError(f"the out-of-distribution source {ood_source!r} is unavailable "
                        f"({skipped.get(ood_source)}); fix that, or pick another with --ood-source "
                        f"(one of {sorted(registry)})")
    in_domain = [n for n in loaded if n != ood_source]
    if not in_domain:
        raise DataError(f"no in-domain source is left (skipped: {skipped}); add sources with "
                        f"--sources, or train on your own files with --files")

    splits = {"train": [], "val": [], "ood": loaded.get(ood_source, [])}
    for name in in_domain:
        docs = loaded[name]
        is_val = split_mask([len(d.text) for d in docs], val_fraction, seed, salt=name)
        if len(docs) < 2:
            log(f"[data] warning: {name} has a single document; it all goes to train")
        splits["train"] += [d for d, v in zip(docs, is_val) if not v]
        splits["val"] += [d for d, v in zip(docs, is_val) if v]

    files = {}
    for split, docs in splits.items():
        if split == "ood" and not ood_source:
            continue
        files[split] = f"text/{split}.jsonl"
        write_jsonl(out_dir / files[split], (d.__dict__ for d in docs))
    info = {
        "format": "ebt-corpus-v1",
        "sources_used": list(loaded), "sources_skipped": skipped, "licenses": licences,
        "ood_source": ood_source, "val_fraction": val_fraction, "seed": seed,
        "splits": {k: _stats(v) for k, v in splits.items() if k in files}, "files": files,
    }
    write_json(out_dir / "corpus.json", info)
    for k, v in info["splits"].items():
        log(f"[data] {k}: {v['documents']} documents, {v['chars']:,} chars")
    return info
