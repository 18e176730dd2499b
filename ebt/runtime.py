"""Run-time context helpers shared by training, evaluation, thinking and generation: precision and seeding."""

from __future__ import annotations

import contextlib

import torch


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
