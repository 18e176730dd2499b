"""The command line: help with examples, clear errors (exit status 2, no traceback), train -> eval."""

import json
import subprocess
import sys

import pytest

from ebt.cli import build_parser


def tiny_dataset(tmp_path):
    """A prepared dataset in tmp_path/data (train/val/ood splits and its tokenizer)."""
    from test_train import TEXT

    from ebt.data.shards import write_shards
    from ebt.data.tokenizers import get_tokenizer

    tok = get_tokenizer("bpe", tmp_path / "cache", texts=TEXT, vocab_size=280)
    for split, docs in (("train", TEXT[:40]), ("val", TEXT[40:44]), ("ood", TEXT[44:])):
        write_shards(docs, tok, tmp_path / "data", split)
    tok.save(tmp_path / "data" / "tokenizer")
    return tok


def ebt(*args):
    return subprocess.run([sys.executable, "-m", "ebt.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("cmd", [["train"], ["eval"], ["data", "prepare"], ["data", "video"], ["data", "images"],
                                 ["check-reference"], ["convert-official"], ["demo"], ["generate"], ["inspect"], ["scale"],
                                 ["reproduce"]])
def test_every_command_has_help_with_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*cmd, "--help"])
    assert e.value.code == 0
    assert "example" in capsys.readouterr().out


def test_bad_input_gives_a_message_not_a_traceback(tmp_path):
    r = ebt("train", "--data", tmp_path / "nope", "--out", tmp_path / "run")
    assert r.returncode == 2 and "ebt data prepare" in r.stderr and "Traceback" not in r.stderr
    r = ebt("eval", tmp_path)
    assert r.returncode == 2 and "not a checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = ebt("check-reference", tmp_path / "missing.safetensors")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = ebt("train", "--size", "huge")
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr


