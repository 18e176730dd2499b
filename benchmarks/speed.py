"""Speed of our fast paths against a straightforward path that follows the official algorithm, in one run.

Measured in the same invocation (compare ratios, not absolute figures across runs):
- training tokens/s and peak memory: Transformer++, EBT S1 (time_embed and "default"), EBT S2 (fresh
  tokens/s; replayed rows are extra work); fast = ebt.objective.train_step with --methods (by default what
  `ebt train` takes without and with --compile: explicit and compiled on CPU, double and compiled on
  CUDA), one unroll step's graph at a time, context once per landscape; straightforward = the official algorithm
  (ebt.compat.official_algorithm: doubled sequence with an explicit mask, context recomputed in every
  energy evaluation, every step's graph kept until one backward);
- thinking tokens/s and memory for 2/4/8/16 steps (scoring a batch, S2 model), fast = context once,
  straightforward = the official algorithm's energy;
- greedy generation tokens/s at batch 1 and 8 with 2 thinking steps per token: fast = static KV cache
  (and, on CUDA, the decode step captured as a CUDA graph), straightforward = re-run the whole prefix
  with the official algorithm for every token;
- on CUDA, a float64 check that every fast path's gradients equal the full-graph ones on the device.

One step = forward, backward, grad clipping, AdamW (fused on CUDA). Median over --steps after --warmup.
Peak memory: CUDA max_memory_allocated per item; CPU peak RSS growth of a fresh process per item.

    python benchmarks/speed.py                                  # CPU, small config (a few minutes)
    python benchmarks/speed.py --device cuda --paper --json $OUT/speed.json   # paper config "xxs" + "small"
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev):
    """(seconds fn() took, its output), the device synchronised before and after."""
    _sync(dev)
    t = time.perf_counter()
    out = fn()
    _sync(dev)
    return time.perf_counter() - t, out


def _reset(dev):
    import gc

    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_gib(dev, base):
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**30


def _reserved_gib(dev):
    """CUDA: the most memory the caching allocator held from the driver (a graph's private pool
    included, also one captured before the measurement: the allocated peak counts only what a replay
    adds), what the device really gave up; None elsewhere."""
    import torch

    return torch.cuda.max_memory_reserved() / 2**30 if dev.type == "cuda" else None


def build(kind, rec, size, vocab, context, dev, variant=None):
    import torch

    from ebt.config import ModelConfig, recipe
    from ebt.models import build_model

    torch.manual_seed(0)
    e = None
    if kind == "ebt":
        e = recipe(rec)
        if variant:
            e.variant = variant
    return build_model(ModelConfig(model=kind, size=size, vocab_size=vocab, context_length=context, ebt=e)).to(dev)


# Each path an item measures is a plan (ebt.fast.plan): its gradient method, compiled or not, captured or not.
PATH_GRAD = {"official": "full", "graph": "double", "compiled": "explicit", "graph_compiled": "explicit",
             "fast": "auto"}


def plan_for(model, path: str, dev, **options):
    """The plan of a measured path; the training step's energy-gap logging (an extra forward) left out."""
    from ebt.fast.plan import resolve_plan

    return resolve_plan(model, dev, compile=path in ("compiled", "graph_compiled"),
                        cuda_graph=path in ("graph", "graph_compiled"), grad=PATH_GRAD.get(path, path),
                        **{"energy_gap": False, **options})


