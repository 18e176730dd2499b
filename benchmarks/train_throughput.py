"""Training throughput of the Transformer++ baseline and the EBT (S1, S2 recipes) of the same size:
tokens/s and peak memory of full optimizer steps (forward, backward, clipping, AdamW) on random tokens.
For S2, tokens/s counts fresh tokens (replayed rows are extra work on top).

Each configuration runs in its own process so peak memory (CPU: peak RSS growth over the process
after import; CUDA: torch.cuda.max_memory_allocated) belongs to that configuration alone. Variants in
one invocation are compared as ratios: this machine is noisy, absolute figures across runs are not.

    python benchmarks/train_throughput.py                      # CPU defaults
    python benchmarks/train_throughput.py --device cuda --sizes xxs small --batch 32 --context 256 --vocab 50277
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def measure(model_name, size, vocab, context, batch, device, attention, steps, warmup, precision, compile_):
    import torch

    from ebt.config import ModelConfig, TrainConfig, recipe
    from ebt.fast.plan import resolve_plan
    from ebt.runtime import autocast
    from ebt.models import build_model
    from ebt.train import make_optimizer

    dev = torch.device(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    kind, _, rec = model_name.partition("-")
    model = build_model(ModelConfig(model=kind, size=size, vocab_size=vocab, context_length=context,
                                    ebt=recipe(rec) if kind == "ebt" else None)).to(dev)
    # the Transformer++'s attention kernels; an EBT's contexts that keep a graph write the scores out, and
    # its plan leaves out the logging forward (the energy gap), not part of the training step
    kw = {"plan": resolve_plan(model, energy_gap=False)} if kind == "ebt" else {"fused": attention == "fused"}
    opt, _ = make_optimizer(model, TrainConfig(), 1e-4, dev)
    fwd = torch.compile(model) if compile_ else model
    x = torch.randint(0, vocab, (batch, context + 1), device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast(dev, precision):
            loss = fwd(x, **kw)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # KiB -> MiB on Linux
    return {"model": model_name, "size": size, "attention": attention, "tokens_per_s": batch * context / median,
            "ms_per_step": median * 1e3, "peak_mib": peak,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["transformer", "ebt-s1", "ebt-s2"],
                   choices=["transformer", "ebt-s1", "ebt-s2"])
    p.add_argument("--sizes", nargs="+", default=["4xs"])
    p.add_argument("--attention", nargs="+", default=["fused", "explicit"], choices=["fused", "explicit"],
                   help="the EBT always builds a second-order graph, so it only runs 'explicit'")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    a = p.parse_args()
    if a.one:
        model_name, size, attention = a.one.split(",")
        print(json.dumps(measure(model_name, size, a.vocab, a.context, a.batch, a.device, attention, a.steps, a.warmup,
                                 a.precision, a.compile)))
        return
    import torch

    print(f"# {time.strftime('%Y-%m-%d')} | {platform.processor() or platform.machine()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | device {a.device} | V {a.vocab} S {a.context} B {a.batch}")
    print("| model | size | attention | params (M) | ms/step | tokens/s | peak MiB | tokens/s vs first row of size |")
    print("|---|---|---|---|---|---|---|---|")
    for size in a.sizes:
        base = None
        for model_name, att in [(m, t) for m in a.models for t in a.attention if m == "transformer" or t == "explicit"]:
            cmd = [sys.executable, __file__, "--one", f"{model_name},{size},{att}", "--vocab", str(a.vocab), "--context",
                   str(a.context), "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup),
                   "--device", a.device, "--precision", a.precision] + (["--compile"] if a.compile else [])
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            base = base or r["tokens_per_s"]
            print(f"| {model_name} | {size} | {att} | {r['params_m']:.2f} | {r['ms_per_step']:.0f} | {r['tokens_per_s']:.0f} | "
                  f"{r['peak_mib']:.0f} | {r['tokens_per_s'] / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
