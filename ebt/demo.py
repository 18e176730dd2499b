"""The README's main job: embedded corpus -> a Transformer++ and an EBT (System 2, the thinking recipe)
of the same size on the same batches -> validation and out-of-distribution perplexity side by side ->
what the EBT does that the Transformer++ cannot (phase 5), each claim with its verdict.

Sized to run on a laptop CPU in minutes (the data is built once, finished runs are reused; the README
gives the measured time). At this scale the paper expects the EBT to be behind the Transformer++ (it
overtakes only with far more data), and a behaviour it reports may not show yet: the report prints what
it measures and says which claims hold.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
import time
from pathlib import Path

import torch

from ebt.config import DataConfig, ModelConfig, RunConfig, TrainConfig, recipe, to_dict
from ebt.paper.common import bootstrap

EBT_RECIPE = "s2"  # the thinking recipe (docs/method.md): trained on varying step counts, so more can help
MODELS = {"transformer": "Transformer++", "ebt": f"EBT ({EBT_RECIPE.upper()})"}


def demo_run(model: str, data_dir: str, out_dir: Path, steps: int, vocab_size: int, pad_id: int) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model=model, size="4xs", context_length=64, vocab_size=vocab_size,
                          pad_token_id=pad_id, ebt=recipe(EBT_RECIPE) if model == "ebt" else None),
        data=DataConfig(data_dir=data_dir),
        train=TrainConfig(out_dir=str(out_dir), steps=steps, batch_size=16, warmup_steps=30, eval_every=50,
                          eval_windows=96, eval_batch_size=32, log_every=10, seed=0),
    )


def demo(out: str = "runs/demo", data_dir: str = "data/default", steps: int = 300, windows: int = 32,
         skip_sources: tuple = (), log=print) -> dict:
    """Phases 1-5: data, the two trainings, their perplexities side by side, then what the EBT does
    (`what_the_ebt_does` on `windows` validation and out-of-distribution windows). Returns each
    model's final metrics and the findings ("findings")."""
    from ebt.data.loader import TokenData
    from ebt.data.shards import prepare_dataset

    t0 = time.perf_counter()
    log(f"== 1/5 data: the embedded English corpus in {data_dir} (built once, then reused)")
    prepare_dataset(data_dir, tokenizer="bpe", vocab_size=8192, skip_sources=tuple(skip_sources), log=log)
    probe = TokenData(data_dir, "train", 1)
    ood_source = json.loads((Path(data_dir) / "manifest.json").read_text())["corpus"]["ood_source"]
    times = {"data": time.perf_counter() - t0}
    finals = {}
    for i, (model, name) in enumerate(MODELS.items(), start=2):
        log(f"== {i}/5 training the {name}: size 4xs (2 layers, width 128), {steps} steps of 16 x 64 tokens")
        t = time.perf_counter()
        finals[model], trained = train_once(demo_run(model, data_dir, Path(out) / model, steps,
                                                     probe.vocab_size, probe.pad_id), log)
        times[model] = f"{time.perf_counter() - t:.0f}" if trained else "reused"
    log("== 4/5 report: token-weighted perplexity (lower is better)")
    report_perplexity(finals, ood_source, probe.vocab_size, log)
    log(f"{'training + evaluation time (s)':<34} " + " ".join(f"{times[m]:>15}" for m in MODELS))
    log(f"data: {times['data']:.0f} s. "
        "The paper expects the EBT behind at this scale; it scales faster with data.")
    t = time.perf_counter()
    log("== 5/5 what an EBT does that a Transformer++ cannot (docs/method.md), and whether this one does yet")
    finals["findings"] = run_findings(Path(out) / "ebt", data_dir, ood_source, windows, log)
    log(f"({time.perf_counter() - t:.0f} s; in all {time.perf_counter() - t0:.0f} s)")
    log(f"checkpoints: {Path(out) / 'transformer' / 'checkpoint'} and {Path(out) / 'ebt' / 'checkpoint'}")
    return finals


def train_once(run: RunConfig, log) -> tuple[dict, bool]:
    """Train a run, or reuse it if it finished (or resume it if it was interrupted); a run of another
    model (an older demo's) is trained anew. Returns (final metrics, whether it trained now)."""
    from ebt.checkpoint import find_checkpoint
    from ebt.train import train

    out = Path(run.train.out_dir)
    saved = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None
    if saved is not None and saved.get("model") != json.loads(json.dumps(to_dict(run.model))):
        log(f"   ({out} holds another model: training anew)")
        return train(run, log=log, force=True), True
    done = out / "final_metrics.json"
    if done.exists() and json.loads(done.read_text()).get("step") == run.train.steps:
        log(f"   (already trained: reusing {out})")
        return json.loads(done.read_text()), False
    return train(run, resume=find_checkpoint(out) is not None, log=log), True


