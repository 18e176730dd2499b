"""Token shards: flat little-endian uint16/uint32 files plus a manifest, read back with np.memmap.

Layout of a prepared dataset folder:
    manifest.json            splits, shard files, token counts, sha256, tokenizer
    tokenizer/               the tokenizer itself, so the folder is self-contained
    {split}_{k:05d}.bin      tokens; every document is followed by eos
    text/{split}.jsonl       the documents before tokenization
    corpus.json              where the text came from (sources, licences, counts)

prepare deletes and overwrites only what it wrote: it knows its folder by the manifest (written first, as
an in-progress marker), and writes into a folder holding anything else only with force, never over a file.
"""

import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from ebt.data.corpus import (DEFAULT_SOURCES, SPLITS, build_corpus, check_sources, iter_jsonl_texts,
                             split_mask, write_json, write_jsonl)
from ebt.data.tokenizers import FILES as TOKENIZER_FILES
from ebt.data.tokenizers import NAMES, batched, check_vocab_size, get_tokenizer
from ebt.data.user import iter_hf_documents, iter_user_documents
from ebt.errors import ConfigError, DataError, first_line

FORMAT = "ebt-tokens-v1"


def dtype_for(vocab_size):
    return "uint16" if vocab_size <= 65536 else "uint32"


SHARD = re.compile(r"^\w+_\d{5}\.bin$")  # a shard file name: {split}_{k:05d}.bin, never a path
TEXT_FILE = re.compile(r"^text/\w+\.jsonl$")  # a corpus.json "files" entry prepare may delete
NOT_OURS = "was not written by `ebt data prepare`"
NEW_DIR = "`ebt data prepare --out NEW_DIR`"


def read_manifest(out_dir):
    """manifest.json as a dict, None when there is none, or a DataError naming it when it is not JSON."""
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise DataError(f"{path} is not readable JSON ({first_line(e)}): it is damaged or "
                        f"{NOT_OURS}; prepare the data into a new folder ({NEW_DIR})") from e
    if not isinstance(manifest, dict):
        raise DataError(f"{path} holds a JSON {type(manifest).__name__}, not an object: it {NOT_OURS}; "
                        f"prepare the data into a new folder ({NEW_DIR})")
    return manifest


def _is_int(x, lo=0):
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _shard_problem(s):
    if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not SHARD.match(s["file"]):
        return "a shard entry without a file name like train_00000.bin"
    if not _is_int(s.get("tokens")) or not isinstance(s.get("sha256"), str):
        return f"shard {s['file']} without a token count or sha256"
    return None


def manifest_problem(manifest):
    """What is missing or malformed in a manifest of our format (None when it is sound)."""
    tok = manifest.get("tokenizer")
    if manifest.get("preparing") and tok is None:
        return "is the marker of a preparation that did not finish"
    if not isinstance(tok, dict) or not isinstance(tok.get("name"), str) \
            or not all(_is_int(tok.get(k)) for k in ("vocab_size", "eos_id", "pad_id")) \
            or not tok["vocab_size"] > max(tok["eos_id"], tok["pad_id"]):
        return "lacks its tokenizer record (name, vocab_size, eos_id, pad_id)"
    if manifest.get("dtype") not in ("uint16", "uint32"):
        return f"has dtype {manifest.get('dtype')!r}, not uint16 or uint32"
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return "lacks its splits"
    for name, entry in splits.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list) \
                or not _is_int(entry.get("tokens")) or not _is_int(entry.get("documents")):
            return f"has a malformed {name!r} split (no shards, tokens or documents)"
        problem = next(filter(None, map(_shard_problem, entry["shards"])), None)
        if problem:
            return f"has {problem} in split {name!r}"
    return None


def _ours(out_dir):
    """The manifest of a folder an earlier `ebt data prepare` wrote (finished or not), else None."""
    try:
        manifest = read_manifest(out_dir)
    except DataError:
        return None
    return manifest if manifest and manifest.get("format") == FORMAT else None


