"""Deterministic batches from memory-mapped token shards.

A split is cut into non-overlapping windows of context_length+1 tokens (inputs and their shifted
targets): packed, over the stream of documents and their eos separators, or, as the official pipeline
does, one window per document: its first context_length+1 tokens, right-padded with eos (windows="document").
Which windows form the batch at a given step is a pure function of (seed, step), so a run
resumed from a checkpoint sees exactly the batches it would have seen, with no loader state to save.
"""

import hashlib
from pathlib import Path

import numpy as np
import torch

from ebt.data.sampling import EpochSampler
from ebt.data.shards import FORMAT, NEW_DIR, NOT_OURS, manifest_problem, read_manifest
from ebt.data.tokenizers import Tokenizer
from ebt.errors import ConfigError, DataError


def _fix(data_dir):
    return f"re-run `ebt data prepare --force --out {data_dir}`"


def _sha256(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(data_dir):
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise DataError(f"{Path(data_dir) / 'manifest.json'} not found: {data_dir} is not a prepared "
                        f"dataset; {_fix(data_dir)}")
    path = Path(data_dir) / "manifest.json"
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, not {FORMAT!r}: it {NOT_OURS}; "
                        f"prepare the data into a new folder ({NEW_DIR})")
    problem = manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} {problem}; {_fix(data_dir)}")
    return manifest


def check_shard(data_dir, shard, dtype, verify=False):
    """Return a problem description for one shard, or None if it is sound."""
    path = Path(data_dir) / shard["file"]
    if not path.is_file():
        return f"shard {path} is missing; {_fix(data_dir)}"
    want = shard["tokens"] * np.dtype(dtype).itemsize
    if path.stat().st_size != want:
        return (f"shard {path} has {path.stat().st_size} bytes, expected {want} "
                f"({shard['tokens']} tokens); the file is truncated or corrupt; {_fix(data_dir)}")
    if verify and _sha256(path) != shard["sha256"]:
        return f"shard {path} fails its sha256 check (corrupt); {_fix(data_dir)}"
    return None


def verify_dataset(data_dir):
    """Check every shard's size and sha256. Returns a list of problems (empty when all is well)."""
    manifest = load_manifest(data_dir)
    problems = []
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            p = check_shard(data_dir, shard, manifest["dtype"], verify=True)
            if p:
                problems.append(p)
    return problems


def document_bounds(shards, eos_id):
    """(starts, ends) of every document in the shards read as one stream (a document may run on into the
    next file): the tokens between eos separators, the separator itself left out."""
    offsets = np.cumsum([0] + [len(shard) for shard in shards])
    found = [np.flatnonzero(np.asarray(shard) == eos_id) + offset for shard, offset in zip(shards, offsets)]
    eos = np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)
    total = int(offsets[-1])
    last = int(eos[-1]) + 1 if len(eos) else 0
    ends = eos if total == last else np.append(eos, total)  # text after the last eos is a document too
    return np.concatenate([[0], eos + 1])[: len(ends)], ends