def ppl_cell(model: str, step: int, ppl: float, vocab_size: int) -> str:
    """A perplexity for the table; an EBT before training shows "untrained" (see UNTRAINED)."""
    from ebt.evaluate import fmt_ppl

    return "untrained" if model == "ebt" and step == 0 and not ppl <= vocab_size else fmt_ppl(ppl)


UNTRAINED = ("untrained: before training, the EBT's steps (alpha {alpha:g}) on a random energy make large, "
             "confident, wrong\n   logits: perplexity {ppl}, beyond a uniform guess's {V}. It measures "
             "nothing yet; the\n   Transformer++ starts near {V}.")


def report_perplexity(finals: dict, ood_source: str, vocab_size: int, log) -> None:
    """Phase 4: both models' validation perplexity through training, then in-domain and OOD."""
    from ebt.evaluate import fmt_ppl

    steps_seen = [h["step"] for h in finals["transformer"]["history"]]
    log(f"{'step':>6} " + " ".join(f"{MODELS[m]:>15}" for m in MODELS))
    for j, s in enumerate(steps_seen):
        row = []
        for m in MODELS:
            hist = finals[m]["history"]
            logged = j < len(hist) and hist[j]["step"] == s
            row.append(f"{ppl_cell(m, s, hist[j]['ppl'], vocab_size):>15}" if logged else f"{'-':>15}")
        log(f"{s:>6} " + " ".join(row))
    first = finals["ebt"]["history"][0]
    if ppl_cell("ebt", first["step"], first["ppl"], vocab_size) == "untrained":
        log(UNTRAINED.format(alpha=recipe(EBT_RECIPE).alpha, ppl=fmt_ppl(first["ppl"]), V=vocab_size))
    log("")
    log(f"{'':<34} " + " ".join(f"{MODELS[m]:>15}" for m in MODELS))
    log(f"{'in-domain validation perplexity':<34} "
        + " ".join(f"{fmt_ppl(finals[m]['val']['ppl']):>15}" for m in MODELS))
    if all("ood" in finals[m] for m in MODELS):
        log(f"{'out-of-distribution (' + ood_source + ')':<34} "
            + " ".join(f"{fmt_ppl(finals[m]['ood']['ppl']):>15}" for m in MODELS))


def run_findings(run_dir: Path, data_dir: str, ood_source: str, windows: int, log) -> dict:
    """Phase 5 on the trained EBT: `windows` validation and out-of-distribution windows."""
    from ebt.models import load_model
    from ebt.data.loader import TokenData

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(run_dir, device=device).eval()
    S = model.cfg.context_length
    splits = {"validation": windows_of(TokenData(data_dir, "val", S), windows).to(device),
              f"ood ({ood_source})": windows_of(TokenData(data_dir, "ood", S), windows).to(device)}
    return what_the_ebt_does(model, splits, log)


# ------------------------------------------------------------------ phase 5: what the EBT does

FACTORS = (1, 2, 4)  # thinking steps as multiples of the model's default (ebt.recipe.inference_steps)
CAP = 700.0  # exp() of a larger mean NLL overflows: perplexities are capped there (ebt.evaluate)
interval = bootstrap  # 95% percentile bootstrap over windows (ebt.paper.common)


def verdict(point: float, lo: float, hi: float) -> str:
    """The verdict on a figure the claim expects below zero, from its value and 95% interval."""
    if hi < 0:
        return "holds"
    if point < 0:
        return "unclear: the 95% interval includes no change"
    return "does not hold at this size"


def _think(model, tokens, steps: int | None, seed: int):
    from ebt.fast.plan import resolve_plan
    from ebt.runtime import seeded
    from ebt.think import ThinkConfig, think

    cfg = ThinkConfig(steps=steps, trace=True)
    with seeded(seed, tokens.device):
        return think(model, tokens, cfg, step=resolve_plan(model, tokens.device).think_step(model, cfg))


