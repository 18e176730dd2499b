"""Kernels and time per decoded token of static-shape EBT decoding (2 thinking steps, greedy), in one run:
the token function (ebt.fast.decode: the context write and the whole think of a token as one function,
weights laid out once per decoder) against the per-step path it replaces (plan token_fn=False: the
context step, then ebt.think with the fast step), eager and compiled.

Kernels per token: the difference between a long and a short generation, divided by the extra tokens
(the prefill and set-up cancel). On CPU a "kernel" is the lowest profiled operation that computes (an
inductor kernel, an extern matrix product, an eager op; views and allocations are not counted), a proxy
for what the same code launches on a GPU; on CUDA, the device kernels the profiler records. Time per
token: the same difference in wall time (median of --repeats); tokens/s: a whole --long call (prefill
included), the issue's figure.

    python benchmarks/decode_kernels.py                       # CPU, xxs, V 2000 (a few minutes)
    python benchmarks/decode_kernels.py --device cuda --vocab 50277 --json $OUT/decode.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speed import build, timed  # noqa: E402

# profiled operations that launch no computation of their own: views, metadata, allocations, no-op casts
NOT_KERNELS = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "expand_as", "transpose", "t", "permute",
    "unsqueeze", "squeeze", "slice", "select", "alias", "as_strided", "detach", "detach_", "split", "unbind",
    "chunk", "split_with_sizes", "flatten", "unflatten", "view_as", "view_as_real", "view_as_complex", "real",
    "_conj", "conj", "resolve_conj", "lift_fresh", "promote_types", "result_type", "empty", "empty_like",
    "empty_strided", "to", "type_as", "contiguous", "linear", "matmul", "numpy_T",
    "_has_compatible_shallow_copy_type",
    "is_nonzero", "item", "_local_scalar_dense", "size", "stride", "dim",
}


def _computes(e) -> bool:
    name = e.name
    if "cpp_fused" in name or name.startswith("graph_") and "kernel" in name:
        return True
    return name.startswith("aten::") and name[6:] not in NOT_KERNELS


def kernels(prof, cuda: bool) -> int:
    """Device kernels (CUDA), or on CPU the lowest computing profiled operations (see the module doc)."""
    events = prof.events()
    if cuda:
        return sum(1 for e in events if str(e.device_type).endswith("CUDA"))

    def below(e) -> bool:  # some descendant computes
        return any(_computes(c) or below(c) for c in e.cpu_children)

    return sum(1 for e in events if _computes(e) and not below(e))


def measure(model, prompts, think_cfg, plan, dev, short: int, long: int, repeats: int, precision: str):
    from torch.profiler import ProfilerActivity, profile

    from ebt.generate import GenerateConfig, generate, release_static_decoder
    from ebt.runtime import autocast

    def run(n):
        return timed(lambda: generate(model, prompts, GenerateConfig(max_new_tokens=n, think=think_cfg,
                                                                     cuda_graph=True, compile=plan.compiled),
                                      plan=plan), dev)

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with autocast(dev, precision):
        run(4)  # compiles, captures (CUDA)
        ms = statistics.median((run(long)[0] - run(short)[0]) / (long - short) * 1e3 for _ in range(repeats))
        counts = []
        for n in (short, long):
            with profile(activities=acts) as prof:
                run(n)
            counts.append(kernels(prof, dev.type == "cuda"))
        dt, tokens = run(long)
    release_static_decoder(model)
    return {"ms_per_token": ms, "kernels_per_token": (counts[1] - counts[0]) / (long - short),
            "tokens_per_s": len(prompts) * long / dt, "first_tokens": tokens[0][:8]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="xxs")
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--short", type=int, default=8)
    p.add_argument("--long", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--precision", default="auto")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import torch

    from ebt.fast.plan import resolve_plan
    from ebt.think import ThinkConfig

    torch._inductor.config.cpp.enable_kernel_profile = True  # CPU: inductor's kernels appear in the profile
    dev = torch.device(a.device)
    model = build("ebt", "s2", a.size, a.vocab, a.prompt + a.long, dev).eval()
    think_cfg = ThinkConfig(steps=2, score_final=False, noise=0.0)
    head = (f"# decode kernels: {a.device}, size {a.size}, V {a.vocab}, prompt {a.prompt}, 2 thinking steps, "
            f"tokens {a.short} vs {a.long}; torch {torch.__version__}; {platform.node()}; "
            f"{time.strftime('%Y-%m-%d')}")
    rows = []
    for b in a.batch:
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, a.vocab, (b, a.prompt), generator=gen).tolist()
        for mode in a.modes:
            res = {}
            for path, token_fn in (("per-step", False), ("token function", True)):
                plan = resolve_plan(model, dev, compile=mode == "compiled", cuda_graph=True,
                                    token_fn=token_fn, explicit=True)
                res[path] = measure(model, prompts, think_cfg, plan, dev, a.short, a.long, a.repeats,
                                    a.precision)
                rows.append({"batch": b, "mode": mode, "path": path, **res[path]})
                print(f"# {b} {mode} {path}: {res[path]}", file=sys.stderr, flush=True)
                if a.json:  # after every row: a time limit that stops the run keeps what was measured
                    Path(a.json).write_text(json.dumps({"head": head, "rows": rows}, indent=1))
            same = res["per-step"]["first_tokens"] == res["token function"]["first_tokens"]
            rows[-1]["same_tokens"] = same
    print(head)
    print(f"| batch | mode | path | kernels / token | ms / token | vs per-step (time) | tokens/s ({a.long}) "
          "| same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        key = (r["batch"], r["mode"])
        base.setdefault(key, r["ms_per_token"])
        print(f"| {r['batch']} | {r['mode']} | {r['path']} | {r['kernels_per_token']:.0f} "
              f"| {r['ms_per_token']:.2f} | {base[key] / r['ms_per_token']:.2f}x | {r['tokens_per_s']:.0f} "
              f"| {r.get('same_tokens', '')} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"head": head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