class _ShardWriter:
    """Appends token arrays, cutting a new file every shard_tokens tokens (files are written under
    a .tmp name and renamed when complete)."""

    def __init__(self, out_dir, split, dtype, shard_tokens):
        self.out_dir, self.split, self.cap = Path(out_dir), split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shards, self.f = [], None

    def _open(self):
        self.name = f"{self.split}_{len(self.shards):05d}.bin"
        self.f = open(self.out_dir / (self.name + ".tmp"), "wb")
        self.n, self.sha = 0, hashlib.sha256()

    def _close(self):
        self.f.close()
        os.replace(self.out_dir / (self.name + ".tmp"), self.out_dir / self.name)
        self.shards.append({"file": self.name, "tokens": self.n, "sha256": self.sha.hexdigest()})
        self.f = None

    def write(self, tokens):
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self.f is None:
                self._open()
            part, tokens = tokens[: self.cap - self.n], tokens[self.cap - self.n:]
            data = part.tobytes()
            self.f.write(data)
            self.sha.update(data)
            self.n += len(part)
            if self.n == self.cap:
                self._close()

    def finish(self):
        if self.f is not None:
            self._close()
        return self.shards


def _tokenizer_record(tokenizer):
    return {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}


def _split_files(out_dir, splits):
    """Shard files (finished or .tmp) of the given splits in out_dir."""
    if not Path(out_dir).is_dir():
        return []
    pat = re.compile(rf"^({'|'.join(map(re.escape, splits))})_\d{{5}}\.bin(\.tmp)?$")
    return sorted(f for f in Path(out_dir).iterdir() if pat.match(f.name))


