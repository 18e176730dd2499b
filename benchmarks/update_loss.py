"""The compiled training step's (B, S, V) side without its matrix products, in one run: p = softmax(z) laid
out for the products (`_probs_in`), then the update and the token-loss gradient as two compiled functions
(`mapped_update`, which reduces z's softmax statistics again, then `token_loss_grad`, whose one-hot
scatter leaves a float gradient that a second pass casts and pads) against one
(ebt.objective.update_and_token_grad: p from `_probs_in`'s statistics, the one-hot as a comparison).
Kernels per call (the lowest profiled operations that compute, as benchmarks/decode_kernels.py counts
them), time per call (median of --repeats) and the memory a call adds at its peak, outputs included (CUDA:
the allocator's peak; CPU: the peak resident size, reset through /proc/self/clear_refs; large tensors are
mapped and unmapped one by one there, so it follows the live tensors).

    python benchmarks/update_loss.py                                   # CPU: B 4, S 64, V 8003
    python benchmarks/update_loss.py --device cuda --batch 32 --seq 256 --vocab 50277
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_kernels import kernels  # noqa: E402
from speed import _sync, timed  # noqa: E402


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_gib(fn, dev) -> float:
    """What one call of fn adds to memory at its peak (its outputs included)."""
    import gc

    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return (torch.cuda.max_memory_allocated() - base) / 2**30
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident size starts again from now
    base = _status_kib("VmRSS")
    out = fn()
    del out
    return (_status_kib("VmHWM") - base) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8003)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from ebt.fast.vocab_side import mapped_update, _probs_in
    from ebt.models.transformer import token_loss_grad
    from ebt.nn import VOCAB_ALIGN, compiled
    from ebt.objective import update_and_token_grad

    torch._inductor.config.cpp.enable_kernel_profile = True
    dev = torch.device(a.device)
    g = torch.Generator(device=dev).manual_seed(0)
    B, S, V = a.batch, a.seq, a.vocab
    width = (-V) % VOCAB_ALIGN
    layout = (torch.bfloat16, width)  # the products' layout under autocast on a padding device
    z = 5 * torch.randn(B, S, V, device=dev, generator=g)
    wtu = torch.randn(B, S, V + width, device=dev, generator=g).to(torch.bfloat16)
    alpha = torch.full((B, S, 1), 0.5, device=dev)
    t = torch.randint(1, V, (B, S), device=dev, generator=g)

    # p stays alive through both, as in the step (its weight gradient reads it after the update)
    def two():
        p, _ = compiled(_probs_in)(z, True, *layout)
        z_next = compiled(mapped_update)(z, wtu, alpha, True)
        return (z_next, *compiled(token_loss_grad)(z_next, t, 0, 0.5, layout), p)

    def one():
        p, stats = compiled(_probs_in)(z, True, *layout)
        return (*compiled(update_and_token_grad)(z, wtu, alpha, True, stats, t, 0, 0.5, layout), p)

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    rows, outs = [], {}
    for name, fn in (("two functions", two), ("one function", one)):
        for _ in range(3):  # compiles, warms
            outs[name] = fn()
        times = [timed(fn, dev)[0] for _ in range(a.repeats)]
        with profile(activities=acts) as prof:
            fn()
            _sync(dev)
        rows.append((name, kernels(prof, dev.type == "cuda"), statistics.median(times) * 1e3,
                     peak_gib(fn, dev)))
    (z1, r1, v1, _), (z2, r2, v2, _) = outs["two functions"], outs["one function"]
    same = (float((z1 - z2).abs().max()), float((v1.float() - v2.float()).abs().max()),
            abs(float(r1["loss"]) - float(r2["loss"])))
    print(f"# update + loss gradient: {a.device}, B {B}, S {S}, V {V} (+{width} padding), gradient in bf16; "
          f"torch {torch.__version__}; {platform.node()}; {time.strftime('%Y-%m-%d')}")
    print(f"# z_next max |diff| {same[0]:.1e}; gradient max |diff| {same[1]:.1e}; loss |diff| {same[2]:.1e}")
    print(f"# (B, S, V) float32: {B * S * V * 4 / 2**30:.3f} GiB")
    print("| path | kernels / call | ms / call | vs two functions | peak added GiB |")
    print("|---|---|---|---|---|")
    for name, k, ms, gib in rows:
        print(f"| {name} | {k} | {ms:.2f} | {rows[0][2] / ms:.2f}x | {gib:.3f} |")


if __name__ == "__main__":
    main()
