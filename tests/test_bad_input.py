"""Every bad input: exit code 2, one line on stderr naming the flag or file, no traceback, nothing lost."""

import json
import shutil

import pytest
import torch
from test_train import TEXT

from ebt.cli import main
from ebt.data.shards import write_shards
from ebt.data.tokenizers import get_tokenizer


def fails(capsys, *argv):
    """Run `ebt ARGV` in this process; it must exit 2 with one line on stderr. Returns that line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A prepared dataset (with its tokenizer), another of a different vocabulary, and a trained run."""
    root = tmp_path_factory.mktemp("bad")
    for name, vocab in (("data", 280), ("other", 300)):
        tok = get_tokenizer("bpe", root / "cache", texts=TEXT, vocab_size=vocab)
        for split, docs in (("train", TEXT[:40]), ("val", TEXT[40:44]), ("ood", TEXT[44:])):
            write_shards(docs, tok, root / name, split)
    main(["train", "--data", str(root / "data"), "--out", str(root / "run"), "--size", "4xs", "--n-layer", "1",
          "--d-model", "32", "--n-head", "2", "--context-length", "16", "--steps", "2", "--batch-size", "4",
          "--eval-every", "0", "--eval-windows", "2", "--device", "cpu", "--no-progress"])
    return root


def train_args(root, out, *more):
    return ["train", "--data", root / "data", "--out", out, "--size", "4xs", "--n-layer", "1", "--d-model", "32",
            "--n-head", "2", "--context-length", "16", "--batch-size", "4", "--eval-every", "0", "--eval-windows",
            "2", "--device", "cpu", "--no-progress", *more]


