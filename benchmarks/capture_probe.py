"""Where System 2's training step fails under a CUDA graph (issue 23): each probe in its own process (a
failed capture spoils the process's CUDA context and random state), all at once, each adding one of
System 2's ingredients to a step that captures (S1's): random draws in two graphs sharing one pool, the
replay buffer's device-side sampling and writing, random step counts (a graph per count), random step
sizes and Langevin noise, truncation, the whole recipe. A probe first runs its step eagerly under
torch.cuda.set_sync_debug_mode("error") (a host synchronisation raises where it happens, with its line),
then captures it through ebt.fast.cuda_graph.CapturedStep and compares the replayed gradients with an eager
step's in float64 where the draws allow (no noise, no random step size).

    python benchmarks/capture_probe.py --json $OUT/capture.json          # CUDA only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# probe -> (recipe, overrides[, capture error mode]); rand_steps=1, rand_steps_min=2: 2 steps, one graph
PROBES = {
    "s1 (captures on the device so far)": ("s1", {}),
    "s2, fixed count, no noise, no replay": ("s2", dict(rand_steps=1, rand_steps_min=2, langevin=0.0,
                                                         alpha_rand_scale=1.0, replay_buffer=0)),
    "s2 + counts (a graph per count)": ("s2", dict(langevin=0.0, alpha_rand_scale=1.0, replay_buffer=0)),
    "s2 + random step size": ("s2", dict(rand_steps=1, rand_steps_min=2, langevin=0.0, replay_buffer=0)),
    "s2 + Langevin noise": ("s2", dict(rand_steps=1, rand_steps_min=2, alpha_rand_scale=1.0,
                                       replay_buffer=0)),
    "s2 + replay buffer": ("s2", dict(rand_steps=1, rand_steps_min=2, langevin=0.0, alpha_rand_scale=1.0,
                                      replay_buffer=4, replay_fraction=1.0)),
    "s2, the whole recipe": ("s2", dict(replay_buffer=4, replay_fraction=1.0)),
    # "thread_local": another thread's unsafe call (autograd's) no longer breaks it: tells whether one does
    "s2, the whole recipe, thread-local capture": ("s2", dict(replay_buffer=4, replay_fraction=1.0),
                                                   "thread_local"),
}
DEVICE, CAPTURE = "cuda", None  # a dry run of the probes' own code: "cpu" and a stand-in capture (tests)
RAW = ("raw: rand + normal_ in two graphs, one pool", "raw: replay buffer sample + push in a graph")


def where(e: BaseException) -> str:
    """The error's first line and the innermost frames in this project."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/ebt/" in f.filename or "benchmarks" in f.filename]
    at = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[::-1][:3])
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''} @ {at}"


def raw_probe(name: str) -> str:
    import torch

    from ebt.fast.cuda_graph import capture_cuda_graphs
    from ebt.models.ebt import ReplayBuffer

    dev = torch.device("cuda")
    if name == RAW[0]:
        fns = [lambda: torch.rand(8, device=dev).argsort() + torch.empty(8, device=dev).normal_()] * 2
        graphs = capture_cuda_graphs(fns, release=True)
        seen = []
        for g, out in graphs * 2:
            g.replay()
            seen.append(out.clone())
        torch.cuda.synchronize()
        return f"ok: replays differ {not torch.equal(seen[0], seen[2])}"
    buf = ReplayBuffer(4)
    buf.push(torch.arange(12, device=dev).view(4, 3), torch.randn(4, 3, 5, device=dev))

    def step():
        w, z = buf.sample(4)
        buf.push(w + 1, z)
        return w

    (g, out), = capture_cuda_graphs([step], release=True)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    return f"ok: cursor {int(buf.cursor)}, window sum {int(buf.windows.sum())}"


def step_probe(name: str) -> str:
    import copy
    from functools import partial

    import torch

    from ebt.config import ModelConfig, recipe
    from ebt.fast.cuda_graph import CapturedStep, capture_cuda_graphs
    from ebt.fast.plan import resolve_plan
    from ebt.models import build_model
    from ebt.objective import train_step

    base, kw, *mode = PROBES[name]
    dev = torch.device(DEVICE)
    torch.manual_seed(0)
    e = recipe(base, init_scale=0.0, **kw)
    m = build_model(ModelConfig(model="ebt", size="4xs", vocab_size=500, context_length=32, ebt=e))
    m = m.to(dev, torch.float64).train()
    me, mg = copy.deepcopy(m), copy.deepcopy(m)
    plan_e, plan_g = (resolve_plan(x, dev, grad="double", energy_gap=True) for x in (me, mg))
    x = torch.randint(0, 500, (4, 33), device=dev)
    sync_debug = torch.cuda.set_sync_debug_mode if dev.type == "cuda" else (lambda mode: None)
    sync_debug("error")  # a synchronisation inside the step raises here, with its line
    try:
        mm = copy.deepcopy(m)
        for _ in range(2):  # the second call replays rows (replay buffer)
            train_step(mm, x, plan=resolve_plan(mm, dev, grad="double", energy_gap=True))
    except Exception as err:  # noqa: BLE001
        return "eager step synchronises: " + where(err)
    finally:
        sync_debug("default")
    exact = e.langevin == 0 and e.alpha_rand_scale == 1
    capture = CAPTURE or (partial(capture_cuda_graphs, error_mode=mode[0]) if mode else None)
    step = CapturedStep(mg, partial(train_step, mg, plan=plan_g), **({"capture": capture} if capture else {}))
    worst = 0.0
    for rep in range(6):
        x = torch.randint(0, 500, (4, 33), device=dev)
        me.zero_grad(set_to_none=True)
        torch.manual_seed(100 + rep)  # the same host-drawn step counts
        train_step(me, x, plan=plan_e)
        torch.manual_seed(100 + rep)
        step(x)
        if exact:
            worst = max(worst, max(float((p.grad - q.grad).norm() / p.grad.norm())
                                   for p, q in zip(me.parameters(), mg.parameters()) if p.grad is not None))
    finite = all(bool(torch.isfinite(q.grad).all()) for q in mg.parameters() if q.grad is not None)
    graphs = sorted(step.graphs, key=str)
    return (f"ok: graphs {graphs}, grads finite {finite}"
            + (f", max rel diff vs eager {worst:.1e}" if exact else " (random draws differ from eager)"))


def probe(name: str) -> str:
    try:
        return raw_probe(name) if name in RAW else step_probe(name)
    except Exception as err:  # noqa: BLE001 (the report is the point)
        return where(err)


def run_all(timeout: float) -> dict:
    def one(name):
        cmd = [sys.executable, __file__, "--one", name]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return name, f"timed out after {timeout:.0f} s"
        lines = r.stdout.strip().splitlines()
        if r.returncode == 0 and lines:
            return name, lines[-1]
        return name, f"exit {r.returncode}: {r.stderr.strip()[-300:]}"

    names = list(RAW) + list(PROBES)
    with ThreadPoolExecutor(len(names)) as ex:
        return dict(ex.map(one, names))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.one:
        print(probe(a.one))
        return
    res = run_all(a.timeout)
    for name, out in res.items():
        print(f"| {name} | {out} |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
