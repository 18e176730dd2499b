"""Run-time context helpers shared by training, evaluation, thinking and generation: precision and seeding."""

from __future__ import annotations

import contextlib

import torch

from ebt.errors import ConfigError


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked ('auto' or 'bf16'); float32/64 runs need no context."""
    if precision in ("auto", "bf16") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Fix the random starts of an evaluation without disturbing the caller's random stream."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def resolve_device(pref: str | None, local_rank: int = 0) -> torch.device:
    """The device a run asks for: "auto" (or None) is this process's GPU if torch sees one, else the CPU; a
    bare "cuda" is the process's local GPU (torchrun's LOCAL_RANK)."""
    if pref in (None, "", "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(pref)
    except RuntimeError as e:
        raise ConfigError(f"--device {pref!r} is not a device: use cpu, cuda, cuda:N or auto") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {pref} was asked for but this torch build sees no GPU; use --device cpu")
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device
