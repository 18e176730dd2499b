"""Claim 2 (the paper's Fig. 6a, 6b and 7): thinking longer (more energy-descent steps) lowers an S2 EBT's
perplexity, more out of distribution, more after more training, and more the farther the data lies from
training. Control: the default steps' logits at the best temperature of a grid (temperature scaling alone).

The shared S2 trainings (ebt.paper.lm.shared_series) think at every snapshot on validation windows, on the
held-out source and on the generated reasoning sets (ebt.data.reasoning), x1, x2 and x4 the default steps,
from the same seeded starts and Langevin noise (the official inference: the trained std before every step).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ebt.demo import CAP, FACTORS, ood_advantage, relative_change, thinking_gain
from ebt.errors import ConfigError
from ebt.paper.common import Claim, Result, Row, bootstrap, fmt_interval, table
from ebt.paper.lm import (LM_SCALES, all_of, eval_key, lm_budget, points, pooled, shared_series,
                          shown, split_label, split_windows, target_mask, temperature_nll, text_data,
                          token_nll, window_nll)

CLAIM = Claim("thinking", "Thinking longer helps more out of distribution and more with more training",
              "Fig. 6a, 6b, 7 (S2 thinking, OOD)")

# windows: evaluation windows per split; eval_batch: windows thought about at once (memory: eval_batch x S x
# V logits); reasoning_n: documents per generated reasoning set. cpu: 4 splits x 3 snapshots x 3 seeds, one
# 8-step run per window (times: benchmarks/RESULTS.md)
EXTRA = {"tiny": dict(windows=8, eval_batch=8, reasoning_n=40),
         "cpu": dict(windows=96, eval_batch=16, reasoning_n=1000),
         "paper": dict(windows=1024, eval_batch=16, reasoning_n=2000)}
SCALES = {name: {**LM_SCALES[name], **EXTRA[name]} for name in LM_SCALES}

# the control's grid (1.0: no change), both sides of 1: the best may sharpen as well as flatten
TEMPERATURES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)


# -------------------------------------------------------------------------------------- evaluation

class Tap:
    """A thinking step (ebt.think.Step) that shows the candidate after the chosen step counts to see(k, z)
    before the loop goes on (a recycling step may reuse z's memory afterwards)."""

    def __init__(self, inner, see, at):
        self.inner, self.see, self.at, self.k = inner, see, set(at), 0

    def __getattr__(self, name):  # start, context, score, pool: the wrapped step's
        return getattr(self.inner, name)

    def __call__(self, ctx, z, alpha):
        z_next, E = self.inner(ctx, z, alpha)
        self.k += 1
        if self.k in self.at:
            self.see(self.k, z_next)
        return z_next, E


@torch.no_grad()
def thinking_nll(model, windows: torch.Tensor, seed: int = 0, factors=FACTORS, temperatures=TEMPERATURES,
                 batch: int = 16) -> dict:
    """ebt.demo.thinking_runs' per-window NLL at `factors` x the default steps, from one run of the longest
    per batch of windows: from the same seeded starts and noise a shorter run is the longer one's first steps
    (one landscape), so each count's NLL is read on the way and the unused final scoring is skipped. Also the
    NLL of the default steps' logits divided by each temperature (the control). Batch i is seeded
    1000 * seed + i."""
    from ebt.fast.plan import resolve_plan
    from ebt.recipe import inference_schedule, inference_steps
    from ebt.runtime import seeded
    from ebt.think import ThinkConfig, think

    e, dev = model.cfg.ebt, windows.device
    base = inference_steps(e)
    sched = {f: inference_schedule(e, base * f) for f in factors}
    longest = sched[max(factors)]
    if any(longest[:len(v)] != v for v in sched.values()):
        raise ConfigError("thinking_nll reads shorter runs off the longest one: it needs an EBT whose step "
                          "schedules are prefixes of each other (one landscape, as S2)")
    at = {len(v): f for f, v in sched.items()}
    cfg = ThinkConfig(steps=base * max(factors), score_final=False)
    plan = resolve_plan(model, dev)
    nll, temp, tokens = {f: [] for f in factors}, {t: [] for t in temperatures}, []
    for i, chunk in enumerate(windows.split(batch)):
        targets = chunk[:, 1:]
        mask = target_mask(targets, model.cfg.pad_token_id)

        def see(k, z):
            nll[at[k]].append(window_nll(z, targets, mask))
            if at[k] == factors[0]:
                for t in temperatures:
                    temp[t].append(nll[at[k]][-1] if t == 1 else temperature_nll(z, targets, mask, t))

        with seeded(1000 * seed + i, dev):
            think(model, chunk[:, :-1], cfg, step=Tap(plan.think_step(model, cfg), see, at))
        tokens.append(mask.sum(1).double().cpu())
    return {"steps": {f: len(v) for f, v in sched.items()}, "nll": {f: torch.cat(v) for f, v in nll.items()},
            "tokens": torch.cat(tokens), "temperature": {t: torch.cat(v) for t, v in temp.items()}}


def evaluate_snapshot(ctx, s: dict, path: Path, windows: dict, seed: int) -> dict:
    """thinking_nll on every split at one snapshot (cached): {split: its runs, in JSON}."""
    def compute():
        from ebt.models import load_model

        model = load_model(path, device=ctx.device).eval()
        out = {}
        for name, w in windows.items():
            r = thinking_nll(model, w.to(ctx.device), seed, batch=s["eval_batch"])
            out[name] = {"steps": {str(f): n for f, n in r["steps"].items()}, "tokens": r["tokens"].tolist(),
                         "nll": {str(f): v.tolist() for f, v in r["nll"].items()},
                         "temperature": {str(t): v.tolist() for t, v in r["temperature"].items()}}
        return out

    key = eval_key(path, {n: len(w) for n, w in windows.items()}, s["reasoning_n"], seed, TEMPERATURES)
    return ctx.cached(f"think-s{seed}-{path.name}-{key}", compute)


def as_runs(d: dict) -> dict:
    """A cached split's runs back as thinking_runs' tensors (the keys of ebt.demo.thinking_gain)."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    return {"steps": {int(f): n for f, n in d["steps"].items()}, "tokens": t(d["tokens"]),
            "nll": {int(f): t(v) for f, v in d["nll"].items()},
            "temperature": {float(k): t(v) for k, v in d["temperature"].items()}}


def shifts(ctx, s: dict, path: Path, windows: dict, seed: int) -> dict:
    """Distribution shift per split (cached): the Transformer++'s log-perplexity there minus on validation."""
    def compute():
        from ebt.models import load_model

        model = load_model(path, device=ctx.device).eval()
        loss = {}
        for name, w in windows.items():
            nll, mask = token_nll(model, w.to(ctx.device), s["eval_batch"])
            loss[name] = float((nll * mask).sum() / mask.sum())
        return {"loss": loss}

    key = eval_key(path, {n: len(w) for n, w in windows.items()}, s["reasoning_n"])
    loss = ctx.cached(f"shift-s{seed}-{path.name}-{key}", compute)["loss"]
    return {n: loss[n] - loss["val"] for n in windows}


# -------------------------------------------------------------------------------------- statistics

def temperature_change(runs: dict, i=slice(None)) -> float:
    """The control's relative perplexity change: the default steps' logits at the grid's best temperature for
    windows i (chosen on those windows themselves: an optimistic control) against temperature 1."""
    best = min(float(v[i].sum()) for v in runs["temperature"].values())
    return math.expm1(min((best - float(runs["nll"][1][i].sum())) / float(runs["tokens"][i].sum()), CAP))


def best_temperature(runs: dict) -> float:
    return min(runs["temperature"], key=lambda t: float(runs["temperature"][t].sum()))


def slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y on x (nan when x does not vary)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx if sxx > 0 else float("nan")


def shift_slope(runs: dict, shift: dict, top: int, idx=None) -> float:
    """Fig. 7 for one seed: the slope of each split's change at `top` x the steps against its shift
    (idx: the windows of each split, default all)."""
    names = list(runs)
    idx = idx or [slice(None)] * len(names)
    return slope([shift[n] for n in names], [relative_change(runs[n], top, i) for n, i in zip(names, idx)])


def seed_statistics(runs: dict, shift: dict, steps: list[int]) -> dict:
    """One seed: per snapshot and split the perplexities and changes (bootstrap over windows), the control,
    and at the last snapshot the OOD advantage, the training gain and the Fig. 7 slope."""
    top, first, last = FACTORS[-1], steps[0], steps[-1]
    out = {"snapshots": {}, "shift": shift}
    for step in steps:
        out["snapshots"][str(step)] = snap = {}
        for n, r in runs[step].items():
            gains = {str(f): thinking_gain(r, f) for f in FACTORS[1:]}
            t_lo, t_hi = bootstrap(lambda i: temperature_change(r, i), r["tokens"].numel())
            snap[n] = {"ppl": {str(f): math.exp(min(float(r["nll"][f].sum() / r["tokens"].sum()), CAP))
                               for f in FACTORS},
                       "change": {f: {"point": g["change"], "interval": list(g["interval"])}
                                  for f, g in gains.items()},
                       "temperature": {"point": temperature_change(r), "interval": [t_lo, t_hi],
                                       "best": best_temperature(r)}}
    end, start = runs[last], runs[first]
    out["advantage"] = {}
    for n in end:
        if n != "val":
            a = ood_advantage(end["val"], end[n], top)
            out["advantage"][n] = {"point": a["difference"], "interval": list(a["interval"])}
    out["training"] = {}
    for n in end:
        d = lambda i: relative_change(end[n], top, i) - relative_change(start[n], top, i)
        out["training"][n] = {"point": d(slice(None)),
                              "interval": list(bootstrap(d, end[n]["tokens"].numel()))}
    sizes = [end[n]["tokens"].numel() for n in end]
    out["slope"] = {"point": shift_slope(end, shift, top),
                    "interval": list(bootstrap(lambda *idx: shift_slope(end, shift, top, list(idx)), *sizes))}
    return out


def pooled_statistics(per_seed: dict, steps: list[int], names: list[str]) -> dict:
    """Across seeds (mean, t interval, verdict): each snapshot's changes and the control's, and at the last
    snapshot the OOD advantage, the training gain, the slope and thinking's change beyond the control's."""
    seeds, top, last = list(per_seed), str(FACTORS[-1]), str(steps[-1])
    snap = lambda x, step, n: per_seed[x]["snapshots"][str(step)][n]
    over = lambda get: pooled([get(x) for x in seeds])
    change = lambda x, n: snap(x, last, n)["change"][top]["point"]
    temp = lambda x, n: snap(x, last, n)["temperature"]["point"]
    cell = lambda step, n: {
        **{f"x{f}": over(lambda x: snap(x, step, n)["change"][str(f)]["point"]) for f in FACTORS[1:]},
        "temperature": over(lambda x: snap(x, step, n)["temperature"]["point"])}
    out = {"snapshots": {str(step): {n: cell(step, n) for n in names} for step in steps}}
    ood = [n for n in names if n != "val"]
    out["advantage"] = {n: over(lambda x: per_seed[x]["advantage"][n]["point"]) for n in ood}
    out["training"] = {n: over(lambda x: per_seed[x]["training"][n]["point"]) for n in names}
    out["slope"] = over(lambda x: per_seed[x]["slope"]["point"])
    out["beyond_temperature"] = {n: over(lambda x: change(x, n) - temp(x, n)) for n in names}
    out["temperature_advantage"] = {n: over(lambda x: temp(x, n) - temp(x, "val")) for n in ood}
    out["advantage_beyond_temperature"] = {
        n: over(lambda x: per_seed[x]["advantage"][n]["point"] - (temp(x, n) - temp(x, "val"))) for n in ood}
    return out


# ------------------------------------------------------------------------------------------- report

def claim_rows(p: dict, labels: dict, steps: list[int], counts: dict, cost: str) -> list[Row]:
    """The claim, then each finding and the controls, from the pooled statistics."""
    top, last, first = FACTORS[-1], str(steps[-1]), str(steps[0])
    g, base, long = p["snapshots"][last], counts[1], counts[top]
    ood = [n for n in labels if n != "val"]
    adv, trained = p["advantage"]["ood"], p["training"]["ood"]
    rows = [Row(f"Thinking {long} steps instead of the default {base} lowers perplexity on {labels['ood']} "
                f"(snapshot {last}), more than in-domain, and more than at snapshot {first}",
                f"{shown(g['ood'][f'x{top}'])}; OOD minus in-domain {shown(adv, points)}; last minus first "
                f"snapshot {shown(trained, points)}",
                all_of([g["ood"][f"x{top}"]["verdict"], adv["verdict"], trained["verdict"]]), cost)]
    for n in labels:
        c = g[n][f"x{top}"]
        rows.append(Row(f"Thinking {long} steps instead of {base}: perplexity change on {labels[n]} "
                        f"(Fig. 6a, snapshot {last})", shown(c), c["verdict"], cost))
    for n in ood:
        a = p["advantage"][n]
        rows.append(Row(f"More gain on {labels[n]} than in-domain (its change minus validation's; a gain "
                        f"there too)", shown(a, points), all_of([a["verdict"], g[n][f"x{top}"]["verdict"]]),
                        cost))
    for n in ("val", "ood"):
        t = p["training"][n]
        rows.append(Row(f"More gain after more training on {labels[n]} (Fig. 6b: change at snapshot {last} "
                        f"minus at {first})", shown(t, points), t["verdict"], cost))
    sl = p["slope"]
    rows.append(Row(f"Fig. 7: more gain the farther from training (slope of the change at {long} steps on "
                    f"the Transformer++'s log-perplexity shift over {len(labels)} splits)",
                    fmt_interval(100 * sl["mean"], *[100 * v for v in sl["interval"]], "{:+.3g}")
                    + " % per nat", sl["verdict"], cost))
    for n in ("val", "ood"):
        b = p["beyond_temperature"][n]
        rows.append(Row(f"Control, {labels[n]}: thinking's change beyond temperature scaling alone (the "
                        f"default logits at the best temperature: {shown(g[n]['temperature'])})",
                        shown(b, points), b["verdict"], cost))
    b = p["advantage_beyond_temperature"]["ood"]
    rows.append(Row(f"Control: thinking's OOD advantage beyond the best temperature's (whose own is "
                    f"{shown(p['temperature_advantage']['ood'], points)})", shown(b, points), b["verdict"],
                    cost))
    return rows


def _iv(d: dict, scale: float = 100, unit: str = "%") -> str:
    return fmt_interval(scale * d["point"], *[scale * v for v in d["interval"]], "{:+.3g}") + unit


def report_tables(per_seed: dict, p: dict, labels: dict, steps: list[int], counts: dict) -> list[str]:
    """Per snapshot pooled over seeds; per seed with bootstrap intervals; Fig. 7's shifts and slopes."""
    top, last = FACTORS[-1], str(steps[-1])
    f_cols = [f"change at {counts[f]} steps" for f in FACTORS[1:]]
    rows = []
    for step in steps:
        for n in labels:
            ppl = [sum(per_seed[x]["snapshots"][str(step)][n]["ppl"][str(f)] for x in per_seed)
                   / len(per_seed) for f in FACTORS]
            cell = p["snapshots"][str(step)][n]
            rows.append([step, labels[n], *[f"{v:.4g}" for v in ppl],
                         *[shown(cell[f"x{f}"]) for f in FACTORS[1:]], shown(cell["temperature"])])
    one = table(["snapshot", "split", *[f"ppl {counts[f]} steps" for f in FACTORS], *f_cols,
                 f"best temperature, {counts[1]} steps"], rows)
    rows = []
    for x, st in per_seed.items():
        for step in steps:
            for n in labels:
                c = st["snapshots"][str(step)][n]
                rows.append([x, step, labels[n], _iv(c["change"][str(top)]),
                             _iv(c["temperature"]) + f" (T = {c['temperature']['best']:g})"])
    two = table(["seed", "snapshot", "split", f"change at {counts[top]} steps", "best temperature only"],
                rows)
    rows = [[x, labels[n], f"{st['shift'][n]:+.3f}",
             _iv(st["advantage"][n], unit=" pts") if n != "val" else "-", _iv(st["training"][n], unit=" pts"),
             _iv(st["slope"], unit=" %/nat") if n == "val" else ""]
            for x, st in per_seed.items() for n in labels]
    three = table(["seed", "split", "shift (nats)", "minus validation's change", "last minus first snapshot",
                   "Fig. 7 slope (the seed's)"], rows)
    return [f"Perplexity when thinking longer, mean over seeds; changes against {counts[1]} steps with "
            f"their 95% t interval over seeds (Langevin noise as trained, the same starts and noise at every "
            f"count):",
            one, "Per seed (95% bootstrap intervals over windows):", two,
            f"Per seed at snapshot {last}: shift = the Transformer++'s log-perplexity on the split minus on "
            f"validation; the changes at {counts[top]} steps (95% bootstrap over windows):", three]


def bar_values(d: dict, scale: float = 100, clip: float = 1e3) -> tuple[float, list[float]]:
    """A pooled figure for a plot (times scale: percent by default): its mean and error bar (0 where
    undefined), clipped to +-clip (an untrained model's changes reach 1e300)."""
    c = lambda v: min(max(scale * v, -clip), clip)
    m, lo, hi = c(d["mean"]), c(d["interval"][0]), c(d["interval"][1])
    return m, [0.0 if math.isnan(lo) else m - lo, 0.0 if math.isnan(hi) else hi - m]


def draw(path: Path, per_seed: dict, p: dict, labels: dict, steps: list[int], counts: dict) -> Path:
    """Three panels: the change against thinking steps per split (the control dashed), the change at the most
    steps against training, and the change against distribution shift with each seed's fit."""
    from ebt.plots import pyplot, save_figure

    plt = pyplot()
    top, last = FACTORS[-1], str(steps[-1])
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, n in enumerate(labels):
        color = f"C{k}"
        cells = [{"mean": 0.0, "interval": [0.0, 0.0]}] + [p["snapshots"][last][n][f"x{f}"]
                                                           for f in FACTORS[1:]]
        bars = [bar_values(c) for c in cells]
        ax[0].errorbar([counts[f] for f in FACTORS], [b[0] for b in bars],
                       yerr=list(zip(*[b[1] for b in bars])), marker="o", capsize=3, color=color,
                       label=labels[n])
        ax[0].axhline(bar_values(p["snapshots"][last][n]["temperature"])[0], color=color, ls="--", lw=1)
        bars = [bar_values(p["snapshots"][str(st)][n][f"x{top}"]) for st in steps]
        ax[1].errorbar(steps, [b[0] for b in bars], yerr=list(zip(*[b[1] for b in bars])), marker="o",
                       capsize=3, color=color, label=labels[n])
        xs = [per_seed[x]["shift"][n] for x in per_seed]
        ys = [bar_values({"mean": per_seed[x]["snapshots"][last][n]["change"][str(top)]["point"],
                    "interval": [0.0, 0.0]})[0] for x in per_seed]
        ax[2].scatter(xs, ys, color=color, label=labels[n])
    sl = p["slope"]
    slope_text = fmt_interval(100 * sl["mean"], *[100 * v for v in sl["interval"]], "{:+.3g}")
    ax[0].set(xlabel="thinking steps", ylabel="perplexity change (%)",
              title=f"snapshot {last}; dashed: best temperature only")
    ax[1].set(xlabel="training step (snapshot)", ylabel=f"change at {counts[top]} steps (%)",
              title="more training (Fig. 6b)")
    ax[2].set(xlabel="shift: Transformer++ log-ppl minus validation's (nats)",
              ylabel=f"change at {counts[top]} steps (%)",
              title=f"Fig. 7: slope {slope_text} %/nat")
    for a in ax:
        a.axhline(0, color="grey", lw=0.5)
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def run(ctx, s: dict) -> Result:
    ebt, tpp = shared_series(ctx, s, "ebt"), shared_series(ctx, s, "transformer")
    windows = split_windows(ctx, s)
    labels = {n: split_label(n, text_data(ctx)["ood_source"]) for n in windows}
    steps = sorted(next(iter(ebt.values())))
    per_seed, counts = {}, {}
    for seed in ctx.seeds:
        runs = {step: {n: as_runs(r) for n, r in evaluate_snapshot(ctx, s, path, windows, seed).items()}
                for step, path in sorted(ebt[seed].items())}
        shift = shifts(ctx, s, tpp[seed][steps[-1]], windows, seed)
        per_seed[str(seed)] = seed_statistics(runs, shift, steps)
        counts = runs[steps[-1]]["val"]["steps"]
    p = pooled_statistics(per_seed, steps, list(labels))
    rows = claim_rows(p, labels, steps, counts, lm_budget(ctx, s))
    data = {"splits": labels, "windows": {n: len(w) for n, w in windows.items()}, "snapshots": steps,
            "thinking_steps": {str(f): n for f, n in counts.items()}, "temperatures": list(TEMPERATURES),
            "per_seed": per_seed, "pooled": p}
    return Result(rows, report_tables(per_seed, p, labels, steps, counts), data,
                  lambda path: draw(path, per_seed, p, labels, steps, counts))
