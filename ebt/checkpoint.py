"""Checkpoints: a directory in Hugging Face style (config.json + model.safetensors) plus what resuming
needs (optimizer.pt: optimizer and scheduler; trainer_state.json: step and data position; rng.pt).

A checkpoint is written to `<dir>.tmp` and swapped in by renames, so an existing checkpoint is never
left half-written: if the process dies mid-save the old one is still at `<dir>` (or, for the instant
between the two renames, at `<dir>.old`, which `resolve` picks up).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ebt.config import ModelConfig, from_dict
from ebt.errors import CheckpointError, ConfigError

FORMAT = "ebt-checkpoint-v1"


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
    raise CheckpointError(f"{path} is not a checkpoint: it has no config.json (expected config.json + model.safetensors)")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def staging_dir(path) -> Path:
    """Where a checkpoint is written before `publish_checkpoint` swaps it in."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def save_checkpoint(path, model, config: dict, optimizer=None, scheduler=None, trainer_state=None,
                    extra_dirs: dict[str, Path] | None = None, publish: bool = True) -> Path:
    """Write a checkpoint directory atomically. `config` is the run config dict (with a "model" key).

    publish=False leaves it staged (other processes may add files, say their replay buffers) until
    `publish_checkpoint(path)`."""
    path = Path(path)
    tmp = staging_dir(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({"format": FORMAT, **config}, indent=2, sort_keys=True) + "\n")
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
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {path} ({e.strerror or e}); the previous checkpoint there, if any, is "
            f"untouched. Free disk space or choose another --out directory, then resume."
        ) from e
    return publish_checkpoint(path) if publish else tmp


def publish_checkpoint(path) -> Path:
    """Swap a staged checkpoint into place by renames; the old one survives until the new one is in."""
    path = Path(path)
    tmp, old = staging_dir(path), path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
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
    f = resolve(path) / "model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: the checkpoint is incomplete; use another checkpoint")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f} is corrupt ({e}); use another checkpoint or retrain") from e


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source="checkpoint") -> None:
    """load_state_dict with a message that says which model the weights do not fit."""
    model = unwrap(model)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} is from a different model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:5]}. Build the model with the checkpoint's config.json "
            f"(ebt.models.from_pretrained does this)"
        )
    model.load_state_dict(state)


def load_model(path, device="cpu") -> torch.nn.Module:
    from ebt.models import build_model

    path = resolve(path)
    try:
        mcfg = from_dict(ModelConfig, read_config(path)["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'} describes no model this version can build ({e})") from e
    model = build_model(mcfg)
    load_weights(model, load_state(path), source=str(path))
    return model.to(device)


def load_training_state(path) -> dict:
    """Optimizer/scheduler/RNG/trainer state of a checkpoint written during training."""
    path = resolve(path)
    try:
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
        trainer = json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} holds weights only ({e.filename} missing): it cannot be resumed") from e
    except Exception as e:
        raise CheckpointError(f"training state in {path} is corrupt ({e}); resume from another checkpoint") from e
    return {"optimizer": opt["optimizer"], "scheduler": opt["scheduler"], "rng": rng, "trainer": trainer}