def train_item(it, a, dev):
    """tokens/s and peak memory of full optimizer steps."""
    import torch

    from functools import partial

    from ebt.compat.official_algorithm import OfficialAlgorithmEBT
    from ebt.config import TrainConfig
    from ebt.fast.cuda_graph import CapturedStep
    from ebt.objective import train_step
    from ebt.runtime import autocast
    from ebt.train import make_optimizer

    base = _reset(dev)
    model = build(it["kind"], it.get("recipe"), it["size"], a.vocab, a.context, dev, it.get("variant"))
    path = it["path"]
    if path == "official":
        model = OfficialAlgorithmEBT.from_model(model)
    model.train()
    opt, _ = make_optimizer(model, TrainConfig(), 1e-4, dev)
    step_fn = model
    if it["kind"] == "transformer":
        step_fn = torch.compile(model) if path == "compiled" else model
    x = torch.randint(0, a.vocab, (a.batch, a.context + 1), device=dev)
    # "compiled": the written-out gradient (method "explicit") through torch.compile; "graph_compiled":
    # that, captured as a CUDA graph
    ebt_step = None
    if it["kind"] == "ebt":
        plan = plan_for(model, path, dev)
        ebt_step = partial(train_step, model, plan=plan)
        if plan.cuda_graph:
            ebt_step = CapturedStep(model, ebt_step)
    times = []
    if path in ("graph", "graph_compiled") and getattr(model, "replay", None) is not None:
        # System 2: eager until the buffer is full, then a graph for every step count; all before timing
        for i in range(64):
            if ebt_step.graphs:
                break
            torch.manual_seed(5000 + i)
            with autocast(dev, a.precision):
                ebt_step(x)
            opt.zero_grad(set_to_none=True)
    for i in range(a.warmup + a.steps):
        torch.manual_seed(1000 + i)  # every path draws the same S2 step counts, alphas and noise
        _sync(dev)
        t = time.perf_counter()
        with autocast(dev, a.precision):
            if it["kind"] == "ebt":
                ebt_step(x)
            else:
                step_fn(x)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    return {"tokens_per_s": a.batch * a.context / med, "ms": med * 1e3, "peak_gib": _peak_gib(dev, base),
            "reserved_gib": _reserved_gib(dev), "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def think_item(it, a, dev):
    import torch

    from ebt.compat.official_algorithm import OfficialAlgorithmEBT
    from ebt.runtime import autocast
    from ebt.think import ThinkConfig, think

    model = build("ebt", "s2", it["size"], a.vocab, a.context, dev).eval()
    if it["path"] == "official":
        model = OfficialAlgorithmEBT.from_model(model)
    x = torch.randint(0, a.vocab, (a.batch, a.context), device=dev)
    # N steps = N energy evaluations, as official; noise 0: the same work as the recorded figures
    cfg = ThinkConfig(steps=it["steps"], score_final=False, noise=0.0)
    plan = plan_for(model, it["path"], dev)  # compiled: the written-out gradient, compiled: one forward
    with autocast(dev, a.precision):  # the step for the autocast dtype (a fused one where layouts differ)
        step = plan.think_step(model, cfg)
    run = lambda: think(model, x, cfg, step=step)  # noqa: E731
    if plan.cuda_graph:  # the whole thinking call captured once as a CUDA graph, then replayed
        from ebt.fast.cuda_graph import capture_cuda_graph

        with autocast(dev, a.precision):
            graph, _ = capture_cuda_graph(run, warmup=1)
        run = graph.replay
    with autocast(dev, a.precision):
        run()  # warm-up
        base = _reset(dev)
        times = [timed(run, dev)[0] for _ in range(a.think_reps)]
    med = sorted(times)[len(times) // 2]
    return {"tokens_per_s": a.batch * a.context / med, "ms": med * 1e3, "peak_gib": _peak_gib(dev, base),
            "reserved_gib": _reserved_gib(dev)}


def gen_item(it, a, dev):
    import torch

    from ebt.compat.official_algorithm import OfficialAlgorithmEBT
    from ebt.runtime import autocast
    from ebt.generate import GenerateConfig, generate, generate_uncached
    from ebt.think import ThinkConfig

    model = build("ebt", "s2", it["size"], a.vocab, a.prompt + a.new_tokens, dev).eval()
    fn = generate
    if it["path"] == "official":
        model, fn = OfficialAlgorithmEBT.from_model(model), generate_uncached
    new = a.new_tokens if it["path"] != "official" else min(a.new_tokens, a.official_gen_tokens)
    prompts = torch.randint(0, a.vocab, (it["batch"], a.prompt)).tolist()
    think_cfg = ThinkConfig(steps=2, score_final=False, noise=0.0)
    graphs = it["path"] in ("cuda_graph", "graph_compiled")
    comp = it["path"] in ("compiled", "graph_compiled")  # the written-out gradient, compiled
    def call(n):
        return timed(lambda: fn(model, prompts, GenerateConfig(max_new_tokens=n, think=think_cfg,
                                                                cuda_graph=graphs, compile=comp)), dev)

    with autocast(dev, a.precision):
        fn(model, prompts, GenerateConfig(max_new_tokens=4, think=think_cfg, cuda_graph=graphs, compile=comp))
        base = _reset(dev)
        dt, out = call(new)
        # a shorter call splits the whole call's time into a per-token rate and a fixed part (set-up, the
        # prefill, a graph's capture): what a longer generation approaches, and what each call pays once
        short = max(4, new // 8)  # not for the straightforward path: re-running the prefix has no constant rate
        dt_short = call(short)[0] if it["path"] != "official" else None
    res = {"tokens_per_s": it["batch"] * new / dt, "new_tokens": new, "peak_gib": _peak_gib(dev, base),
           "reserved_gib": _reserved_gib(dev), "first_tokens": out[0][:8]}
    if dt_short is not None and dt > dt_short:
        per_token = (dt - dt_short) / (new - short)
        res.update(marginal_tokens_per_s=it["batch"] / per_token, fixed_ms=(dt_short - short * per_token) * 1e3)
    return res


def check_item(it, a, dev):
    """float64 on the device: each fast path's gradients against the full-graph path (max relative). V 500:
    on CUDA the compiled step then runs its padded, fused (B, S, V) side."""
    import copy

    import torch

    from functools import partial

    from ebt.compat.official_algorithm import OfficialAlgorithmEBT
    from ebt.config import ModelConfig, recipe
    from ebt.fast.cuda_graph import CapturedStep
    from ebt.models import build_model
    from ebt.objective import train_step

    res = {}
    for rec in ("s1", "s2"):
        torch.manual_seed(0)
        e = recipe(rec)
        if rec == "s2":  # every buffered row replayed: the batch of the S2 graph check below (one compilation)
            e.replay_buffer, e.replay_fraction = 4, 1.0
        m = build_model(ModelConfig(model="ebt", size="4xs", vocab_size=500, context_length=32, ebt=e))
        m = m.to(dev, torch.float64).train()
        x = torch.randint(0, 500, (4, 33), device=dev)
        grads = {}
        paths = ("double", "jvp", "explicit", "compiled", "official")
        for path in ("full", *paths):
            mm = OfficialAlgorithmEBT.from_model(m) if path == "official" else copy.deepcopy(m)
            plan = plan_for(mm, path, dev, energy_gap=True)
            for rep in range(2):  # the second call replays rows (S2)
                torch.manual_seed(1 + rep)
                mm.zero_grad()
                train_step(mm, x, plan=plan)
            grads[path] = {n: p.grad.clone() for n, p in mm.named_parameters() if p.grad is not None}
        for path in paths:
            res[f"{rec} {path}"] = max(float((grads[path][n] - g).norm() / g.norm().clamp_min(1e-300))
                                       for n, g in grads["full"].items())
    # each recipe's step captured through CapturedStep against the eager step, in float64. Deterministic
    # but for what a graph draws from its own random offsets: a zero start, and for S2 no Langevin noise
    # or random alpha, with every buffered row replayed (4 of 4), so only the replayed rows' order differs.
    # S1: three replays; S2: its first call fills the buffer (eager in both), then a graph per step count.
    # The captured model has run no eager step of its own (as in `ebt train --cuda-graph`); each part
    # reports on its own.
    for rec, reps, kw in (("s1", 3, {}), ("s2", 7, dict(langevin=0.0, alpha_rand_scale=1.0, replay_buffer=4,
                                                          replay_fraction=1.0))):
        torch.manual_seed(0)
        m = build_model(ModelConfig(model="ebt", size="4xs", vocab_size=500, context_length=32,
                                    ebt=recipe(rec, init_scale=0.0, **kw))).to(dev, torch.float64).train()
        for name, compiled in (("", False), (" (compiled explicit)", True)):
            try:
                me, mg = copy.deepcopy(m), copy.deepcopy(m)
                plan_e = plan_for(me, "double", dev, energy_gap=True)
                plan_g = plan_for(mg, "compiled" if compiled else "double", dev, energy_gap=True)
                step = CapturedStep(mg, partial(train_step, mg, plan=plan_g))
                worst, counts = 0.0, []
                for rep in range(reps):
                    x = torch.randint(0, 500, (4, 33), device=dev)
                    me.zero_grad(set_to_none=True)
                    torch.manual_seed(100 + rep)  # the same host-drawn step counts
                    counts.append(int(train_step(me, x, plan=plan_e)["steps"]))
                    torch.manual_seed(100 + rep)
                    step(x)
                    worst = max(worst, max(float((p.grad - q.grad).norm() / p.grad.norm())
                                           for p, q in zip(me.parameters(), mg.parameters()) if p.grad is not None))
                if me.replay is not None:
                    worst = max(worst, float((me.replay.logits - mg.replay.logits).norm() / me.replay.logits.norm()))
                    res[f"{rec} cuda graph{name}: step counts, graphs"] = f"{counts}, {sorted(step.graphs)}"
                res[f"{rec} cuda graph{name} vs eager"] = worst
            except Exception as e:  # noqa: BLE001 (report, keep the other figures)
                res[f"{rec} cuda graph{name} vs eager"] = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
    return res


def profile_step(a, dev, path="double"):
    """Where one EBT S1 training step (forward, backward; no optimizer) spends device time: the kernels,
    and the step's named parts (ebt.context, ebt.step.*, ebt.context_backward). path: a gradient method,
    or "compiled" (the written-out gradient under torch.compile)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ebt.runtime import autocast

    from ebt.objective import train_step

    model = build("ebt", "s1", a.sizes[0], a.vocab, a.context, dev).train()
    plan = plan_for(model, path, dev)
    x = torch.randint(0, a.vocab, (a.batch, a.context + 1), device=dev)
    for _ in range(3):
        with autocast(dev, a.precision):
            train_step(model, x, plan=plan)
        model.zero_grad(set_to_none=True)
    _sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        with autocast(dev, a.precision):
            train_step(model, x, plan=plan)
        _sync(dev)
        wall = time.perf_counter() - t
    cuda = dev.type == "cuda"
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=90)
    if cuda:  # kernels per named part, from the trace: each kernel goes to the part that launched it
        trace = Path(a.json).with_suffix(f".trace_{path}.json") if a.json else Path("/tmp/ebt_profile_trace.json")
        prof.export_chrome_trace(str(trace))
        parts = phase_times(trace)
    else:
        parts = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key.startswith("ebt.")}
    lines = [f"- {name}: {ms:.1f} ms" for name, ms in sorted(parts.items(), key=lambda kv: -kv[1])]
    head = (f"## profile: one EBT S1 step ({path}); wall {wall * 1e3:.1f} ms (under the profiler); "
            f"{'kernel' if cuda else 'CPU'} time per part:\n\n" + "\n".join(lines) + "\n\n")
    if a.json:
        Path(a.json).with_suffix(f".profile_{path}.txt").write_text(head + table)
    return head + table


def phase_times(trace_path) -> dict:
    """Kernel milliseconds per named part (ebt.*) in a Chrome trace: a kernel belongs to the innermost
    part open on the thread that launched it, else to "(backward, autograd's thread)" or "(other)"."""
    ev = json.loads(Path(trace_path).read_text())["traceEvents"]
    spans = [e for e in ev if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e["name"].startswith("ebt.")]
    launches = {e["args"]["correlation"]: e for e in ev if e.get("ph") == "X"
                and e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    main = spans[0]["tid"] if spans else None
    out: dict = {}
    for k in ev:
        if k.get("ph") != "X" or k.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        r = launches.get(k.get("args", {}).get("correlation"))
        inside = [p for p in spans if r and p["tid"] == r["tid"] and p["ts"] <= r["ts"] <= p["ts"] + p["dur"]]
        name = (min(inside, key=lambda p: p["dur"])["name"] if inside
                else "(backward, autograd's thread)" if r and r["tid"] != main else "(other)")
        out[name] = out.get(name, 0.0) + k["dur"] / 1e3
    out["all kernels"] = sum(out.values())
    return out


def profile_generation(a, dev, batch=1, tokens=16):
    """Where greedy decoding (graph_compiled: the decode step captured as a CUDA graph, the written-out
    gradient compiled) spends device time: kernels per token, by name."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ebt.runtime import autocast
    from ebt.generate import GenerateConfig, generate
    from ebt.think import ThinkConfig

    model = build("ebt", "s2", a.sizes[0], a.vocab, a.prompt + a.new_tokens, dev).eval()
    prompts = torch.randint(0, a.vocab, (batch, a.prompt)).tolist()
    cfg = GenerateConfig(max_new_tokens=tokens, think=ThinkConfig(steps=2, score_final=False, noise=0.0),
                         cuda_graph=dev.type == "cuda", compile=True)
    with autocast(dev, a.precision):
        generate(model, prompts, cfg)
        _sync(dev)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            generate(model, prompts, cfg)
            _sync(dev)
            wall = time.perf_counter() - t
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90)
    head = f"## profile: generation, batch {batch}, {tokens} new tokens (graph_compiled); wall {wall * 1e3:.1f} ms\n"
    if a.json:
        Path(a.json).with_suffix(f".profile_gen_b{batch}.txt").write_text(head + table)
        if dev.type == "cuda":
            prof.export_chrome_trace(str(Path(a.json).with_suffix(f".trace_gen_b{batch}.json")))
    return head + table


def load_compile_cache(path):
    """--compile-cache: torch.compile's portable cache (Mega-Cache: inductor, AOTAutograd and Triton
    artifacts) from one file, so a fresh machine skips most cold compilation (a device call's minutes).
    Measured on CPU: the first compiled 4xs S1 step 46 s cold, 30 s with the file loaded."""
    import torch

    if path and Path(path).is_file():
        info = torch.compiler.load_cache_artifacts(Path(path).read_bytes())
        n = sum(len(v) for v in info.artifacts.values()) if info is not None else 0
        print(f"# compile cache: {n} artifacts loaded from {path}", file=sys.stderr, flush=True)


def save_compile_cache(path):
    """Write every compile artifact this process made or loaded to path (atomically): a process that
    compiled in itself saves; on CPU the items run in their own processes, which only load."""
    import torch

    art = torch.compiler.save_cache_artifacts() if path else None
    if art is not None:
        tmp = Path(f"{path}.tmp")
        tmp.write_bytes(art[0])
        tmp.replace(path)


RUNNERS = {"train": train_item, "think": think_item, "generate": gen_item, "check": check_item}


def plan(a, dev):
    """Items in order of importance (a time budget cuts the tail): the device check, training at the
    first size, thinking, generation, the larger sizes, then the compiled Transformer++ (slow to build)."""
    first, rest = a.sizes[0], a.sizes[1:]
    items = [{"section": "check"}] if dev.type == "cuda" else []
    graph_paths = ["graph"] + (["graph_compiled"] if "compiled" in a.methods else []) if dev.type == "cuda" else []

    def training(size, recipes):
        out = [{"section": "train", "kind": "transformer", "size": size, "path": "eager"}]
        for rec, variant in recipes:
            graph = graph_paths if rec == "s1" else []  # S2's graphs: at the end (below)
            for path in [*a.methods, *graph, "official"]:
                out.append({"section": "train", "kind": "ebt", "recipe": rec, "variant": variant, "size": size,
                            "path": path})
        return out

    items += training(first, [("s1", None), ("s1", "default"), ("s2", None)])
    for steps in a.think_steps:
        paths = ["fast", "graph"] if dev.type == "cuda" else ["fast"]
        if "compiled" in a.methods:
            paths += ["compiled", "graph_compiled"] if dev.type == "cuda" else ["compiled"]
        for path in paths + ["official"]:
            items.append({"section": "think", "size": first, "steps": steps, "path": path})
    for b in a.gen_batch:
        paths = ["fast"] + (["compiled"] if "compiled" in a.methods and dev.type == "cpu" else []) + ["official"]
        items += [{"section": "generate", "size": first, "batch": b, "path": path} for path in paths]
    if dev.type == "cuda" and "compiled" in a.methods:  # the fastest decoding (captured on every device call so far)
        items += [{"section": "generate", "size": first, "batch": b, "path": "graph_compiled"} for b in a.gen_batch]
    for size in rest:
        items += training(size, [("s1", None)])
    if dev.type == "cuda":  # a failed graph capture can spoil the CUDA context: these come last
        # System 2 captured (one graph per step count; not yet run on a GPU), then the compiled baseline
        items += [{"section": "train", "kind": "ebt", "recipe": "s2", "variant": None, "size": first, "path": path}
                  for path in graph_paths]
        items.append({"section": "train", "kind": "transformer", "size": first, "path": "compiled"})
        items += [{"section": "generate", "size": first, "batch": b, "path": "cuda_graph"} for b in a.gen_batch]
        items += [{"section": "train", "kind": "transformer", "size": s, "path": "compiled"} for s in rest]
    return items


def run_item(it, a, dev):
    import torch

    try:
        return RUNNERS[it["section"]](it, a, dev)
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e).splitlines()[0][:120]}"}
    except Exception as e:  # one failing item must not lose the others' figures
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def label(it):
    if it["section"] == "train":
        name = it["kind"] if it["kind"] == "transformer" else f"ebt {it['recipe']}" + (
            f" {it['variant']}" if it.get("variant") else "")
        return f"{name} {it['size']}"
    if it["section"] == "think":
        return f"{it['steps']} steps"
    if it["section"] == "generate":
        return f"batch {it['batch']}"
    return "check"


