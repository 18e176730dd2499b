"""Checkpoints: a directory in Hugging Face style (config.json + model.safetensors) plus what resuming
needs (optimizer.pt: optimizer and scheduler; trainer_state.json: step and data position; rng.pt).

Nothing read back is unpickled: every .pt file holds only tensors and plain values and is loaded with
`torch.load(weights_only=True)`, so a file a user was handed cannot run code. config.json records the
sha256 of model.safetensors, checked on load, so a corrupted weight file is an error, not a silent change.

A checkpoint is written to `<dir>.tmp` and swapped in by renames, so an existing checkpoint is never
left half-written: if the process dies mid-save the old one is still at `<dir>` (or, for the instant
between the two renames, at `<dir>.old`, which `resolve` picks up).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ebt.config import ModelConfig, from_dict
from ebt.errors import CheckpointError, ConfigError, first_line

FORMAT = "ebt-checkpoint-v1"
WEIGHTS = "model.safetensors"
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # torch.save reports a full disk as a RuntimeError


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def load_pt(path: Path, what: str):
    """A .pt file of tensors and plain values; never unpickles objects (weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} ({what}) holds pickled objects, not only tensors and plain values: "
                              f"refused, since unpickling can run code; resume from a checkpoint written by "
                              f"`ebt train`") from e
    except Exception as e:
        raise CheckpointError(f"{path} ({what}) is corrupt ({first_line(e)}); "
                              f"resume from another checkpoint") from e


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def resolve(path: str | Path) -> Path:
    """The checkpoint directory for `path`: a checkpoint itself, or a run directory holding one."""
    path = Path(path)
    if (path / "checkpoint").is_dir() or (path / "checkpoint.old").is_dir():  # a run directory
        path = path / "checkpoint"
    if (path / "config.json").is_file():
        return path
    old = path.with_name(path.name + ".old")
    if (old / "config.json").is_file():  # a save was interrupted between its two renames
        return old
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: pass a directory written by `ebt train`")
    raise CheckpointError(f"{path} is not a checkpoint: it has no config.json "
                          f"(expected config.json + model.safetensors)")


def find_checkpoint(run_dir) -> Path | None:
    """The checkpoint a run directory holds (`checkpoint`, or `checkpoint.old` after an interrupted save)."""
    try:
        return resolve(Path(run_dir) / "checkpoint")
    except CheckpointError:
        return None


def remove_checkpoint(run_dir) -> None:
    """Delete a run directory's checkpoint under every name it can have (for a run started with --force)."""
    for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)


def rng_state() -> dict:
    """Every generator's state as tensors and ints (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng(path: Path) -> dict:
    """rng.pt; files of older versions held NumPy's state as an array: rebuilt from an allowlist of NumPy's
    array constructors only (they build arrays, never run code), then put in today's form."""
    numpy_core = getattr(np, "_core", None) or np.core
    legacy = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), numpy_core.multiarray._reconstruct]
    has_allowlist = hasattr(torch.serialization, "safe_globals")
    allow = torch.serialization.safe_globals(legacy) if has_allowlist else nullcontext()
    with allow:
        state = load_pt(path, "random generator state")
    if isinstance(state, dict) and isinstance(state.get("numpy"), tuple):
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        version, internal, py_gauss = state["python"]
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                          "pos": pos, "has_gauss": has_gauss, "gauss": gauss}
        state["python"] = {"version": version, "internal": torch.tensor(internal), "gauss": py_gauss}
    return state