@pytest.mark.slow
def test_train_then_eval_from_the_command_line(tmp_path):
    tok = tiny_dataset(tmp_path)
    run = tmp_path / "run"
    r = ebt("train", "--model", "ebt", "--recipe", "s2", "--replay-buffer", "4", "--langevin", "0.5",
            "--data", tmp_path / "data", "--size", "4xs", "--n-layer", "1", "--d-model", "32", "--n-head", "2",
            "--context-length", "16", "--steps", "3", "--batch-size", "4", "--eval-every", "0", "--device", "cpu",
            "--no-progress", "--out", run)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((run / "checkpoint" / "config.json").read_text())
    assert cfg["model"]["ebt"]["langevin"] == 0.5 and cfg["model"]["ebt"]["replay_buffer"] == 4
    assert cfg["model"]["ebt"]["truncate"] is True and cfg["model"]["vocab_size"] == tok.vocab_size
    r = ebt("eval", run, "--splits", "val", "ood", "--json", tmp_path / "e.json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "e.json").read_text())["results"]
    assert res["val"]["tokens"] > 0 and res["ood"]["ppl"] > 1
    # the saved run config reproduces the run; a flag given beside --config overrides it
    r = ebt("train", "--config", run / "config.json", "--out", tmp_path / "run2", "--steps", "2",
            "--data", tmp_path / "data")
    assert r.returncode == 0, r.stderr
    cfg2 = json.loads((tmp_path / "run2" / "config.json").read_text())
    assert cfg2["model"] == cfg["model"] and cfg2["train"]["steps"] == 2


@pytest.mark.slow
def test_thinking_eval_generate_and_inspect(tmp_path):
    tiny_dataset(tmp_path)
    run = tmp_path / "run"
    r = ebt("train", "--model", "ebt", "--recipe", "s2", "--replay-buffer", "4", "--data", tmp_path / "data",
            "--size", "4xs", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--context-length", "16",
            "--steps", "2", "--batch-size", "4", "--eval-every", "0", "--device", "cpu", "--no-progress", "--out", run)
    assert r.returncode == 0, r.stderr
    r = ebt("eval", run, "--think", "--think-steps", "1", "3", "--candidates", "1", "2", "--tol", "0.01",
            "--reasoning", "--reasoning-n", "30", "--windows", "4", "--batch-size", "2", "--device", "cpu",
            "--json", tmp_path / "g.json", "--markdown", tmp_path / "g.md")
    assert r.returncode == 0, r.stderr
    grid = json.loads((tmp_path / "g.json").read_text())
    assert [(x["steps"], x["candidates"], x["tol"]) for x in grid["rows"]] == [
        (1, 1, None), (1, 2, None), (3, 1, None), (3, 2, None), (3, 1, 0.01), (3, 2, 0.01)]
    assert set(grid["rows"][0]["results"]) == {"val", "ood", "ood_dyck", "ood_arithmetic"}
    assert grid["rows"][0]["results"]["val"]["improvement_pct"] == 0.0
    assert grid["rows"][3]["results"]["val"]["passes_per_token"] == 2 * (3 + 1)
    md = (tmp_path / "g.md").read_text()
    assert md.count("\n") == 2 + 6 and "ood_dyck ppl" in md
    # the generated sets went to the run's own folder: the data still holds just its 3 shards
    r = ebt("data", "verify", tmp_path / "data")
    assert r.returncode == 0 and r.stdout.startswith("ok: 3 shard(s)"), r.stdout + r.stderr
    assert (run / "reasoning_data" / "ood_dyck_00000.bin").is_file()
    r = ebt("generate", run, "--prompt", "The quick brown", "--prompt", "Document", "--max-new-tokens", "5",
            "--device", "cpu")
    assert r.returncode == 0 and r.stdout.count("--- ") == 2, r.stderr
    r = ebt("inspect", run, "--text", "The quick brown fox jumps", "--out", tmp_path / "e.png", "--windows", "4",
            "--device", "cpu", "--json", tmp_path / "i.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "i.json").read_text())
    lines = r.stdout.splitlines()  # a report to read, the JSON in its file
    assert lines[0] == f"energy heatmap: {tmp_path / 'e.png'}"
    assert lines[-1] == f"report (JSON): {tmp_path / 'i.json'}"
    assert any(line.startswith("  natural < shuffled < random ") for line in lines)
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert set(rep["validation"]) >= {"mean_energy_natural", "mean_energy_shuffled", "mean_energy_random",
                                      "spearman_energy_nll"}
    r = ebt("generate", run, "--prompt", "x " * 40, "--device", "cpu")
    assert r.returncode == 2 and "context_length" in r.stderr


@pytest.mark.slow
def test_eval_compiled_thinking_gives_the_same_perplexities(tmp_path):
    tiny_dataset(tmp_path)
    run = tmp_path / "run"
    r = ebt("train", "--model", "ebt", "--recipe", "s1", "--data", tmp_path / "data", "--size", "4xs", "--n-layer",
            "1", "--d-model", "32", "--n-head", "2", "--context-length", "16", "--steps", "2", "--batch-size", "4",
            "--eval-every", "0", "--device", "cpu", "--no-progress", "--out", run)
    assert r.returncode == 0, r.stderr
    grids = []
    for extra in ([], ["--compile"]):
        r = ebt("eval", run, "--think", "--think-steps", "3", "--candidates", "1", "2", "--tol", "0", "--splits",
                "val", "--windows", "5", "--batch-size", "2", "--device", "cpu", "--json", tmp_path / "g.json", *extra)
        assert r.returncode == 0, r.stderr
        assert ("compiled written-out energy gradient" in r.stdout) == bool(extra)
        grids.append(json.loads((tmp_path / "g.json").read_text())["rows"])
    for eager, compiled in zip(*grids):
        a, b = eager["results"]["val"]["ppl"], compiled["results"]["val"]["ppl"]
        assert b == pytest.approx(a, rel=1e-4), (eager, compiled)