def report(results, a):
    lines = []
    for section, unit in (("train", "tokens/s"), ("think", "tokens/s"), ("generate", "tokens/s")):
        rows = [r for r in results if r["section"] == section]
        if not rows:
            continue
        lines.append(f"\n## {section}\n\n| what | path | {unit} | ms | peak GiB | vs straightforward |\n|---|---|---|---|---|---|")
        for r in rows:
            ref = next((x for x in rows if label(x) == label(r) and x["path"] == "official"
                        and "tokens_per_s" in x), None)
            if "error" in r:
                lines.append(f"| {label(r)} | {r['path']} | {r['error']} | | | |")
                continue
            ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
            ms = f"{r['ms']:.1f}" if "ms" in r else "-"
            if "marginal_tokens_per_s" in r:  # generation: the whole call, then its per-token rate and fixed part
                ms = (f"{1e3 * r['batch'] / r['marginal_tokens_per_s']:.2f} / token ({r['marginal_tokens_per_s']:,.0f} "
                      f"tokens/s) + {r['fixed_ms']:.0f} fixed")
            reserved = f" ({r['reserved_gib']:.2f} reserved)" if r.get("reserved_gib") else ""
            lines.append(f"| {label(r)} | {r['path']} | {r['tokens_per_s']:,.0f} | {ms} | {r['peak_gib']:.2f}{reserved} | {ratio} |")
    for r in results:
        if r["section"] == "check":
            lines.append("\n## float64 gradients on the device, max relative error against the full graph\n")
            lines += [f"- {k}: {v:.2e}" if isinstance(v, float) else f"- {k}: {v}"
                      for k, v in r.items() if k not in ("section", "error")]
            if "error" in r:
                lines.append(f"- error: {r['error']}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--paper", action="store_true", help="the paper config: sizes xxs small, V 50277, S 256, B 32")
    p.add_argument("--sizes", nargs="+", default=["4xs"])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per item")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="auto", help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--methods", nargs="+", help="fast EBT gradient methods (explicit, compiled, double, jvp; "
                   "default: what ebt train takes without and with --compile, explicit and compiled on CPU, "
                   "double and compiled on CUDA)")
    p.add_argument("--think-steps", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--think-reps", type=int, default=3)
    p.add_argument("--gen-batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--official-gen-tokens", type=int, default=96,
                   help="new tokens for the (slow) straightforward generation")
    p.add_argument("--only", nargs="+", choices=list(RUNNERS), help="run only these sections")
    p.add_argument("--match", nargs="+", help="run only items whose 'section label path' contains one of these")
    p.add_argument("--profile", nargs="*", metavar="PATH",
                   help="also profile one EBT S1 training step per path (double, jvp, explicit, compiled; "
                        "none named: double)")
    p.add_argument("--profile-generate", type=int, nargs="*", metavar="BATCH",
                   help="also profile compiled greedy decoding at these batch sizes (none named: 1)")
    p.add_argument("--budget-s", type=float, default=0, help="skip the remaining items after this many seconds")
    p.add_argument("--compile-cache", metavar="FILE",
                   help="load torch.compile's artifacts from FILE if it exists, and (where the items run in this "
                        "process: CUDA, and --profile) write every artifact back after each item: carry it to a "
                        "fresh machine to skip most cold compilation")
    p.add_argument("--json", help="write every result here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one item (JSON), in its own process
    a = p.parse_args()
    if a.paper:
        a.sizes, a.vocab, a.context, a.batch = ["xxs", "small"], 50277, 256, 32
        a.new_tokens, a.steps, a.warmup, a.think_reps = 224, 5, 3, 3
    import torch

    from ebt.fast.plan import auto_grad_method

    dev = torch.device(a.device)
    a.methods = a.methods or [auto_grad_method(dev, compiled=False), "compiled"]  # ebt train's "auto"
    load_compile_cache(a.compile_cache)
    if a.one:
        print(json.dumps(run_item(json.loads(a.one), a, dev)))
        return
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    head = (f"# {time.strftime('%Y-%m-%d %H:%M')} | {gpu} | torch {torch.__version__} | threads "
            f"{torch.get_num_threads()} | sizes {' '.join(a.sizes)} V {a.vocab} S {a.context} B {a.batch} | "
            f"precision {a.precision}")
    print(head, flush=True)
    results, t0 = [], time.perf_counter()
    for it in plan(a, dev):
        if a.only and it["section"] not in a.only:
            continue
        if a.match and not any(m in f"{it['section']} {label(it)} {it.get('path', '')}" for m in a.match):
            continue
        if a.budget_s and time.perf_counter() - t0 > a.budget_s:
            res = {"error": "skipped (time budget)"}
        elif dev.type == "cpu":  # a fresh process per item: peak RSS belongs to that item alone
            cmd = [sys.executable, __file__, "--one", json.dumps(it)] + [x for x in sys.argv[1:]]
            r = subprocess.run(cmd, capture_output=True, text=True)
            res = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-300:]}
        else:
            res = run_item(it, a, dev)
            save_compile_cache(a.compile_cache)
        results.append({**it, **res})
        print(json.dumps(results[-1]), flush=True)
    for path in (a.profile or ["double"]) if a.profile is not None else []:
        print(profile_step(a, dev, path), flush=True)
        save_compile_cache(a.compile_cache)
    for b in (a.profile_generate or [1]) if a.profile_generate is not None else []:
        print(profile_generation(a, dev, b), flush=True)
        save_compile_cache(a.compile_cache)
    text = report(results, a)
    print(head + "\n" + text)
    if a.json:
        Path(a.json).write_text(json.dumps({"header": head, "args": vars(a), "results": results}, indent=1))


if __name__ == "__main__":
    main()
