"""Inference benchmarks: (1) EBT thinking throughput and peak memory against the number of steps,
(2) generation speed with the static KV cache against re-running the prefix for every token.

Each thinking configuration runs in its own process so its peak memory (CPU: peak RSS growth after
the model is built; CUDA: max_memory_allocated) is its own. Random weights: speed does not depend on
them.

    python benchmarks/think_and_generate.py
    python benchmarks/think_and_generate.py --device cuda --size xxs --vocab 50277 --context 256 --batch 32
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def build(kind, size, vocab, context, device):
    import torch

    from ebt.config import ModelConfig, recipe
    from ebt.models import build_model

    torch.manual_seed(0)
    m = build_model(ModelConfig(model=kind, size=size, vocab_size=vocab, context_length=context,
                                ebt=recipe("s2") if kind == "ebt" else None)).to(device).eval()
    return m


def think_once(size, vocab, context, batch, steps, device, reps):
    import torch

    from ebt.fast.plan import resolve_plan
    from ebt.think import ThinkConfig, think

    dev = torch.device(device)
    model = build("ebt", size, vocab, context, dev)
    x = torch.randint(0, vocab, (batch, context), device=dev)
    plan = resolve_plan(model, dev)  # the device's default paths
    cfg = ThinkConfig(steps=1, noise=0.0)
    think(model, x, cfg, step=plan.think_step(model, cfg))  # warm-up; noise 0: comparable greedy tokens
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    cfg = ThinkConfig(steps=steps, noise=0.0)
    step = plan.think_step(model, cfg)
    for _ in range(reps):
        think(model, x, cfg, step=step)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    dt = (time.perf_counter() - t) / reps
    return {"steps": steps, "tokens_per_s": batch * context / dt, "s_per_batch": dt, "peak_growth_mib": peak}


def generation(kind, size, vocab, context, prompt_len, new_tokens, batch, device, think_steps):
    import torch

    from ebt.generate import GenerateConfig, generate, generate_uncached
    from ebt.think import ThinkConfig

    dev = torch.device(device)
    model = build(kind, size, vocab, context, dev)
    prompts = torch.randint(0, vocab, (batch, prompt_len)).tolist()
    cfg = GenerateConfig(max_new_tokens=new_tokens, think=ThinkConfig(steps=think_steps, score_final=False, noise=0.0) if kind == "ebt" else None)
    res = {}
    for name, fn in (("cached", generate), ("uncached", generate_uncached)):
        fn(model, prompts, GenerateConfig(max_new_tokens=2, think=cfg.think))  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(model, prompts, cfg)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        res[name] = batch * new_tokens / (time.perf_counter() - t)
        res[name + "_tokens"] = out
    res["same_tokens"] = res.pop("cached_tokens") == res.pop("uncached_tokens")
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="4xs")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=224)
    p.add_argument("--gen-batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--gen-size", help="model size for generation (default: --size)")
    p.add_argument("--skip-think", action="store_true", help="only the generation table")
    p.add_argument("--think-steps", type=int, default=2, help="EBT thinking steps per generated token")
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one thinking configuration
    a = p.parse_args()
    if a.one:
        print(json.dumps(think_once(a.size, a.vocab, a.context, a.batch, a.one, a.device, a.reps)))
        return
    import torch

    print(f"# {time.strftime('%Y-%m-%d')} | {platform.machine()} | torch {torch.__version__} | threads "
          f"{torch.get_num_threads()} | device {a.device} | size {a.size} V {a.vocab}")
    print(f"\n## EBT thinking, batch {a.batch} x {a.context} tokens (S2 model, 1 candidate)\n")
    print("| steps | tokens/s | s per batch | peak memory growth (MiB) |\n|---|---|---|---|")
    for steps in ([] if a.skip_think else a.steps):
        cmd = [sys.executable, __file__, "--one", str(steps), "--size", a.size, "--vocab", str(a.vocab),
               "--context", str(a.context), "--batch", str(a.batch), "--reps", str(a.reps), "--device", a.device]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"| {steps} | {r['tokens_per_s']:.0f} | {r['s_per_batch']:.2f} | {r['peak_growth_mib']:.0f} |", flush=True)
    size = a.gen_size or a.size
    print(f"\n## Generation ({size}): {a.prompt}-token prompts + {a.new_tokens} new tokens (context "
          f"{a.prompt + a.new_tokens}), EBT with {a.think_steps} thinking steps per token\n")
    print("| model | batch | cached tokens/s | re-run prefix tokens/s | speed-up | same greedy tokens |\n"
          "|---|---|---|---|---|---|")
    for kind in ("transformer", "ebt"):
        for b in a.gen_batch:
            r = generation(kind, size, a.vocab, a.prompt + a.new_tokens, a.prompt, a.new_tokens, b, a.device,
                           a.think_steps)
            print(f"| {kind} | {b} | {r['cached']:.1f} | {r['uncached']:.1f} | {r['cached'] / r['uncached']:.1f}x | "
                  f"{r['same_tokens']} |", flush=True)


if __name__ == "__main__":
    main()