@torch.no_grad()
def thinking_runs(model, windows: torch.Tensor, factors=FACTORS, seed: int = 0, tick=lambda: None) -> dict:
    """Think `factors` x the default steps from the same seeded starts and noise: per window, the summed
    NLL and token count at each factor, its mean final energy at the first, and each step's mean energy
    (steps+1, windows) at the largest."""
    from ebt.recipe import inference_schedule, inference_steps

    tokens, targets = windows[:, :-1], windows[:, 1:]
    pad = model.cfg.pad_token_id
    mask = targets != pad if pad is not None else torch.ones_like(targets, dtype=torch.bool)
    base = inference_steps(model.cfg.ebt)
    nll, trace, energy = {}, None, None
    for f in factors:
        out = _think(model, tokens, base * f, seed)
        logp = torch.log_softmax(out.z.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        nll[f] = -(logp * mask).sum(1).cpu()
        trace = out.trace.double().mean(-1).cpu()
        energy = out.energy.double().mean(1).cpu() if f == factors[0] else energy
        tick()
    total = {f: len(inference_schedule(model.cfg.ebt, base * f)) for f in factors}
    tokens = mask.sum(1).double().cpu()
    return {"steps": total, "nll": nll, "tokens": tokens, "trace": trace, "energy": energy}


def energy_descent(trace: torch.Tensor) -> dict:
    """From each step's mean energy per window (steps+1, windows): the mean trace and the change from the
    first to the final energy, with its interval over windows."""
    change = trace[-1] - trace[0]
    mean = trace.mean(1)
    lo, hi = interval(lambda i: float(change[i].mean()), change.numel())
    return {"trace": mean.tolist(), "change": float(change.mean()), "interval": (lo, hi),
            "every_step": bool((mean[1:] < mean[:-1]).all()),
            "verdict": verdict(float(change.mean()), lo, hi)}


def ppl(runs: dict, factor: int, i=slice(None)) -> float:
    """Token-weighted perplexity of windows i when thinking `factor` x the default steps (capped)."""
    return math.exp(min(float(runs["nll"][factor][i].sum() / runs["tokens"][i].sum()), CAP))


def relative_change(runs: dict, factor: int, i=slice(None)) -> float:
    """Relative perplexity change of windows i from the default steps to `factor` x them."""
    nll, tok = runs["nll"], runs["tokens"][i].sum()
    return math.expm1(min(float((nll[factor][i].sum() - nll[1][i].sum()) / tok), CAP))


def thinking_gain(runs: dict, factor: int) -> dict:
    """The perplexity at `factor` x the default steps and its relative change (negative: thinking helps)."""
    point = relative_change(runs, factor)
    lo, hi = interval(lambda i: relative_change(runs, factor, i), runs["tokens"].numel())
    return {"ppl": ppl(runs, factor), "change": point, "interval": (lo, hi),
            "verdict": verdict(point, lo, hi)}


def ood_advantage(val: dict, ood: dict, factor: int) -> dict:
    """Whether thinking longer helps more out of distribution: the OOD relative change minus the in-domain
    one (windows resampled independently in each split). It holds only where thinking helps OOD at all."""
    point = relative_change(ood, factor) - relative_change(val, factor)
    lo, hi = interval(lambda i, j: relative_change(ood, factor, i) - relative_change(val, factor, j),
                      ood["tokens"].numel(), val["tokens"].numel())
    helps = relative_change(ood, factor) < 0
    return {"difference": point, "interval": (lo, hi),
            "verdict": verdict(point, lo, hi) if helps else "does not hold at this size"}


@torch.no_grad()
def energy_order(model, windows: torch.Tensor, natural: torch.Tensor, seed: int = 0,
                 tick=lambda: None) -> dict:
    """Mean final energy per window of natural text (`natural`, from thinking_runs), the same tokens
    shuffled and uniformly random tokens (drawn as ebt.inspect.window_statistics draws them), thinking the
    default steps from the same seed: the means, and each of natural < shuffled < random with its
    difference, interval and verdict."""
    tokens = windows[:, :-1]
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(tokens.shape[1], generator=g) for _ in range(tokens.shape[0])])
    rand = torch.randint(0, model.cfg.vocab_size, tokens.shape, generator=g).to(tokens.device)
    e = {"natural": natural}
    for name, x in (("shuffled", tokens.gather(1, perm.to(tokens.device))), ("random", rand)):
        e[name] = _think(model, x, None, seed).energy.double().mean(1).cpu()
        tick()
    out = {k: float(v.mean()) for k, v in e.items()}
    for a, b in (("natural", "shuffled"), ("shuffled", "random")):
        d = e[a] - e[b]
        lo, hi = interval(lambda i: float(d[i].mean()), d.numel())
        out[f"{a} < {b}"] = {"difference": float(d.mean()), "interval": (lo, hi),
                             "verdict": verdict(float(d.mean()), lo, hi)}
    return out


def _pct(x: float) -> str:
    """A relative change as a percentage; beyond +-100x (untrained models) as a ratio."""
    return f"{100 * x:+.1f}%" if abs(x) < 100 else f"x{x + 1:.2g}"


def _points(x: float) -> str:
    return f"{100 * x:+.1f}" if abs(x) < 100 else f"{100 * x:+.2g}"


def _num(x: float) -> str:
    return f"{x:+.3g}"


def _span(iv, fmt=_pct) -> str:
    return f"[{fmt(iv[0])}, {fmt(iv[1])}]"


def windows_of(data, n: int) -> torch.Tensor:
    """n windows spread evenly over a split (TokenData.eval_batches), the same on every run."""
    return torch.cat(list(data.eval_batches(n, max_windows=n)))