@pytest.mark.parametrize("argv, flag", [
    (["train", "--steps", "-5"], "--steps"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--log-every", "0"], "--log-every"),
    (["train", "--grad-accum", "0"], "--grad-accum"),
    (["train", "--eval-windows", "-1"], "--eval-windows"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--warmup-steps", "-1"], "--warmup-steps"),
    (["train", "--min-lr-ratio", "2"], "--min-lr-ratio"),
    (["train", "--grad-clip", "nan"], "--grad-clip"),
    (["train", "--langevin", "nan"], "--langevin"),
    (["train", "--alpha", "0"], "--alpha"),
    (["train", "--replay-fraction", "1.5"], "--replay-fraction"),
    (["train", "--context-length", "0"], "--context-length"),
    (["train", "--steps", "ten"], "--steps"),
    (["eval", "x", "--windows", "-3"], "--windows"),
    (["eval", "x", "--think-steps", "0"], "--think-steps"),
    (["generate", "x", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["generate", "x", "--top-p", "0"], "--top-p"),
    (["generate", "x", "--temperature", "nan"], "--temperature"),
    (["generate", "x", "--noise", "nan"], "--noise"),
    (["generate", "x", "--candidates", "0"], "--candidates"),
    (["demo", "--steps", "0"], "--steps"),
    (["scale", "--steps", "-1"], "--steps"),
    (["check-reference", "f", "--tol", "-1"], "--tol"),
])
def test_numeric_flags_are_checked_when_parsed(capsys, argv, flag):
    line = fails(capsys, *argv)
    assert line.startswith(f"ebt {argv[0]}: error: argument {flag}: must be") and "--help" in line


def test_a_config_file_out_of_range_is_refused(capsys, run, tmp_path):
    saved = json.loads((run / "run" / "config.json").read_text())
    saved["train"]["lr"] = float("inf")
    (tmp_path / "c.json").write_text(json.dumps(saved))
    assert "TrainConfig.lr must be > 0 (a finite number, got inf)" in fails(capsys, "train", "--config", tmp_path / "c.json")
    (tmp_path / "c.json").write_text("{not json")
    assert "--config" in fails(capsys, "train", "--config", tmp_path / "c.json")


def test_resume_refusals(capsys, run, tmp_path):
    line = fails(capsys, *train_args(run, tmp_path / "none", "--steps", "4", "--resume"))
    assert "--resume" in line and "holds no checkpoint" in line
    shutil.copytree(run / "run", tmp_path / "r")
    line = fails(capsys, *train_args(run, tmp_path / "r", "--steps", "1", "--resume"))
    assert "--steps 1 is below the step of the checkpoint" in line
    assert "pass one of them" in fails(capsys, *train_args(run, tmp_path / "r", "--resume", "--force"))
    assert "--force" in fails(capsys, *train_args(run, tmp_path / "r", "--steps", "4"))  # a fresh run over it


@pytest.mark.parametrize("damage, names", [
    (lambda c: (c / "trainer_state.json").write_text(json.dumps({"step": 2})), "trainer_state.json lacks tokens_seen"),
    (lambda c: (c / "trainer_state.json").write_text("{"), "trainer_state.json is unreadable"),
    (lambda c: (c / "rng.pt").write_bytes((c / "rng.pt").read_bytes()[:300]), "rng.pt (random generator state) is "
                                                                             "corrupt"),
    (lambda c: torch.save({"optimizer": [1]}, c / "optimizer.pt"), "optimizer.pt lacks optimizer, scheduler"),
    (lambda c: (c / "model.safetensors").write_bytes(b"\x00"), "model.safetensors fails its sha256 check"),
])
def test_damaged_checkpoint_files_name_themselves(capsys, run, tmp_path, damage, names):
    shutil.copytree(run / "run", tmp_path / "r")
    damage(tmp_path / "r" / "checkpoint")
    assert names in fails(capsys, *train_args(run, tmp_path / "r", "--steps", "4", "--resume"))


@pytest.mark.parametrize("damage, names", [
    (lambda f: f.write_bytes(f.read_bytes()[:200]), "replay_rank0.pt (replay buffer) is corrupt"),
    (lambda f: torch.save({**torch.load(f, weights_only=True), "logits": torch.zeros(6, 3, 2)}, f),
     "replay_rank0.pt: the saved replay buffer has windows (6, 17), candidates (6, 3, 2)"),
    (lambda f: torch.save({**torch.load(f, weights_only=True), "size": 99}, f), "size 99"),
    (lambda f: torch.save([1, 2], f), "replay_rank0.pt is not a replay buffer"),
])
def test_a_damaged_replay_buffer_names_its_file(capsys, run, tmp_path, damage, names):
    out = tmp_path / "s2"
    args = train_args(run, out, "--model", "ebt", "--recipe", "s2", "--replay-buffer", "6")
    main([str(a) for a in args + ["--steps", "4", "--stop-at", "2"]])
    capsys.readouterr()
    damage(out / "checkpoint" / "replay_rank0.pt")
    assert names in fails(capsys, *args, "--steps", "4", "--resume")


def test_a_missing_ood_shard_is_found_before_training(capsys, run, tmp_path):
    shutil.copytree(run / "data", tmp_path / "data")
    next((tmp_path / "data").glob("ood_*.bin")).unlink()
    line = fails(capsys, *train_args(tmp_path, tmp_path / "r", "--steps", "2"))
    assert "ood_00000.bin is missing" in line
    assert not (tmp_path / "r" / "checkpoint").exists() and not (tmp_path / "r" / "metrics.jsonl").exists()


def test_wandb_needs_its_key_from_the_environment(capsys, run, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    line = fails(capsys, *train_args(run, tmp_path / "r", "--steps", "2", "--wandb"))
    assert "--wandb needs WANDB_API_KEY" in line and not (tmp_path / "r").exists()


def test_eval_output_folder_is_checked_before_evaluating(capsys, run, tmp_path):
    line = fails(capsys, "eval", run / "run", "--json", tmp_path / "nope" / "x.json")
    assert line.startswith("error: --json") and "does not exist" in line
    assert "--markdown" in fails(capsys, "eval", run / "run", "--markdown", tmp_path / "nope" / "x.md")


def test_generate_refusals(capsys, run, tmp_path):
    line = fails(capsys, "generate", run / "run", "--prompts-file", tmp_path / "missing.txt")
    assert "--prompts-file" in line and "missing.txt" in line
    shutil.copytree(run / "run", tmp_path / "r")
    shutil.rmtree(tmp_path / "r" / "checkpoint" / "tokenizer")
    line = fails(capsys, "generate", tmp_path / "r", "--prompt", "The", "--data", run / "other")
    assert "vocabulary mismatch" in line and "300" in line
    shutil.copytree(run / "data" / "tokenizer", tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text("garbage")
    shutil.copytree(tmp_path / "tok", tmp_path / "r" / "checkpoint" / "tokenizer")
    assert "tokenizer.json" in fails(capsys, "generate", tmp_path / "r", "--prompt", "The")


def test_resume_with_other_optimizer_groups_names_the_file(capsys, run, tmp_path):
    shutil.copytree(run / "run", tmp_path / "r")
    line = fails(capsys, *train_args(run, tmp_path / "r", "--steps", "4", "--resume", "--decay-matrices-only"))
    assert "optimizer.pt does not fit this run's optimizer" in line


def test_resume_takes_the_saved_config_and_prints_each_override(capsys, run, tmp_path):
    shutil.copytree(run / "run", tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    saved["train"]["stop_at"] = 2  # the earlier call stopped there: this one must not stop again
    (tmp_path / "r" / "config.json").write_text(json.dumps(saved))
    main(["train", "--out", str(tmp_path / "r"), "--steps", "3", "--resume"])  # no model or data flag repeated
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("resuming with the settings saved in"))
    assert line.startswith(f"resuming with the settings saved in {tmp_path / 'r' / 'config.json'}; overridden: ")
    assert "train.steps 2 -> 3" in line and "model." not in line and "batch_size" not in line  # the copy's
    # out_dir is the only other change
    now = json.loads((tmp_path / "r" / "config.json").read_text())
    assert now["model"] == saved["model"] and now["train"]["batch_size"] == saved["train"]["batch_size"] == 4
    assert json.loads((tmp_path / "r" / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    line = fails(capsys, "train", "--out", tmp_path / "r", "--steps", "4", "--resume", "--d-model", "64")
    assert "another model config (d_model: 32 there, 64 here)" in line  # only the key that differs
