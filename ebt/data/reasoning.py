"""Generated reasoning sets for out-of-distribution evaluation.

The EBT paper scores perplexity on BigBench dyck_languages and on math QA (GSM8K, BigBench
elementary math). Those need downloads, so we generate look-alikes instead:

    dyck        "Input: [ { ( ) < > }\\nOutput: ] \\n": close the open brackets of a prefix
    arithmetic  "Question: ...\\nAnswer: 12 - 5 = 7. ... The answer is 19.\\n": short word problems

A set is a pure function of (name, n, seed), written to OUT/reasoning/{name}.jsonl with its metadata,
then tokenized into the split ood_{name} of OUT with a prepared dataset's tokenizer, so TokenData(OUT, ...)
can score it. OUT is a folder of its own (by default RUN/reasoning_data), never the dataset itself.
"""

import hashlib
import json
import random
import re
from pathlib import Path

from ebt import __version__
from ebt.data.corpus import iter_jsonl_texts, write_json, write_jsonl
from ebt.data.loader import check_shard, load_manifest, tokenizer_for
from ebt.data.shards import _ours, _tokenizer_record, dtype_for, write_shards
from ebt.errors import ConfigError, DataError

FORMAT = "ebt-reasoning-v1"  # bump when a generator changes, so old sets and splits are rebuilt

# ----------------------------------------------------------------------------------------------- dyck

PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}
CLOSERS = {c: o for o, c in PAIRS.items()}


def solve_dyck(prefix: str) -> str:
    """The closing brackets that complete a prefix of a balanced sequence, space separated."""
    stack = []
    for i, ch in enumerate(prefix.replace(" ", "")):
        if ch in PAIRS:
            stack.append(ch)
        elif ch in CLOSERS and stack and stack[-1] == CLOSERS[ch]:
            stack.pop()
        else:
            raise DataError(f"{prefix!r} is not a prefix of a balanced bracket sequence "
                            f"(symbol {i}: {ch!r}); use only {' '.join(PAIRS)} {' '.join(CLOSERS)}, "
                            f"closing the newest open bracket")
    return " ".join(PAIRS[o] for o in reversed(stack))


def generate_dyck(n: int, seed: int) -> list[str]:
    """BigBench dyck_languages style: complete the open brackets of a prefix (4 pair types, 4-30 symbols,
    depth <= 6)."""
    _check_n(n)
    rng = random.Random(f"dyck:{seed}")  # str seeds hash the same way in every process
    docs = []
    for _ in range(n):
        # per-document length, depth cap and opening rate, so the set mixes shallow and deep nests
        length, max_depth, p_open = rng.randint(4, 30), rng.randint(2, 6), rng.uniform(0.45, 0.7)
        stack, symbols = [], []
        for i in range(length):
            if not stack or (i == length - 1 and len(stack) == 1):
                opening = True  # can't close nothing; and the last symbol must leave something to close
            elif len(stack) >= max_depth:
                opening = False
            else:
                opening = rng.random() < p_open
            if opening:
                stack.append(rng.choice(list(PAIRS)))
                symbols.append(stack[-1])
            else:
                symbols.append(PAIRS[stack.pop()])
        prefix = " ".join(symbols)
        docs.append(f"Input: {prefix}\nOutput: {solve_dyck(prefix)}\n")
    return docs


# ----------------------------------------------------------------------------------------- arithmetic

NAMES = (("Mia", "she"), ("Noah", "he"), ("Ava", "she"), ("Liam", "he"), ("Zoe", "she"), ("Omar", "he"),
         ("Emma", "she"), ("Lucas", "he"), ("Sofia", "she"), ("Ben", "he"), ("Lily", "she"), ("Max", "he"),
         ("Nora", "she"), ("Ravi", "he"), ("Chloe", "she"), ("Kenji", "he"))
OBJECTS = ("apples", "marbles", "stickers", "pencils", "cookies", "shells", "cards", "stamps", "beads",
           "oranges")
CONTAINERS = (("bag", "bags"), ("box", "boxes"), ("basket", "baskets"), ("jar", "jars"), ("pack", "packs"))
ITEMS = (("pen", "pens"), ("notebook", "notebooks"), ("sandwich", "sandwiches"), ("ticket", "tickets"),
         ("toy car", "toy cars"), ("kite", "kites"))
PLANTS = ("tulips", "roses", "carrots", "sunflowers", "cabbages")
VEHICLES = ("train", "bus", "ship", "truck")
PURCHASES = ("bike helmet", "board game", "jacket", "pair of shoes", "basketball")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b,
       "/": lambda a, b: a // b if b and a % b == 0 else None}  # None: not an exact division


