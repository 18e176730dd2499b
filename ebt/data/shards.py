"""Token shards: flat little-endian uint16/uint32 files plus a manifest, read back with np.memmap.

Layout of a prepared dataset folder:
    manifest.json            splits, shard files, token counts, sha256, tokenizer
    tokenizer/               the tokenizer itself, so the folder is self-contained
    {split}_{k:05d}.bin      tokens; every document is followed by eos
    text/{split}.jsonl       the documents before tokenization
    corpus.json              where the text came from (sources, licences, counts)
"""

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from ebt.data.corpus import DEFAULT_SOURCES, SPLITS, build_corpus, iter_jsonl_texts, split_mask, write_json, write_jsonl
from ebt.data.tokenizers import NAMES, batched, check_vocab_size, get_tokenizer
from ebt.data.user import iter_hf_documents, iter_user_documents
from ebt.errors import ConfigError, DataError

FORMAT = "ebt-tokens-v1"


def dtype_for(vocab_size):
    return "uint16" if vocab_size <= 65536 else "uint32"


def read_manifest(out_dir):
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


class _ShardWriter:
    """Appends token arrays, cutting a new file every shard_tokens tokens (files are written under
    a .tmp name and renamed when complete)."""

    def __init__(self, out_dir, split, dtype, shard_tokens):
        self.out_dir, self.split, self.dtype, self.cap = Path(out_dir), split, np.dtype(dtype).newbyteorder("<"), shard_tokens
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


def _remove_split_files(out_dir, split):
    pat = re.compile(rf"^{re.escape(split)}_\d{{5}}\.bin(\.tmp)?$")
    if not Path(out_dir).is_dir():
        return
    for f in Path(out_dir).iterdir():
        if pat.match(f.name):
            f.unlink()


def write_shards(docs, tokenizer, out_dir, split, shard_tokens=2**24, batch_docs=256):
    """Tokenize docs (an iterable of str) into out_dir/{split}_*.bin and record the split in
    manifest.json. Returns the split's manifest entry."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_rec = _tokenizer_record(tokenizer)
    dtype = dtype_for(tokenizer.vocab_size)
    manifest = read_manifest(out_dir)
    if manifest and (manifest.get("tokenizer") != tok_rec or manifest.get("dtype") != dtype):
        raise DataError(f"{out_dir} already holds shards made with tokenizer {manifest.get('tokenizer')}; "
                        f"use a new folder, or re-run `ebt data prepare --force --out {out_dir}`")
    _remove_split_files(out_dir, split)  # no stale shards from an earlier, longer run

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
    manifest = read_manifest(out_dir) or {"format": FORMAT, "tokenizer": tok_rec, "dtype": dtype, "splits": {}}
    manifest["splits"][split] = entry
    write_json(out_dir / "manifest.json", manifest)
    return entry


def _clear(out_dir):
    """Remove what prepare_dataset writes (never the download cache)."""
    out_dir = Path(out_dir)
    old = read_manifest(out_dir) or {}
    for name in ("manifest.json", "corpus.json"):
        (out_dir / name).unlink(missing_ok=True)
    for split in set(SPLITS) | set(old.get("splits", {})):  # generated splits (ood_dyck, ...) too
        _remove_split_files(out_dir, split)
    shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)
    shutil.rmtree(out_dir / "text", ignore_errors=True)


def _complete(out_dir, manifest):
    for entry in manifest.get("splits", {}).values():
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
            n = write_jsonl(Path(out_dir) / files[split], (json.loads(l) for l, v in zip(f, is_val) if v == want))
        chars = int(sum(l for l, v in zip(lengths, is_val) if v == want))
        stats[split] = {"documents": n, "chars": chars, "by_source": {"user": {"documents": n, "chars": chars}}}
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
                    limit=None, cache_dir=None, force=False, log=print):
    """Text -> tokenizer -> shards, for the default corpus, user files, or a HF dataset.
    Returns the manifest. Does nothing if out_dir already holds the same settings (unless force)."""
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "downloads"
    tok_name = tokenizer if tokenizer in NAMES else str(Path(tokenizer).resolve())
    # fail on bad settings now, not after minutes of downloading and splitting
    if tok_name not in NAMES and not (Path(tok_name) / "tokenizer.json").is_file():
        get_tokenizer(tok_name, cache_dir)  # raises ConfigError listing the valid names
    if tok_name == "bpe":
        check_vocab_size(vocab_size)
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1 (got {val_fraction}); try 0.05")
    user = bool(user_paths or hf_name)
    as_list = lambda p: None if p is None else [str(Path(x).resolve()) for x in ([p] if isinstance(p, (str, Path)) else p)]
    settings = {"tokenizer": tok_name, "vocab_size": vocab_size if tok_name == "bpe" else None,
                "val_fraction": val_fraction, "seed": seed}
    if user:
        settings.update(user_paths=as_list(user_paths), ood_paths=as_list(ood_paths), hf_name=hf_name,
                        hf_split=hf_split, hf_config=hf_config, text_field=text_field, limit=limit)
    else:
        settings.update(sources=list(sources), ood_source=ood_source)
    settings = json.loads(json.dumps(settings))  # compare like with like after a JSON round trip

    old = read_manifest(out_dir)
    if old and not force and old.get("settings") == settings and _complete(out_dir, old):
        log(f"[data] {out_dir} is already prepared with these settings; nothing to do (use --force to redo)")
        return old
    if old and not force and old.get("settings") != settings:
        log(f"[data] {out_dir} holds a dataset with other settings; rebuilding it")
    t0 = time.time()
    _clear(out_dir)

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
        origin = ", ".join([str(p) for p in settings["user_paths"] or []] + ([f"hf:{hf_name}"] if hf_name else []))
        corpus = _user_corpus(out_dir, docs, ood, val_fraction, seed, origin, log)
    else:
        corpus = build_corpus(out_dir, sources, ood_source, val_fraction, seed, cache_dir, log)

    text = {split: out_dir / f for split, f in corpus["files"].items()}
    if tok_name == "bpe":
        log(f"[data] training a byte-level BPE tokenizer ({vocab_size} tokens) on the train split")
    tok = get_tokenizer(tok_name, cache_dir, texts=iter_jsonl_texts(text["train"]), vocab_size=vocab_size)
    if tok_name == "bpe" and tok.vocab_size < vocab_size:
        log(f"[data] note: the train split only supports {tok.vocab_size} BPE tokens (asked for {vocab_size})")
    for split, path in text.items():
        entry = write_shards(iter_jsonl_texts(path), tok, out_dir, split)
        log(f"[data] {split}: {entry['tokens']:,} tokens in {len(entry['shards'])} shard(s)")

    manifest = read_manifest(out_dir)
    manifest["corpus"] = {k: corpus[k] for k in ("sources_used", "sources_skipped", "licenses", "ood_source")}
    manifest["settings"] = settings  # written last: its presence means the dataset is complete
    write_json(out_dir / "manifest.json", manifest)
    log(f"[data] done in {time.time() - t0:.1f}s: {out_dir}")
    return manifest
