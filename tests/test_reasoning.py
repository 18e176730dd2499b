"""Generated reasoning sets: correctness of every document, determinism, files, and ood_* splits."""

import json
import re
from pathlib import Path

import pytest

from ebt.data import reasoning
from ebt.data.loader import TokenData, tokenizer_for, verify_dataset
from ebt.data.reasoning import (GENERATORS, PAIRS, add_reasoning_splits, check_arithmetic,
                                default_reasoning_dir, generate_arithmetic, generate_dyck, solve_dyck,
                                write_reasoning_set)
from ebt.data.shards import read_manifest, write_shards
from ebt.data.tokenizers import get_tokenizer
from ebt.errors import ConfigError, DataError


def _balanced(symbols):
    stack = []
    for s in symbols:
        if s in PAIRS:
            stack.append(s)
        elif not stack or PAIRS[stack.pop()] != s:
            return False
    return not stack


def _dyck_parts(doc):
    m = re.fullmatch(r"Input: ([^\n]+)\nOutput: ([^\n]+)\n", doc)
    assert m, doc
    return m.group(1), m.group(2)


# ----------------------------------------------------------------------------------------------- dyck

def test_solve_dyck():
    assert solve_dyck("[ { ( ) < > }") == "]"
    assert solve_dyck("( [ <") == "> ] )"
    assert solve_dyck("([<") == "> ] )"  # spaces are optional
    assert solve_dyck("( )") == ""
    with pytest.raises(DataError, match="not a prefix"):
        solve_dyck("( ]")
    with pytest.raises(DataError):
        solve_dyck("( a")


def test_dyck_documents_are_correct_and_varied():
    docs = generate_dyck(200, 0)
    lengths, seen = set(), set()
    for doc in docs:
        prefix, out = _dyck_parts(doc)
        assert out == solve_dyck(prefix) and out  # something is always left to close
        symbols = prefix.split() + out.split()
        assert _balanced(symbols), doc
        assert 4 <= len(prefix.split()) <= 30
        lengths.add(len(prefix.split()))
        seen.update(prefix.split())
    assert len(lengths) >= 15
    assert seen == set(PAIRS) | set(PAIRS.values())  # all 4 bracket types, opened and closed


def test_dyck_deterministic():
    assert generate_dyck(50, 7) == generate_dyck(50, 7)
    assert generate_dyck(50, 7) != generate_dyck(50, 8)
    assert generate_dyck(20, 7) == generate_dyck(50, 7)[:20]  # a smaller set is a prefix of a larger one


# ----------------------------------------------------------------------------------------- arithmetic

def test_arithmetic_documents_are_correct():
    docs = generate_arithmetic(500, 0)
    assert all(check_arithmetic(d) for d in docs), [d for d in docs if not check_arithmetic(d)][:3]
    for d in docs:
        assert re.fullmatch(r"Question: [^\n]+\?\nAnswer: [^\n]+ The answer is \d+\.\n", d), d


def test_every_template_is_correct():
    import random
    for t in reasoning.TEMPLATES:  # many draws per template, so rare corners (tiny totals) are hit
        r = random.Random(t.__name__)
        for _ in range(300):
            steps = []
            q = t(r, steps)
            assert 1 <= len(steps) <= 3
            assert check_arithmetic(reasoning._arithmetic_doc(q, steps)), (t.__name__, q, steps)


def test_check_arithmetic_rejects_mistakes():
    good = ("Question: Mia has 12 apples. She gives 5 to Noah and then buys 3 bags with 4 apples each. "
            "How many apples does Mia have now?\nAnswer: 12 - 5 = 7. 3 x 4 = 12. 7 + 12 = 19. The answer is 19.\n")
    assert check_arithmetic(good)
    assert not check_arithmetic(good.replace("7 + 12 = 19", "7 + 12 = 18"))  # wrong step
    assert not check_arithmetic(good.replace("The answer is 19", "The answer is 18"))  # wrong final answer
    assert not check_arithmetic(good.replace("12 - 5 = 7. 3 x 4 = 12. 7", "12 - 6 = 6. 3 x 4 = 12. 6"))  # 6 is not in the question
    assert not check_arithmetic(good.replace("3 x 4 = 12", "12 / 0 = 12"))
    assert not check_arithmetic("Question: Ten?\nAnswer: The answer is 10.\n")  # no working
    assert not check_arithmetic("Answer: 1 + 1 = 2. The answer is 2.\n")  # no question
    div = "Question: 7 and 2?\nAnswer: 7 / 2 = 3. The answer is 3.\n"
    assert not check_arithmetic(div)  # divisions must be exact


def _frame(question):
    """The question with numbers and vocabulary words blanked out: one frame per template."""
    words = [n for n, _ in reasoning.NAMES] + list(reasoning.OBJECTS + reasoning.PLANTS + reasoning.VEHICLES
                                                   + reasoning.PURCHASES)
    words += [w for pair in reasoning.CONTAINERS + reasoning.ITEMS for w in pair]
    words += ["he", "she", "his", "her", "him"]
    vocab = re.compile(r"\b(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")\b", re.I)
    return vocab.sub("_", re.sub(r"\d+", "#", question))


def test_arithmetic_varied_and_deterministic():
    docs = generate_arithmetic(200, 3)
    questions = [d.split("\n")[0] for d in docs]
    frames = {_frame(q) for q in questions}
    assert 6 <= len(frames) <= len(reasoning.TEMPLATES), frames
    ops = {tuple(re.findall(r"\d+ ([-+x/]) \d+ =", d)) for d in docs}
    assert len(ops) >= 6 and {len(o) for o in ops} == {1, 2, 3}
    assert len({n for n, _ in reasoning.NAMES if any(n in q for q in questions)}) >= 10
    assert generate_arithmetic(50, 3) == docs[:50]
    assert generate_arithmetic(50, 4) != docs[:50]