def _step(steps, a, op, b):
    c = OPS[op](a, b)
    assert c is not None and c >= 0, (a, op, b)  # the templates only ask for whole, non-negative results
    steps.append((a, op, b, c))
    return c


def _people(rng, k):
    """k distinct (name, he/she, his/her, him/her), capitalised forms on demand with .capitalize()."""
    return [(name, p, "his" if p == "he" else "her", "him" if p == "he" else "her")
            for name, p in rng.sample(NAMES, k)]


# Each template draws its numbers so every step is exact and non-negative, and returns (question, steps).
# Every operand is written in the question or is an earlier result, which check_arithmetic relies on.

def _give_and_buy(rng, steps):
    (first, he, _, _), (second, *_) = _people(rng, 2)
    obj, (_, boxes) = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    a, c, d = rng.randint(8, 40), rng.randint(2, 5), rng.randint(2, 6)
    b = rng.randint(1, a - 1)
    _step(steps, _step(steps, a, "-", b), "+", _step(steps, c, "x", d))
    return (f"{first} has {a} {obj}. {he.capitalize()} gives {b} to {second} and then buys {c} {boxes} "
            f"with {d} {obj} each. How many {obj} does {first} have now?")


def _share(rng, steps):
    (first, *_), = _people(rng, 1)
    obj, k, q = rng.choice(OBJECTS), rng.randint(2, 8), rng.randint(2, 12)
    _step(steps, q * k, "/", k)
    return (f"{first} has {q * k} {obj} and shares them equally among {k} friends. "
            f"How many {obj} does each friend get?")


def _times_as_many(rng, steps):
    (first, *_), (second, *_) = _people(rng, 2)
    obj, a, k = rng.choice(OBJECTS), rng.randint(2, 15), rng.randint(2, 5)
    _step(steps, a, "+", _step(steps, a, "x", k))
    return (f"{first} has {a} {obj}. {second} has {k} times as many {obj} as {first}. "
            f"How many {obj} do they have together?")


def _change(rng, steps):
    (first, he, _, _), = _people(rng, 1)
    (item, items), p, q = rng.choice(ITEMS), rng.randint(2, 12), rng.randint(2, 6)
    bill = rng.choice([b for b in (10, 20, 50, 100) if b >= p * q])
    _step(steps, bill, "-", _step(steps, q, "x", p))
    return (f"A {item} costs {p} dollars. {first} buys {q} {items} and pays with a {bill} dollar bill. "
            f"How many dollars of change does {he} get?")


def _reading(rng, steps):
    (first, he, _, _), = _people(rng, 1)
    p, d = rng.randint(5, 30), rng.randint(2, 7)
    total = p * d + rng.randint(0, 80)
    _step(steps, total, "-", _step(steps, p, "x", d))
    return (f"A book has {total} pages. {first} reads {p} pages every day for {d} days. "
            f"How many pages does {he} still have to read?")


def _garden(rng, steps):
    (first, *_), = _people(rng, 1)
    plant, rows, per, more = rng.choice(PLANTS), rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 20)
    _step(steps, _step(steps, rows, "x", per), "+", more)
    return (f"A garden has {rows} rows of {plant} with {per} {plant} in each row. {first} plants {more} more "
            f"{plant}. How many {plant} are in the garden now?")


def _pool_and_pack(rng, steps):
    (first, *_), (second, *_), (third, *_) = _people(rng, 3)
    obj, (_, boxes), k, q = rng.choice(OBJECTS), rng.choice(CONTAINERS), rng.randint(2, 6), rng.randint(2, 9)
    total = k * q
    a = rng.randint(1, total - 2)
    b = rng.randint(1, total - a - 1)
    _step(steps, _step(steps, _step(steps, a, "+", b), "+", total - a - b), "/", k)
    return (f"{first} collects {a} {obj}, {second} collects {b} {obj} and {third} collects "
            f"{total - a - b} {obj}. "
            f"They put all the {obj} together and pack them equally into {k} {boxes}. "
            f"How many {obj} go in each of the {boxes}?")