def what_the_ebt_does(model, splits: dict, log=print) -> dict:
    """Phase 5: on each split's windows ({name: windows}, the first in-domain), (a) the energy across
    thinking steps, (b) natural < shuffled < random energy on the first split, (c) perplexity when thinking
    FACTORS x the default steps, and whether the gain is larger on the others (out of distribution).
    Logs each finding with its verdict; returns {finding: its figures and verdict}."""
    from tqdm.auto import tqdm

    names = list(splits)
    bar = tqdm(total=len(names) * len(FACTORS) + 2, desc="what the EBT does", leave=False,
               disable=not sys.stderr.isatty())  # on a terminal; a log gets only the findings
    tick = lambda: bar.update(1)
    runs = {name: thinking_runs(model.eval(), splits[name], tick=tick) for name in names}
    order = energy_order(model, splits[names[0]], runs[names[0]]["energy"], tick=tick)
    bar.close()
    log(f"   on {' and '.join(f'{len(w)} {k}' for k, w in splits.items())} windows of "
        f"{splits[names[0]].shape[1] - 1} tokens, seeded starts and noise;")
    log("   [a, b]: a 95% bootstrap interval over the windows; a claim holds when it excludes no change")
    found = _log_descent(model, runs, log)
    log("(b) natural text has lower energy than the same tokens shuffled, and those than random tokens")
    log(f"    ({names[0]}; mean final energy after the default {runs[names[0]]['steps'][1]} steps)")
    for a, b in (("natural", "shuffled"), ("shuffled", "random")):
        o = found[f"(b) {a} < {b}"] = order[f"{a} < {b}"]
        log(f"    {a} {order[a]:.4g} < {b} {order[b]:.4g}: {o['difference']:+.3g} "
            f"{_span(o['interval'], _num)}  {o['verdict']}")
    found.update(_log_gains(runs, log))
    held = [k for k, v in found.items() if v["verdict"] == "holds"]
    log(textwrap.fill("shown at this size: " + ("; ".join(held) or "none"), 108, initial_indent="   ",
                      subsequent_indent="     "))
    log(textwrap.fill("not shown (yet) at this size: " + ("; ".join(k for k in found if k not in held)
                                                          or "none"), 108, initial_indent="   ",
                      subsequent_indent="     "))
    return found


def _log_descent(model, runs: dict, log) -> dict:
    """(a): each split's mean energy at every step of the longest thinking, and its verdict."""
    steps, top, e = next(iter(runs.values()))["steps"], FACTORS[-1], model.cfg.ebt
    where = f", {steps[top] // e.landscapes} on each of {e.landscapes} landscapes" if e.landscapes > 1 else ""
    noise = f"; Langevin noise std {e.langevin:g} before each step, as trained" if e.langevin else ""
    log(f"(a) the energy falls while thinking: mean energy from the random start through {steps[top]} steps")
    log(f"    ({top}x the default{where}{noise}; the last unnoised), and its change")
    out = {}
    for name, r in runs.items():
        d = out[f"(a) energy falls on {name}"] = energy_descent(r["trace"])
        shape = "" if d["every_step"] else " (not every step)"
        log(f"    {name:<16} " + " ".join(f"{x:.3g}" for x in d["trace"])
            + f"  {d['change']:+.3g} {_span(d['interval'], _num)}{shape}  {d['verdict']}")
    log("    (descent lowers any energy, an untrained model's too; (c) says whether it helps predictions)")
    return out


def _log_gains(runs: dict, log) -> dict:
    """(c): perplexity at FACTORS x the default steps per split, and the out-of-distribution advantage."""
    from ebt.evaluate import fmt_ppl

    names = list(runs)
    steps, top = runs[names[0]]["steps"], FACTORS[-1]
    log("(c) thinking longer lowers perplexity, and more so out of distribution")
    log(f"    (the default is {steps[1]} steps; every count from the same starts and noise)")
    out = {}
    for name in names:
        base = ppl(runs[name], 1)
        for f in FACTORS[1:]:
            g = out[f"(c) {steps[f]} steps lower perplexity on {name}"] = thinking_gain(runs[name], f)
            log(f"    {name:<16} {steps[1]} -> {steps[f]} steps: {fmt_ppl(base)} -> {fmt_ppl(g['ppl'])}, "
                f"{_pct(g['change'])} {_span(g['interval'])}  {g['verdict']}")
    for name in names[1:]:
        a = out[f"(c) more gain on {name}"] = ood_advantage(runs[names[0]], runs[name], top)
        log(f"    {steps[top]} steps, {name}'s change minus {names[0]}'s: {_points(a['difference'])} points "
            f"{_span(a['interval'], _points)}  {a['verdict']}")
    return out
