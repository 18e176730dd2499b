"""Evaluation: token-weighted loss and perplexity, exp(sum NLL / tokens), never a mean of batch perplexities."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from ebt.checkpoint import unwrap


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked ('auto' or 'bf16'); float32/64 runs need no context."""
    if precision in ("auto", "bf16") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fmt_ppl(ppl: float) -> str:
    """Perplexities of untrained models are astronomically large: print those in scientific notation."""
    return f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.2e}"


@torch.no_grad()
def evaluate_lm(model, data, batch_size: int = 32, max_windows: int | None = None, device="cpu",
                precision: str = "auto") -> dict:
    """Token-weighted validation loss over `data` (a TokenData split). DDP-aware: each rank scores its
    share of the windows and the sums are all-reduced, so every rank returns the same numbers."""
    device = torch.device(device)
    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    dist_on = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist_on else (0, 1)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # nll, tokens
    for batch in data.eval_batches(batch_size, rank=rank, world_size=world, max_windows=max_windows):
        with autocast(device, precision):
            out = bare(batch.to(device, non_blocking=True))
        sums[0] += out["nll_sum"].double()
        sums[1] += out["n_tokens"].double()
    if dist_on:
        dist.all_reduce(sums)
    bare.train(was_training)
    nll, n = sums.tolist()
    if n == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    loss = nll / n
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(n)}