def _taken_out(rng, steps):
    (first, *_), (second, *_) = _people(rng, 2)
    obj, (box, _) = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    a = rng.randint(15, 60)
    b = rng.randint(1, a // 2)
    c = rng.randint(1, a - b)
    _step(steps, _step(steps, a, "-", b), "-", c)
    return (f"There are {a} {obj} in a {box}. {first} takes out {b} and {second} takes out {c}. "
            f"How many {obj} are left in the {box}?")


def _trip(rng, steps):
    vehicle, v, h1, h2 = (rng.choice(VEHICLES), rng.choice(range(30, 95, 5)), rng.randint(1, 4),
                          rng.randint(1, 4))
    _step(steps, v, "x", _step(steps, h1, "+", h2))
    return (f"A {vehicle} travels {v} kilometers every hour. It travels for {h1} hours, stops for a "
            f"break, and then travels for {h2} more hours. How many kilometers does the {vehicle} travel "
            f"in total?")


def _savings(rng, steps):
    (first, he, _, _), = _people(rng, 1)
    thing, w, k = rng.choice(PURCHASES), rng.randint(5, 30), rng.randint(2, 8)
    spend = rng.randint(1, w * k)
    _step(steps, _step(steps, w, "x", k), "-", spend)
    return (f"{first} earns {w} dollars each week. {he.capitalize()} saves all of it for {k} weeks and "
            f"then spends {spend} dollars on a {thing}. How many dollars does {he} have left?")


def _gift(rng, steps):
    (first, _, his, him), (second, *_) = _people(rng, 2)
    obj, a, b = rng.choice(OBJECTS), rng.randint(3, 40), rng.randint(2, 25)
    _step(steps, a, "+", b)
    return (f"{first} had {a} {obj}. {his.capitalize()} friend {second} gave {him} {b} more {obj}. "
            f"How many {obj} does {first} have now?")


def _class_supplies(rng, steps):
    (_, boxes), per, nboxes, k = (rng.choice(CONTAINERS), rng.randint(3, 12), rng.randint(2, 6),
                                  rng.randint(2, 5))
    total = nboxes * per
    rest = k * rng.randint(1, (total - 1) // k)  # at least one given out, the rest splits exactly
    _step(steps, _step(steps, _step(steps, nboxes, "x", per), "-", total - rest), "/", k)
    return (f"A class has {nboxes} {boxes} of crayons with {per} crayons in each. The teacher gives out "
            f"{total - rest} crayons and splits the rest equally among {k} tables. How many crayons does "
            f"each table get?")


TEMPLATES = (_give_and_buy, _share, _times_as_many, _change, _reading, _garden, _pool_and_pack, _taken_out,
             _trip, _savings, _gift, _class_supplies)


def _arithmetic_doc(question, steps):
    work = " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps)
    return f"Question: {question}\nAnswer: {work} The answer is {steps[-1][3]}.\n"


def generate_arithmetic(n: int, seed: int) -> list[str]:
    """GSM8K-like short word problems: 12 templated stories, 1-3 exact integer steps, worked answer."""
    _check_n(n)
    rng = random.Random(f"arithmetic:{seed}")
    docs = []
    for _ in range(n):
        steps = []
        question = rng.choice(TEMPLATES)(rng, steps)
        docs.append(_arithmetic_doc(question, steps))
    return docs


_ANSWER = re.compile(r"((?:\d+ [-+x/] \d+ = \d+\. )+)The answer is (\d+)\.")
_STEP = re.compile(r"(\d+) ([-+x/]) (\d+) = (\d+)\. ")


def check_arithmetic(doc: str) -> bool:
    """True if every "a op b = c." step is right, uses only numbers from the question or earlier
    steps, and "The answer is N." repeats the last result."""
    m = re.fullmatch(r"Question: (.+)\nAnswer: (.+?)\n?", doc, re.S)
    ans = m and _ANSWER.fullmatch(m.group(2).strip())
    if not ans:
        return False
    known = {int(x) for x in re.findall(r"\d+", m.group(1))}
    c = None
    for a, op, b, c in ((int(a), op, int(b), int(c)) for a, op, b, c in _STEP.findall(ans.group(1))):
        if a not in known or b not in known or OPS[op](a, b) != c:
            return False
        known.add(c)
    return c == int(ans.group(2))


# ------------------------------------------------------------------------------------------- writing

GENERATORS = {"dyck": generate_dyck, "arithmetic": generate_arithmetic}


def _check_n(n):
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"the number of documents must be a whole number >= 0 (got {n!r})")


def _check_name(name):
    if name not in GENERATORS:
        raise ConfigError(f"unknown reasoning set {name!r}; valid: {', '.join(GENERATORS)}")


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _our_meta(meta_path, name):
    """The metadata of a set written here before (by any generator version, finished or not), else None."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, not JSON, not UTF-8
        return None
    ours = isinstance(meta, dict) and meta.get("name") == name
    return meta if ours and str(meta.get("format")).startswith("ebt-reasoning-") else None


def write_reasoning_set(name: str, out_dir, n: int = 2000, seed: int = 1234) -> Path:
    """Write out_dir/reasoning/{name}.jsonl and its metadata {name}.json. Returns the jsonl path;
    does nothing if both are there from the same (n, seed) and generator version."""
    _check_name(name)
    _check_n(n)
    if n == 0:
        raise ConfigError("a reasoning set needs at least 1 document; pass n >= 1 (2000 is the default)")
    d = Path(out_dir) / "reasoning"
    path, meta_path = d / f"{name}.jsonl", d / f"{name}.json"
    old = _our_meta(meta_path, name)
    taken = [p for p in (meta_path, path) if p.exists() or p.is_symlink()]
    if taken and old is None:  # a file of the user's under our name: never overwrite it
        raise DataError(f"{taken[0]} already exists and was not written by `ebt eval --reasoning`; it is "
                        f"never overwritten: move it away")
    # the sha256 catches a jsonl edited or cut short since the metadata was written
    if old and path.is_file() and (old.get("format"), old.get("n"), old.get("seed")) == (FORMAT, n, seed) \
            and old.get("sha256") == _sha256(path):
        return path
    gen = GENERATORS[name]
    write_json(meta_path, {"name": name, "format": FORMAT, "writing": True})  # ours, before the jsonl
    write_jsonl(path, ({"text": t, "id": i} for i, t in enumerate(gen(n, seed))))
    meta = {"name": name, "n": n, "seed": seed, "format": FORMAT, "generator": gen.__doc__.strip(),
            "created_by": f"ebt {__version__}", "sha256": _sha256(path)}
    write_json(meta_path, meta)  # written last: its presence means the jsonl is complete
    return path


def default_reasoning_dir(checkpoint) -> Path:
    """RUN/reasoning_data for a run's checkpoint (or a run directory); CHECKPOINT/reasoning_data otherwise."""
    path = Path(checkpoint)
    run = path.parent if path.name in ("checkpoint", "checkpoint.old") else path
    return run / "reasoning_data"


def _reasoning_tokenizer(data_dir, out_dir):
    """data_dir's tokenizer, after checking out_dir is a folder of its own whose splits it can share."""
    if Path(out_dir).resolve() == Path(data_dir).resolve():
        raise ConfigError(f"the reasoning sets go to a folder of their own, not into the dataset {data_dir}; "
                          f"pick another --reasoning-dir")
    load_manifest(data_dir)  # a DataError naming it when data_dir is not a prepared dataset
    tok = tokenizer_for(data_dir)
    old = _ours(out_dir)
    if old and old.get("tokenizer") is not None \
            and (old["tokenizer"], old.get("dtype")) != (_tokenizer_record(tok), dtype_for(tok.vocab_size)):
        raise DataError(f"{out_dir} holds reasoning sets made with another tokenizer than {data_dir}'s "
                        f"({old['tokenizer'].get('name')}); pass another --reasoning-dir or delete {out_dir}")
    return tok


def add_reasoning_splits(data_dir, out_dir, names=("dyck", "arithmetic"), n: int = 2000, seed: int = 1234,
                         log=print) -> list[str]:
    """Generate each set into out_dir and tokenize it there as split ood_{name} with data_dir's tokenizer;
    data_dir is never written (`ebt data verify` on it counts only its own shards). Splits already built
    from the same (n, seed) are skipped."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:  # check every name before any work
        _check_name(name)
    tok, splits = _reasoning_tokenizer(data_dir, out_dir), []
    manifest = _ours(out_dir) or {}
    for name in names:
        split, want = f"ood_{name}", {"name": name, "n": n, "seed": seed, "format": FORMAT}
        splits.append(split)
        entry = manifest.get("splits", {}).get(split)
        # the split entry carries the recipe; shards are checked by size so a half-deleted split is redone
        if entry and entry.get("reasoning") == want and not any(
                check_shard(out_dir, s, manifest["dtype"]) for s in entry["shards"]):
            log(f"[data] {split}: already built in {out_dir} (n={n}, seed={seed}); skipping")
            continue
        path = write_reasoning_set(name, out_dir, n, seed)
        entry = write_shards(iter_jsonl_texts(path), tok, out_dir, split)
        manifest = load_manifest(out_dir)  # write_shards rewrote it; add the recipe to our entry
        manifest["splits"][split]["reasoning"] = want
        manifest["tokenizer_from"] = str(data_dir)
        write_json(Path(out_dir) / "manifest.json", manifest)
        log(f"[data] {split}: {entry['documents']:,} documents, {entry['tokens']:,} tokens in {out_dir}")
    return splits