def write_shards(docs, tokenizer, out_dir, split, shard_tokens=2**24, batch_docs=256):
    """Tokenize docs (an iterable of str) into out_dir/{split}_*.bin and record the split in
    manifest.json. Returns the split's manifest entry."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_rec = _tokenizer_record(tokenizer)
    dtype = dtype_for(tokenizer.vocab_size)
    manifest = read_manifest(out_dir)
    if manifest is not None and manifest.get("format") != FORMAT:
        raise DataError(f"{out_dir / 'manifest.json'} {NOT_OURS}; write the shards into another folder")
    made_with = (manifest or {}).get("tokenizer"), (manifest or {}).get("dtype")
    if made_with[0] is not None and made_with != (tok_rec, dtype):
        raise DataError(f"{out_dir} already holds shards made with tokenizer {manifest.get('tokenizer')}; "
                        f"use a new folder, or re-run `ebt data prepare --force --out {out_dir}`")
    old = _split_files(out_dir, [split])
    if old and manifest is None:  # no manifest: these shard-named files are someone else's
        raise DataError(f"{old[0]} already exists and {NOT_OURS}; move it away or write into another folder")
    for f in old:
        f.unlink()  # no stale shards from an earlier, longer run

    writer = _ShardWriter(out_dir, split, dtype, shard_tokens)
    eos = np.array([tokenizer.eos_id])
    n_docs = 0
    for batch in batched(docs, batch_docs):
        ids = tokenizer.encode_batch(batch)
        # eos after every document tells the model where one text ends and the next begins
        writer.write(np.concatenate([np.concatenate([np.asarray(x, dtype=np.int64), eos]) for x in ids]))
        n_docs += len(batch)
    shards = writer.finish()
    entry = {"tokens": sum(s["tokens"] for s in shards), "documents": n_docs, "shards": shards}

    tokenizer.save(out_dir / "tokenizer")
    # the marker of an unfinished prepare has no tokenizer or dtype yet: this split sets them
    manifest = {"format": FORMAT, "tokenizer": tok_rec, "dtype": dtype, "splits": {},
                **(read_manifest(out_dir) or {})}
    manifest["splits"][split] = entry
    write_json(out_dir / "manifest.json", manifest)
    return entry


def _outputs():
    """Paths (relative to OUT) with fixed names that prepare writes, each also under its .tmp name."""
    names = ["manifest.json", "corpus.json", "text/all.jsonl.tmp"] + [f"text/{s}.jsonl" for s in SPLITS]
    return [n + t for n in names + [f"tokenizer/{f}" for f in TOKENIZER_FILES] for t in ("", ".tmp")]


def _corpus_files(out_dir):
    """The text files corpus.json says prepare wrote (only names of the form text/NAME.jsonl)."""
    try:
        files = json.loads((Path(out_dir) / "corpus.json").read_text(encoding="utf-8")).get("files", {})
        return [f for f in files.values() if isinstance(f, str) and TEXT_FILE.match(f)]
    except (OSError, ValueError, AttributeError):  # missing or damaged: the fixed names still cover it
        return []


def _clear(out_dir, old):
    """Remove what an earlier prepare wrote into out_dir (old: its manifest), and nothing else: not the
    download cache, not a file the user put beside it. text/ and tokenizer/ go only if left empty."""
    out_dir = Path(out_dir)
    splits = old.get("splits") if isinstance(old.get("splits"), dict) else {}
    names = [n for n in _outputs() if n != "manifest.json"] + _corpus_files(out_dir)
    names += [s["file"] for e in splits.values() if isinstance(e, dict) and isinstance(e.get("shards"), list)
              for s in e["shards"] if not _shard_problem(s)]
    # shards of an interrupted run are not listed yet; generated splits (ood_dyck, ...) are
    named = set(SPLITS) | {s for s in splits if re.match(r"^\w+$", s)}
    names += [f.name for f in _split_files(out_dir, named)]
    files = [out_dir / n for n in names]
    for f in files:
        if f.is_file() or f.is_symlink():
            f.unlink()
    for d in ("text", "tokenizer"):
        if (out_dir / d).is_dir() and not any((out_dir / d).iterdir()):
            (out_dir / d).rmdir()


def _check_foreign(out_dir, cache_dir, force):
    """out_dir holds no manifest of ours: refuse it unless it is empty (but for the download cache) or
    force is given, and even then refuse any path prepare would write that already exists."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder; choose a folder for the dataset")
    skip = {(out_dir / "downloads").resolve(), Path(cache_dir).resolve()}
    if not force and out_dir.is_dir() and any(p.resolve() not in skip for p in out_dir.iterdir()):
        raise DataError(f"{out_dir} is not empty and {NOT_OURS}: choose an empty or new --out folder, "
                        f"or pass --force to write into it (your files are kept)")
    taken = [out_dir / n for n in _outputs() if (out_dir / n).exists() or (out_dir / n).is_symlink()]
    taken += [out_dir / d for d in ("text", "tokenizer") if (out_dir / d).is_file()]
    taken += _split_files(out_dir, SPLITS)
    if taken:
        raise DataError(f"{taken[0]} already exists and {NOT_OURS}; it is never overwritten: move it away or "
                        f"choose another --out folder")


def _inside(p, q):
    return p == q or q in p.parents


def _check_inputs(out_dir, inputs):
    """Refuse, before any work, an input that prepare would overwrite or delete, or that would read
    prepare's own outputs. inputs: (flag, path) pairs."""
    out = out_dir.resolve()
    # compared resolved: OUT/text may be a link to the user's own folder
    written = [out_dir / n for n in ("text", "tokenizer", "manifest.json", "corpus.json")]
    for flag, path in inputs:
        p = Path(path).resolve()
        if flag != "--tokenizer" and not p.exists():
            raise DataError(f"{flag} {path} does not exist; check the path")
        if flag != "--tokenizer" and _inside(out, p):
            raise DataError(f"{flag} {path} contains the output folder --out {out_dir}, so it would also "
                            f"read what `ebt data prepare` writes there; choose an --out folder outside it")
        hit = next((w for w in written if _inside(p, w.resolve())), None)
        if hit is None and p.parent == out and SHARD.match(p.name):
            hit = out_dir / p.name
        if hit is not None:
            where = "is" if p == hit.resolve() else "lies inside"
            raise DataError(f"{flag} {path} {where} {hit}, which `ebt data prepare --out {out_dir}` "
                            f"rewrites; move your files elsewhere or choose another --out folder")