class TokenData:
    def __init__(self, data_dir, split, context_length, verify=False, windows="packed"):
        if windows not in ("packed", "document"):
            raise ConfigError(f"unknown windows {windows!r}: use 'packed' or 'document'")
        self.data_dir, self.split, self.S, self.windows = Path(data_dir), split, int(context_length), windows
        m = load_manifest(data_dir)
        if split not in m["splits"]:
            raise DataError(f"{data_dir} has no {split!r} split (it has {sorted(m['splits'])}); "
                            f"{_fix(data_dir)}")
        tok = m["tokenizer"]
        self.vocab_size, self.eos_id, self.pad_id = tok["vocab_size"], tok["eos_id"], tok["pad_id"]
        self.tokenizer_name = tok["name"]
        dtype = np.dtype(m["dtype"]).newbyteorder("<")
        self.shards, counts = [], []
        for shard in m["splits"][split]["shards"]:
            problem = check_shard(data_dir, shard, dtype, verify)
            if problem:
                raise DataError(problem)
            if shard["tokens"] == 0:
                continue
            self.shards.append(np.memmap(self.data_dir / shard["file"], dtype=dtype, mode="r"))
            # window k covers tokens [k*S, k*S+S] of its shard, so needs k*S+S <= tokens-1
            counts.append(max(0, (shard["tokens"] - 1) // self.S))
        self.num_tokens = int(sum(len(s) for s in self.shards))
        self._ends = np.cumsum(counts, dtype=np.int64)  # window index where each shard ends
        self.num_windows = int(self._ends[-1]) if len(counts) else 0
        if windows == "document":  # one window per document, found from the eos separators (one pass)
            self._offsets = np.cumsum([0] + [len(s) for s in self.shards])
            self._starts, self._stops = document_bounds(self.shards, self.eos_id)
            self.num_windows = len(self._starts)
            if self.num_windows == 0:
                raise DataError(f"the {split!r} split of {data_dir} holds no documents; prepare more text")
        if self.num_windows == 0:
            raise DataError(f"the {split!r} split of {data_dir} has {self.num_tokens} tokens, fewer than "
                            f"context_length+1 = {self.S + 1} in any shard; use a shorter context "
                            f"length or prepare more text")
        what = ("documents (prepare more text)" if windows == "document" else
                f"windows of {self.S + 1} tokens (use a shorter context length or prepare more text)")
        self.sampler = EpochSampler(self.num_windows, f"the {split!r} split has only {self.num_windows} "
                                                      f"{what}")

    @property
    def loss_pad_id(self):
        """The target id the model's loss must ignore: document windows are padded with eos, and the
        official loss ignores eos (ignore_index = tokenizer.eos_token_id); packed windows hold no padding."""
        return self.eos_id if self.windows == "document" else self.pad_id

    def _span(self, a, b):
        """Tokens a..b-1 of the split's stream (its shards one after another)."""
        k = int(np.searchsorted(self._offsets, a, side="right")) - 1
        parts = [np.zeros(0, self.shards[0].dtype)]
        while a < b:
            lo = a - int(self._offsets[k])
            parts.append(self.shards[k][lo: lo + b - a])
            a, k = a + len(parts[-1]), k + 1
        return np.concatenate(parts)

    def _document(self, i):
        # the official collator: the document alone, its first S+1 tokens, right-padded with eos
        start = int(self._starts[i])
        tokens = self._span(start, min(int(self._stops[i]), start + self.S + 1))
        row = np.full(self.S + 1, self.eos_id, dtype=tokens.dtype)
        row[: len(tokens)] = tokens
        return row

    def window(self, i):
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range (0..{self.num_windows - 1})")
        if self.windows == "document":
            return self._document(i)
        k = int(np.searchsorted(self._ends, i, side="right"))
        local = i - (int(self._ends[k - 1]) if k else 0)
        return np.asarray(self.shards[k][local * self.S: local * self.S + self.S + 1])

    def _stack(self, ids):
        rows = np.stack([self.window(int(i)) for i in ids]).astype(np.int64)
        top = int(rows.max()) if rows.size else 0
        if top >= self.vocab_size:  # one max per batch: far cheaper than an IndexError deep in the embedding
            raise DataError(f"the {self.split!r} split of {self.data_dir} holds token id {top}, outside its "
                            f"vocabulary of {self.vocab_size}: the shards are corrupt or from another "
                            f"tokenizer; {_fix(self.data_dir)}")
        return torch.from_numpy(rows)

    def train_batch(self, step, global_batch, seed, rank=0, world_size=1):
        """Rows of the global batch for `step` that belong to `rank`: (global_batch//world_size, S+1)."""
        return self._stack(self.sampler.batch_ids(step, global_batch, seed, rank, world_size))

    def eval_batches(self, batch_size, rank=0, world_size=1, max_windows=None):
        """Every window once, in order (or max_windows evenly spread); rank r takes r, r+W, ..."""
        for ids in self.sampler.eval_ids(batch_size, rank, world_size, max_windows):
            yield self._stack(ids)

    def __len__(self):
        return self.num_windows


def tokenizer_for(data_dir):
    """The tokenizer saved beside the shards by `ebt data prepare`."""
    path = Path(data_dir) / "tokenizer"
    if not path.is_dir():
        raise DataError(f"{path} not found: {data_dir} has no saved tokenizer; {_fix(data_dir)}")
    return Tokenizer.load(path)


def tokenizer_for_checkpoint(ckpt_dir, data_dir=None):
    """The tokenizer saved inside a checkpoint, a run directory's checkpoint or an `ebt export` folder (at its
    top level), else the one beside the data it was trained on."""
    candidates = [Path(ckpt_dir) / "tokenizer", Path(ckpt_dir) / "checkpoint" / "tokenizer", Path(ckpt_dir)]
    path = next((c for c in candidates if (c / "tokenizer.json").is_file()), candidates[0])
    if path.is_dir():
        return Tokenizer.load(path)
    if data_dir:
        return tokenizer_for(data_dir)
    raise DataError(f"{ckpt_dir} holds no tokenizer: pass --data DIR (the data the model was trained on)")