def set_rng_state(state: dict) -> None:
    np_state, py_state = state["numpy"], state["python"]
    torch.set_rng_state(state["torch"])
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    random.setstate((py_state["version"], tuple(int(v) for v in py_state["internal"].tolist()),
                     py_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def staging_dir(path) -> Path:
    """Where a checkpoint is written before `publish_checkpoint` swaps it in."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


class NonFiniteWeights(CheckpointError):
    """A checkpoint was about to be written from weights holding NaN or inf; nothing was written."""


def _write_failed(path: Path, e: Exception) -> CheckpointError:
    shutil.rmtree(staging_dir(path), ignore_errors=True)  # a failed write must not keep holding the disk
    reason = getattr(e, "strerror", None) or first_line(e)
    return CheckpointError(
        f"could not write checkpoint {path} ({reason}); the previous checkpoint there, if any, is "
        f"untouched. Free disk space or choose another --out directory, then resume.")


def save_checkpoint(path, model, config: dict, optimizer=None, scheduler=None, trainer_state=None,
                    extra_dirs: dict[str, Path] | None = None, publish: bool = True) -> Path:
    """Write a checkpoint directory atomically. `config` is the run config dict (with a "model" key).
    Weights holding NaN or inf are refused (NonFiniteWeights) before anything is written.

    publish=False leaves it staged (other processes may add files, say their replay buffers) until
    `publish_checkpoint(path)`."""
    path = Path(path)
    tmp = staging_dir(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteWeights(f"refusing to write checkpoint {path}: weights {bad[:3]} hold NaN or inf")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = {"format": FORMAT, **config, "sha256": {WEIGHTS: sha256(tmp / WEIGHTS)}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None},
                       tmp / "optimizer.pt")
            torch.save(rng_state(), tmp / "rng.pt")
        if trainer_state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        for name, src in (extra_dirs or {}).items():
            shutil.copytree(src, tmp / name)
        for f in tmp.rglob("*"):  # make sure the bytes are on disk before the rename publishes them
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except WRITE_ERRORS as e:
        raise _write_failed(path, e) from e
    return publish_checkpoint(path) if publish else tmp


def save_staged(path, name: str, obj) -> None:
    """Add a file of tensors and plain values (say, a process's replay buffer) to a staged checkpoint."""
    try:
        torch.save(obj, staging_dir(path) / name)
        with open(staging_dir(path) / name, "rb") as fh:
            os.fsync(fh.fileno())
    except WRITE_ERRORS as e:
        raise _write_failed(Path(path), e) from e


def publish_checkpoint(path) -> Path:
    """Swap a staged checkpoint into place by renames; the old one survives until the new one is in."""
    path = Path(path)
    tmp, old = staging_dir(path), path.with_name(path.name + ".old")
    try:
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_failed(path, e) from e
    shutil.rmtree(old, ignore_errors=True)
    return path


def read_config(path) -> dict:
    path = resolve(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'} is unreadable or corrupt ({e})") from e
    if "model" not in cfg:
        raise CheckpointError(f"{path / 'config.json'} has no 'model' section: not an ebt checkpoint")
    return cfg


def load_state(path) -> dict[str, torch.Tensor]:
    path = resolve(path)
    f = path / WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: the checkpoint is incomplete; use another checkpoint")
    want = read_config(path).get("sha256", {}).get(WEIGHTS)  # absent in checkpoints of older versions
    if want is not None and sha256(f) != want:
        raise CheckpointError(f"{f} fails its sha256 check against config.json (the file is corrupt or was "
                              f"changed); use another checkpoint or retrain")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f} is corrupt ({e}); use another checkpoint or retrain") from e


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source="checkpoint") -> None:
    """load_state_dict with a message that says which model the weights do not fit."""
    model = unwrap(model)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} is from a different model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:5]}. Build the model with the checkpoint's config.json "
            f"(ebt.models.from_pretrained does this)"
        )
    model.load_state_dict(state)


def read_model_config(path: Path) -> ModelConfig:
    """The ModelConfig a checkpoint (resolved) was saved with (ebt.models.load_model builds it)."""
    try:
        return from_dict(ModelConfig, read_config(path)["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'} describes no model this version can build "
                              f"({e})") from e


def load_training_state(path) -> dict:
    """Optimizer/scheduler/RNG/trainer state of a checkpoint written during training."""
    path = resolve(path)
    try:
        opt = load_pt(path / "optimizer.pt", "optimizer and scheduler state")
        rng = load_rng(path / "rng.pt")
        trainer = json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} holds weights only ({e.filename} missing): "
                              f"it cannot be resumed") from e
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'trainer_state.json'} is unreadable or corrupt ({e}); "
                              f"resume from another checkpoint") from e
    _expect(path / "optimizer.pt", opt, {"optimizer": dict, "scheduler": (dict, type(None))})
    _expect(path / "rng.pt", rng, {"torch": torch.Tensor, "numpy": dict, "python": dict})
    _expect(path / "trainer_state.json", trainer, {"step": int, "tokens_seen": int})
    if min(trainer["step"], trainer["tokens_seen"]) < 0:
        raise CheckpointError(f"{path / 'trainer_state.json'} holds a negative step or token count; "
                              f"resume from another checkpoint")
    return {"optimizer": opt["optimizer"], "scheduler": opt["scheduler"], "rng": rng, "trainer": trainer}


def _expect(file: Path, obj, keys: dict) -> None:
    """A side file read back must hold the keys (of the types) resuming uses."""
    bad = [k for k, kind in keys.items()
           if not isinstance(obj, dict) or k not in obj or not isinstance(obj[k], kind)
           or isinstance(obj[k], bool)]
    if bad:
        raise CheckpointError(f"{file} lacks {', '.join(bad)} (or holds the wrong type): it is corrupt or "
                              f"not written by `ebt train`; resume from another checkpoint")