def _claim(out_dir, old, cache_dir, force):
    """Make out_dir ours to write: clear an earlier prepare's files, or check no file of the user's is in the
    way. Then mark it in progress first thing, so an interrupted run is still recognised as ours."""
    if old is not None:
        # the old shards stay listed until they are gone, but the folder no longer reads as finished
        unfinished = {k: v for k, v in old.items() if k != "settings"}
        write_json(out_dir / "manifest.json", {**unfinished, "preparing": True})
        _clear(out_dir, old)
    else:
        _check_foreign(out_dir, cache_dir, force)
    write_json(out_dir / "manifest.json", {"format": FORMAT, "splits": {}, "preparing": True})


def _complete(out_dir, manifest):
    if manifest_problem(manifest):
        return False
    for entry in manifest["splits"].values():
        for s in entry["shards"]:
            f = Path(out_dir) / s["file"]
            if not f.is_file() or f.stat().st_size != s["tokens"] * np.dtype(manifest["dtype"]).itemsize:
                return False
    return True


def _user_corpus(out_dir, docs, ood_docs, val_fraction, seed, origin, log):
    """Split user documents into train/val with the corpus rule, streaming through a spool file so
    only document lengths are held in memory."""
    text_dir = Path(out_dir) / "text"
    spool = text_dir / "all.jsonl.tmp"
    lengths = []

    def records():
        for t in docs:
            lengths.append(len(t))
            yield {"text": t, "source": "user", "doc_id": f"user/{len(lengths) - 1}", "title": ""}

    write_jsonl(spool, records())
    if not lengths:
        raise DataError(f"no documents found in {origin}; check the paths / dataset and --text-field")
    is_val = split_mask(lengths, val_fraction, seed, salt="user")
    files, stats = {}, {}
    for split, want in (("train", False), ("val", True)):
        with open(spool, encoding="utf-8") as f:  # one record per line, aligned with is_val
            files[split] = f"text/{split}.jsonl"
            records = (json.loads(line) for line, val in zip(f, is_val) if val == want)
            n = write_jsonl(Path(out_dir) / files[split], records)
        chars = int(sum(length for length, val in zip(lengths, is_val) if val == want))
        stats[split] = {"documents": n, "chars": chars,
                        "by_source": {"user": {"documents": n, "chars": chars}}}
    spool.unlink()
    if not is_val.any():
        log("[data] warning: a single document cannot be split; val is empty (add more documents)")
    if ood_docs is not None:
        ood_chars = []

        def ood_records():
            for i, t in enumerate(ood_docs):
                ood_chars.append(len(t))
                yield {"text": t, "source": "user-ood", "doc_id": f"user-ood/{i}", "title": ""}

        files["ood"] = "text/ood.jsonl"
        n = write_jsonl(Path(out_dir) / files["ood"], ood_records())
        c = sum(ood_chars)
        stats["ood"] = {"documents": n, "chars": c, "by_source": {"user-ood": {"documents": n, "chars": c}}}
    info = {"format": "ebt-corpus-v1", "sources_used": [origin], "sources_skipped": {},
            "licenses": {"user": {"text": "unknown (your data: check its licence before sharing models)",
                                  "package": origin, "package_license": None, "package_file": None}},
            "ood_source": "user-ood" if ood_docs is not None else None,
            "val_fraction": val_fraction, "seed": seed, "splits": stats, "files": files}
    write_json(Path(out_dir) / "corpus.json", info)
    for k, v in stats.items():
        log(f"[data] {k}: {v['documents']} documents, {v['chars']:,} chars")
    return info


