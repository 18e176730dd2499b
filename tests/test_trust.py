"""What a user must be able to trust: no code runs from a run file, a checkpoint is never written from
non-finite weights, every file of a resumed checkpoint comes from one directory, a failed write keeps the
previous checkpoint, and a changed weight file is caught."""

import json
import os

import pytest
import torch
from test_train import ebt_config, run_config, tiny_data, weights  # noqa: F401 (a fixture)

from ebt.models import load_model
from ebt.errors import CheckpointError
from ebt.train import TrainingError, train

QUIET = {"log": lambda *a: None}


class Payload:
    """Unpickling this creates a folder: the stand-in for `os.system` in a hostile file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def trainer_step(run_dir):
    return json.loads((run_dir / "checkpoint" / "trainer_state.json").read_text())["step"]


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt", "replay_rank0.pt"])
def test_a_pickled_payload_in_a_run_file_never_runs(tiny_data, tmp_path, name):  # noqa: F811
    data_dir, _ = tiny_data
    train(ebt_config(data_dir, tmp_path / "r", "s2", steps=4, stop_at=2), **QUIET)
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker), "torch": Payload(marker), "size": Payload(marker)},
               tmp_path / "r" / "checkpoint" / name)
    with pytest.raises(CheckpointError, match=f"{name}.*pickled objects.*refused"):
        train(ebt_config(data_dir, tmp_path / "r", "s2", steps=4), resume=True, **QUIET)
    assert not marker.exists()


def test_convert_official_refuses_pickled_objects_unless_trusted(tmp_path):
    from ebt.compat.official import convert_official

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "hyper_parameters": Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="pickled Python objects.*--trust-pickle"):
        convert_official(tmp_path / "evil.ckpt", tmp_path / "out")
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # trusted: unpickled (the payload runs), then refused as no model
        convert_official(tmp_path / "evil.ckpt", tmp_path / "out", trust_pickle=True)
    assert marker.exists()


def poison_weights_at(monkeypatch, call):
    """Make the optimizer's `call`-th step (1-based) leave NaN in the token table (the next loss is NaN)."""
    import ebt.train as tr

    real = tr.make_optimizer

    def make(model, *args, **kw):
        opt, sched = real(model, *args, **kw)
        calls = []

        def poison(*_):
            calls.append(1)
            if len(calls) == call:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

        opt.register_step_post_hook(poison)
        return opt, sched

    monkeypatch.setattr(tr, "make_optimizer", make)


def test_a_nan_between_saves_keeps_the_last_finite_checkpoint_and_names_it(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    data_dir, _ = tiny_data
    poison_weights_at(monkeypatch, 3)  # weights NaN after step 3; the loss of step 4 is NaN
    run = run_config(data_dir, tmp_path / "r", steps=6, save_every=2, log_every=100, eval_every=0)
    with pytest.raises(TrainingError, match=r"non-finite at step 3: .*last good checkpoint is .*checkpoint \(step 2\)"):
        train(run, **QUIET)
    assert trainer_step(tmp_path / "r") == 2
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "r").values())