# ------------------------------------------------------------------------------------------- writing

def test_write_reasoning_set(tmp_path):
    path = write_reasoning_set("dyck", tmp_path, n=30, seed=5)
    assert path == tmp_path / "reasoning" / "dyck.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(30))
    assert [r["text"] for r in rows] == generate_dyck(30, 5)
    meta = json.loads((tmp_path / "reasoning" / "dyck.json").read_text())
    assert (meta["name"], meta["n"], meta["seed"]) == ("dyck", 30, 5)
    assert meta["generator"] and meta["created_by"].startswith("ebt ")

    mtime = path.stat().st_mtime_ns
    write_reasoning_set("dyck", tmp_path, n=30, seed=5)
    assert path.stat().st_mtime_ns == mtime  # same n and seed: left alone
    write_reasoning_set("dyck", tmp_path, n=30, seed=6)
    assert json.loads((tmp_path / "reasoning" / "dyck.json").read_text())["seed"] == 6
    assert [json.loads(l)["text"] for l in path.read_text().splitlines()] == generate_dyck(30, 6)

    with pytest.raises(ConfigError, match="dyck, arithmetic"):
        write_reasoning_set("sudoku", tmp_path)
    with pytest.raises(ConfigError, match="n >= 1"):
        write_reasoning_set("dyck", tmp_path, n=0)
    assert set(GENERATORS) == {"dyck", "arithmetic"}


def _tiny_dataset(data_dir):
    texts = ["The cat sat on the mat and looked at the moon.", "A dog ran in the park with a red ball.",
             "Numbers like 12 and 345 appear in stories; so do (brackets) and [lists]."] * 5
    tok = get_tokenizer("bpe", data_dir / "cache", texts=texts, vocab_size=300)
    write_shards(texts[:10], tok, data_dir, "train")
    write_shards(texts[10:], tok, data_dir, "val")
    tok.save(data_dir / "tokenizer")


def test_add_reasoning_splits(tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "run" / "reasoning_data"
    _tiny_dataset(data_dir)
    before = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    logs = []
    splits = add_reasoning_splits(data_dir, out, n=40, seed=2, log=logs.append)
    assert splits == ["ood_dyck", "ood_arithmetic"]
    assert {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()} == before  # the data untouched
    assert verify_dataset(data_dir) == [] and verify_dataset(out) == []
    assert sum(len(e["shards"]) for e in read_manifest(data_dir)["splits"].values()) == 2

    tok = tokenizer_for(data_dir)
    assert read_manifest(out)["tokenizer"] == read_manifest(data_dir)["tokenizer"]
    for name, marker in (("dyck", "Input:"), ("arithmetic", "Question:")):
        docs = GENERATORS[name](40, 2)
        entry = read_manifest(out)["splits"][f"ood_{name}"]
        assert entry["documents"] == 40 and entry["reasoning"]["seed"] == 2
        assert entry["tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)  # one eos per document
        data = TokenData(out, f"ood_{name}", 16)
        assert tok.decode(data.window(0)).startswith(marker)  # the split starts with the first document
        text = tok.decode([t for i in range(len(data)) for t in data.window(i)[:-1]])  # windows overlap by 1
        assert docs[0] + tok.tk.id_to_token(tok.eos_id) + docs[1] in text
    assert set(read_manifest(out)["splits"]) == {"ood_dyck", "ood_arithmetic"}

    # a second call finds everything in place and rewrites nothing
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    logs.clear()
    add_reasoning_splits(data_dir, out, n=40, seed=2, log=logs.append)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files
    assert len(logs) == 2 and all("skipping" in l for l in logs)

    # another seed rebuilds just the split asked for
    add_reasoning_splits(data_dir, out, names="dyck", n=40, seed=3, log=logs.append)
    assert read_manifest(out)["splits"]["ood_dyck"]["reasoning"]["seed"] == 3
    assert read_manifest(out)["splits"]["ood_arithmetic"]["reasoning"]["seed"] == 2


def test_default_reasoning_dir():
    assert default_reasoning_dir("runs/x/checkpoint") == Path("runs/x/reasoning_data")
    assert default_reasoning_dir("runs/x/checkpoint.old") == Path("runs/x/reasoning_data")
    assert default_reasoning_dir("exported") == Path("exported/reasoning_data")


def test_add_reasoning_splits_errors(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        add_reasoning_splits(tmp_path, tmp_path / "r", n=5)
    data_dir = tmp_path / "data"
    _tiny_dataset(data_dir)
    with pytest.raises(ConfigError, match="valid: dyck, arithmetic"):
        add_reasoning_splits(data_dir, tmp_path / "r", names=("dyck", "chess"), n=5)
    assert not (tmp_path / "r").exists()  # a bad name fails before any work
    with pytest.raises(ConfigError, match="folder of their own, not into the dataset"):
        add_reasoning_splits(data_dir, data_dir, n=5)
    other = tmp_path / "other"  # the same folder asked to hold sets of another tokenizer
    texts = ["Completely different words here, with more of them."] * 8
    write_shards(texts, get_tokenizer("bpe", other / "cache", texts=texts, vocab_size=270), other, "train")
    add_reasoning_splits(data_dir, tmp_path / "r", names="dyck", n=5, log=lambda *a: None)
    with pytest.raises(DataError, match="made with another tokenizer"):
        add_reasoning_splits(other, tmp_path / "r", names="dyck", n=5)