def prepare_dataset(out_dir, tokenizer="bpe", vocab_size=8192, sources=DEFAULT_SOURCES,
                    ood_source="wikipedia", val_fraction=0.05, seed=0, user_paths=None,
                    ood_paths=None, hf_name=None, hf_split="train", hf_config=None, text_field="text",
                    limit=None, cache_dir=None, force=False, skip_sources=(), log=print):
    """Text -> tokenizer -> shards, for the default corpus, user files, or a HF dataset.
    Returns the manifest. Does nothing if out_dir already holds the same settings (unless force)."""
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "downloads"
    tok_name = tokenizer if tokenizer in NAMES else str(Path(tokenizer).resolve())
    # fail on bad settings and inputs now, before any file is touched or minutes are spent downloading
    listed = lambda p: [] if p is None else [p] if isinstance(p, (str, Path)) else list(p)
    inputs = [("--files", p) for p in listed(user_paths)] + [("--ood-files", p) for p in listed(ood_paths)]
    _check_inputs(out_dir, inputs + ([] if tok_name in NAMES else [("--tokenizer", tokenizer)]))
    saved_tok = None if tok_name in NAMES else get_tokenizer(tok_name, cache_dir)  # ConfigError: valid names
    if tok_name == "bpe":
        check_vocab_size(vocab_size)
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1 (got {val_fraction}); try 0.05")
    user = bool(user_paths or hf_name)
    if not user:
        check_sources(sources, ood_source, skip_sources)
    as_list = lambda p: None if p is None else [str(Path(x).resolve()) for x in listed(p)]
    settings = {"tokenizer": tok_name, "vocab_size": vocab_size if tok_name == "bpe" else None,
                "val_fraction": val_fraction, "seed": seed}
    if user:
        settings.update(user_paths=as_list(user_paths), ood_paths=as_list(ood_paths), hf_name=hf_name,
                        hf_split=hf_split, hf_config=hf_config, text_field=text_field, limit=limit)
    else:
        settings.update(sources=list(sources), ood_source=ood_source)
        settings.update({"skip_sources": sorted(skip_sources)} if skip_sources else {})  # old data valid
    settings = json.loads(json.dumps(settings))  # compare like with like after a JSON round trip

    old = _ours(out_dir)
    if old and not force and old.get("settings") == settings and _complete(out_dir, old):
        log(f"[data] {out_dir} is already prepared with these settings; nothing to do (use --force to redo)")
        return old
    if old and not force and old.get("settings") != settings:
        log(f"[data] {out_dir} holds a dataset with other settings (or an unfinished one); rebuilding it")
    t0 = time.time()
    _claim(out_dir, old, cache_dir, force)

    if user:
        docs = iter(())
        if user_paths:
            docs = iter_user_documents(user_paths, text_field)
        if hf_name:
            hf = iter_hf_documents(hf_name, hf_split, text_field, config=hf_config, limit=limit)
            docs = (d for it in (docs, hf) for d in it)
        if limit is not None:
            docs = (d for i, d in zip(range(limit), docs))
        ood = iter_user_documents(ood_paths, text_field) if ood_paths else None
        origin = ", ".join([str(p) for p in settings["user_paths"] or []]
                           + ([f"hf:{hf_name}"] if hf_name else []))
        corpus = _user_corpus(out_dir, docs, ood, val_fraction, seed, origin, log)
    else:
        corpus = build_corpus(out_dir, sources, ood_source, val_fraction, seed, cache_dir, log, skip_sources)

    text = {split: out_dir / f for split, f in corpus["files"].items()}
    if tok_name == "bpe":
        log(f"[data] training a byte-level BPE tokenizer ({vocab_size} tokens) on the train split")
    tok = saved_tok or get_tokenizer(tok_name, cache_dir, texts=iter_jsonl_texts(text["train"]),
                                     vocab_size=vocab_size)
    if tok_name == "bpe" and tok.vocab_size < vocab_size:
        log(f"[data] note: the train split only supports {tok.vocab_size} BPE tokens "
            f"(asked for {vocab_size})")
    for split, path in text.items():
        entry = write_shards(iter_jsonl_texts(path), tok, out_dir, split)
        log(f"[data] {split}: {entry['tokens']:,} tokens in {len(entry['shards'])} shard(s)")

    manifest = read_manifest(out_dir)
    manifest.pop("preparing", None)
    manifest["corpus"] = {k: corpus[k] for k in ("sources_used", "sources_skipped", "licenses", "ood_source")}
    manifest["settings"] = settings  # written last: its presence means the dataset is complete
    write_json(out_dir / "manifest.json", manifest)
    log(f"[data] done in {time.time() - t0:.1f}s: {out_dir}")
    return manifest