def test_non_finite_weights_are_never_written(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    data_dir, _ = tiny_data
    poison_weights_at(monkeypatch, 4)  # every loss finite, the weights saved after step 4 not
    run = run_config(data_dir, tmp_path / "r", steps=6, save_every=2, log_every=100, eval_every=0)
    with pytest.raises(TrainingError, match=r"weights held NaN or inf when saving after 4 steps: .*checkpoint \(step 2\)"):
        train(run, **QUIET)
    assert trainer_step(tmp_path / "r") == 2 and not (tmp_path / "r" / "checkpoint.tmp").exists()


def test_a_nan_before_the_first_save_says_there_is_no_checkpoint(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    data_dir, _ = tiny_data
    poison_weights_at(monkeypatch, 1)
    run = run_config(data_dir, tmp_path / "r", steps=6, save_every=2, log_every=100, eval_every=0)
    with pytest.raises(TrainingError, match="non-finite at step 1: .*no checkpoint was written"):
        train(run, **QUIET)
    assert not (tmp_path / "r" / "checkpoint").exists()


def test_resume_from_checkpoint_old_restores_the_replay_buffer_bit_for_bit(tiny_data, tmp_path):  # noqa: F811
    data_dir, _ = tiny_data
    train(ebt_config(data_dir, tmp_path / "a", "s2"), **QUIET)
    train(ebt_config(data_dir, tmp_path / "b", "s2", stop_at=3), **QUIET)
    # a save interrupted between its two renames leaves only checkpoint.old
    os.replace(tmp_path / "b" / "checkpoint", tmp_path / "b" / "checkpoint.old")
    train(ebt_config(data_dir, tmp_path / "b", "s2"), resume=True, **QUIET)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (torch.load(tmp_path / d / "checkpoint" / "replay_rank0.pt", weights_only=True) for d in "ab")
    assert torch.equal(ra["logits"], rb["logits"]) and torch.equal(ra["windows"], rb["windows"])
    assert not (tmp_path / "b" / "checkpoint.old").exists()


def test_a_new_run_never_deletes_an_existing_checkpoint_without_force(tiny_data, tmp_path):  # noqa: F811
    data_dir, _ = tiny_data
    train(run_config(data_dir, tmp_path / "r", steps=2, eval_every=0), **QUIET)
    os.replace(tmp_path / "r" / "checkpoint", tmp_path / "r" / "checkpoint.old")
    before = (tmp_path / "r" / "checkpoint.old" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=r"checkpoint.old already holds a checkpoint: .*--resume.*--force"):
        train(run_config(data_dir, tmp_path / "r", steps=2, eval_every=0), **QUIET)
    assert (tmp_path / "r" / "checkpoint.old" / "model.safetensors").read_bytes() == before
    train(run_config(data_dir, tmp_path / "r", steps=3, eval_every=0), force=True, **QUIET)
    assert trainer_step(tmp_path / "r") == 3 and not (tmp_path / "r" / "checkpoint.old").exists()


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_failed_write_keeps_the_previous_checkpoint_and_no_temporary(tiny_data, tmp_path, monkeypatch, writer):  # noqa: F811
    import ebt.checkpoint as ck

    data_dir, _ = tiny_data
    train(ebt_config(data_dir, tmp_path / "r", "s2", steps=4, stop_at=2), **QUIET)
    before = weights(tmp_path / "r")

    def full(*a, **k):  # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1024 vs 512")

    if writer == "torch.save":
        monkeypatch.setattr(torch, "save", full)
    else:
        monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*previous checkpoint there, if any, is "
                                              "untouched. Free disk space"):
        train(ebt_config(data_dir, tmp_path / "r", "s2", steps=4), resume=True, **QUIET)
    monkeypatch.undo()
    assert not (tmp_path / "r" / "checkpoint.tmp").exists()
    assert trainer_step(tmp_path / "r") == 2
    after = weights(tmp_path / "r")
    assert all(torch.equal(before[k], after[k]) for k in before)
    train(ebt_config(data_dir, tmp_path / "r", "s2", steps=4), resume=True, **QUIET)  # and it resumes
    assert trainer_step(tmp_path / "r") == 4


def test_a_changed_weight_file_is_an_error_not_a_silent_change(tiny_data, tmp_path):  # noqa: F811
    data_dir, _ = tiny_data
    train(run_config(data_dir, tmp_path / "r", steps=2, eval_every=0), **QUIET)
    f = tmp_path / "r" / "checkpoint" / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x10  # one bit of one weight: still a valid safetensors file
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors fails its sha256 check"):
        load_model(tmp_path / "r")


def test_resume_drops_metrics_rows_logged_after_the_checkpoint(tiny_data, tmp_path):  # noqa: F811
    data_dir, _ = tiny_data
    train(run_config(data_dir, tmp_path / "r", steps=6, stop_at=3, log_every=1, eval_every=0), **QUIET)
    log = tmp_path / "r" / "metrics.jsonl"
    with open(log, "a") as f:  # a run that died after logging steps 4-5 but before saving them
        f.write(json.dumps({"split": "train", "step": 4, "loss": 1.0}) + "\n")
        f.write('{"split": "train", "st')  # and a torn last line
    train(run_config(data_dir, tmp_path / "r", steps=6, log_every=1, eval_every=0), resume=True, **QUIET)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    keys = [(r["split"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)) and ("train", 6) in keys
    assert [r["loss"] for r in rows if r["step"] == 4] != [1.0]  # the resumed run's own row


def test_a_nan_after_resuming_from_checkpoint_old_names_that_checkpoint(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    data_dir, _ = tiny_data
    run = run_config(data_dir, tmp_path / "r", steps=6, stop_at=2, save_every=2, log_every=100, eval_every=0)
    train(run, **QUIET)
    os.replace(tmp_path / "r" / "checkpoint", tmp_path / "r" / "checkpoint.old")
    poison_weights_at(monkeypatch, 1)  # the resumed run's first update: its next loss is NaN
    run = run_config(data_dir, tmp_path / "r", steps=6, save_every=2, log_every=100, eval_every=0)
    with pytest.raises(TrainingError, match=r"last good checkpoint is .*checkpoint\.old \(step 2\)"):
        train(run, resume=True, **QUIET)
    assert (tmp_path / "r" / "checkpoint.old" / "config.json").is_file()
