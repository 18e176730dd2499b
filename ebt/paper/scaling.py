"""Claim 1 (scaling rate): the EBT's validation loss falls faster than the Transformer++'s, along data and
along model size (paper Fig. 4-5; the S1 recipe, docs/method.md 2.4).

Both models train on the same batches, per seed, at a few sizes (layers x width x heads). Data axis: the
largest size's validation loss at several points of one run (its eval history, the schedule the whole
run's), fitted from `start` of the run on, past the EBT's initial transient. Size axis: the final loss of
each size at the same tokens, against non-embedding parameters and against training FLOPs. Per seed and
model, a log-log slope (ebt.scale.fit_loglog); per seed, the paper's scaling rate |slope_EBT| / |slope_T++|
- 1, with a t interval over seeds (ebt.scale.rate_with_ci). The verdict is that interval's (expected above
0); where some slope is not negative the rate means nothing, and the signed slope difference decides.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ebt.config import SIZES, recipe
from ebt.errors import ConfigError
from ebt.paper.common import (Claim, Context, Result, Row, budget, fmt_interval, pooled_verdict, seed_interval,
                              table, train_cached, verdict)
from ebt.paper.lm import lm_run

CLAIM = Claim("scaling", "The EBT scales faster than the Transformer++: its validation loss falls more "
                         "steeply with training tokens and with parameters (scaling rate > 0)",
              "Fig. 4-5 (Sec. 5.1: data, parameters, FLOPs)")

MODELS = ("transformer", "ebt")
LABELS = {"transformer": "Transformer++", "ebt": "EBT (S1)"}

# sizes: LAYERSxWIDTHxHEADS or a SIZES name, smallest first; the last is the data axis's model. eval_every:
# the data axis's points; start: the fraction of the run the data-axis fit starts at (the EBT's transient).
# cpu: 18 trainings (3 sizes x 2 models x 3 seeds) of 300 steps of 16 x 64 tokens (times:
# benchmarks/RESULTS.md); paper: the registry sizes 4xs..xs at the shared text runs' budget, for a GPU
# cluster.
SCALES = {
    "tiny": dict(size="4xs", sizes=["1x16x2", "1x32x2"], context=16, batch=4, steps=8, warmup=2, eval_every=2,
                 eval_windows=8, start=0.25, seeds=2),
    "cpu": dict(size="4xs", sizes=["2x32x2", "2x64x2", "2x128x2"], context=64, batch=16, steps=300, warmup=30,
                eval_every=30, eval_windows=64, start=0.25, seeds=3),
    "paper": dict(size="xxs", sizes=["4xs", "3xs", "xxs", "xs"], context=256, batch=256, steps=1_000_000,
                  warmup=10_000, eval_every=50_000, eval_windows=1024, start=0.25, seeds=3),
}


# ------------------------------------------------------------------------------------------- trainings

def size_scale(s: dict, value: str) -> dict:
    """The scale `s` at one size: a SIZES name, or LAYERSxWIDTHxHEADS on the scale's base size."""
    if value in SIZES:
        return {**s, "size": value, "n_layer": None, "d_model": None, "n_head": None}
    try:
        n_layer, d_model, n_head = (int(x) for x in value.lower().split("x"))
    except ValueError:
        raise ConfigError(f"size {value!r} is neither a named size nor LAYERSxWIDTHxHEADS") from None
    return {**s, "n_layer": n_layer, "d_model": d_model, "n_head": n_head}


def scaling_run(ctx: Context, s: dict, model: str, value: str, seed: int):
    """One training: `model` (the EBT with the S1 recipe, as the paper's scaling runs) at size `value`,
    evaluated every `eval_every` steps and saved at its end only (its evaluations would save each time)."""
    return lm_run(ctx, size_scale(s, value), model, seed, ebt=recipe("s1") if model == "ebt" else None,
                  save_every=s["steps"])


def val_history(folder: Path) -> dict[int, float]:
    """{step: validation loss} from a run's metrics.jsonl (which, unlike final_metrics, survives resumes)."""
    out = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "val":
            out[int(row["step"])] = float(row["loss"])
    return out


def train_all(ctx: Context, s: dict) -> dict:
    """Every training of the claim: {model: {size: {"params", "flops_per_token", "tokens_per_step",
    "seeds": {seed: {step: val loss}}}}}."""
    from ebt.flops import non_embedding_params, train_flops_per_token

    out = {}
    for model in MODELS:
        out[model] = {}
        for value in s["sizes"]:
            run = scaling_run(ctx, s, model, value, ctx.seeds[0])
            row = {"params": non_embedding_params(run.model),
                   "flops_per_token": train_flops_per_token(run.model),
                   "tokens_per_step": run.train.batch_size * run.model.context_length, "seeds": {}}
            for seed in ctx.seeds:
                folder, _ = train_cached(ctx, f"scaling-{model}-{value}-s{seed}",
                                         scaling_run(ctx, s, model, value, seed))
                row["seeds"][seed] = val_history(folder)
            out[model][value] = row
    return out


# ----------------------------------------------------------------------------------------------- fits

def data_points(row: dict, seed: int, steps: int, start: float) -> tuple[list[int], list[float]]:
    """(tokens, val loss) of one run from `start` x its steps on (step 0 never)."""
    hist = row["seeds"][seed]
    picked = [k for k in sorted(hist) if k > 0 and k >= start * steps]
    return [k * row["tokens_per_step"] for k in picked], [hist[k] for k in picked]


def size_points(rows: dict, seed: int, steps: int, resource: str) -> tuple[list[float], list[float]]:
    """(non-embedding params or training FLOPs, final val loss) over the sizes of one seed."""
    xs, ys = [], []
    for row in rows.values():
        xs.append(row["params"] if resource == "params" else row["flops_per_token"] * row["tokens_per_step"]
                  * steps)
        ys.append(row["seeds"][seed][steps])
    return xs, ys


def steeper(fits: dict) -> dict:
    """Whether the EBT's slope is steeper, from per-seed fits {model: {seed: fit}}: the scaling rate
    |slope_EBT| / |slope_T++| - 1 with its t interval over seeds (expected above 0), and the slope
    difference EBT - T++ (expected below 0). The rate decides while every slope is negative; otherwise a
    ratio of |slopes| is not a scaling rate, and the signed difference decides."""
    from ebt.scale import rate_with_ci

    seeds = sorted(set(fits["ebt"]) & set(fits["transformer"]))
    rate = rate_with_ci({k: fits["ebt"][k] for k in seeds}, {k: fits["transformer"][k] for k in seeds})
    diff = seed_interval([fits["ebt"][k]["slope"] - fits["transformer"][k]["slope"] for k in seeds])
    falling = all(fits[m][k]["slope"] < 0 for m in MODELS for k in seeds)
    lo, hi = rate["ci95"]
    out = {"rate": rate["mean"], "rate_ci95": [lo, hi], "rate_per_seed": rate.get("per_seed", {}),
           "difference": diff[0], "difference_ci95": [diff[1], diff[2]], "all_falling": falling}
    if falling:
        out.update(basis="scaling rate", verdict=verdict(rate["mean"], lo, hi, expect="above"))
    else:
        out.update(basis="slope difference (a slope is not negative)",
                   verdict=verdict(diff[0], diff[1], diff[2], expect="below"))
    return out


def axis_fits(runs: dict, s: dict, seeds) -> dict:
    """Per axis (tokens, params, flops): per model and seed the fit, and `steeper`'s comparison."""
    from ebt.scale import fit_loglog

    data_size = s["sizes"][-1]
    out = {}
    for axis in ("tokens", "params", "flops"):
        fits = {}
        for model in MODELS:
            fits[model] = {}
            for seed in seeds:
                if axis == "tokens":
                    x, y = data_points(runs[model][data_size], seed, s["steps"], s["start"])
                else:
                    x, y = size_points(runs[model], seed, s["steps"], axis)
                fits[model][seed] = fit_loglog(x, y)
        out[axis] = {"fits": fits, **steeper(fits)}
    return out


# ------------------------------------------------------------------------------------------------ run

AXIS_TEXT = {"tokens": "training tokens (data axis)", "params": "non-embedding parameters (size axis)",
             "flops": "training FLOPs (size axis)"}
PAPER = {"tokens": "+35.98%", "params": "+2.91%", "flops": "+2.92%"}


def _pct(point: float, lo: float, hi: float) -> str:
    return fmt_interval(100 * point, 100 * lo, 100 * hi, "{:+.1f}%")


def axis_row(axis: str, f: dict, budget_text: str) -> Row:
    ours = (f"rate {_pct(f['rate'], *f['rate_ci95'])}; slope EBT - T++ "
            f"{fmt_interval(f['difference'], *f['difference_ci95'], '{:+.3f}')}")
    note = "" if f["all_falling"] else " (a slope is not negative: judged by the slope difference)"
    return Row(f"scaling rate vs {AXIS_TEXT[axis]} > 0 (paper {PAPER[axis]}){note}", ours, f["verdict"],
               budget_text)


def gap_row(runs: dict, s: dict, seeds, budget_text: str) -> tuple[Row, dict]:
    """The EBT's final loss minus the Transformer++'s at the data axis's size (the paper: behind at first)."""
    size = s["sizes"][-1]
    gaps = [runs["ebt"][size]["seeds"][k][s["steps"]] - runs["transformer"][size]["seeds"][k][s["steps"]]
            for k in seeds]
    mean, lo, hi = seed_interval(gaps)
    row = Row("control: at this scale the EBT's final val loss is above the Transformer++'s (paper: the EBT "
              "is behind at small scale and overtakes only with far more data)",
              f"{fmt_interval(mean, lo, hi, '{:+.3f}')} nats", verdict(mean, lo, hi, expect="above"),
              budget_text)
    return row, {"per_seed": dict(zip(seeds, gaps)), "mean": mean, "ci95": [lo, hi]}


def run(ctx: Context, s: dict) -> Result:
    runs = train_all(ctx, s)
    fits = axis_fits(runs, s, ctx.seeds)
    size = s["sizes"][-1]
    ebt_run, tpp_run = (scaling_run(ctx, s, m, size, 0) for m in ("ebt", "transformer"))
    ratio = runs["ebt"][size]["flops_per_token"] / runs["transformer"][size]["flops_per_token"]
    spend = (f"{budget(tpp_run, len(ctx.seeds))}; {budget(ebt_run, len(ctx.seeds))}: the EBT spends "
             f"{ratio:.1f}x the FLOPs per token")
    sizes = f"sizes {', '.join(s['sizes'])}, each {s['steps']} steps of {s['batch']} x {s['context']} tokens"
    rows = [axis_row(a, fits[a], spend if a == "tokens" else sizes) for a in ("tokens", "params", "flops")]
    gap, gap_data = gap_row(runs, s, ctx.seeds, spend)
    claim = Row(CLAIM.title, "; ".join(f"{a}: {_pct(fits[a]['rate'], *fits[a]['rate_ci95'])}"
                                       for a in ("tokens", "params")),
                pooled_verdict([fits["tokens"]["verdict"], fits["params"]["verdict"]]), spend)
    data = {"runs": runs, "fits": fits, "loss_gap": gap_data, "scale": s, "flops_ratio": ratio,
            "fit_from_step": math.ceil(s["start"] * s["steps"])}
    return Result([claim, *rows, gap], tables=[slope_table(fits, ctx.seeds)], data=data,
                  figure=lambda path: figure(runs, fits, s, path))


def slope_table(fits: dict, seeds) -> str:
    """Per axis, model and seed: the fitted slope, its r^2 and points."""
    rows = []
    for axis, f in fits.items():
        for model in MODELS:
            for seed in seeds:
                fit = f["fits"][model][seed]
                rows.append([AXIS_TEXT[axis], LABELS[model], seed, f"{fit['slope']:+.4f}", f"{fit['r2']:.3f}",
                             fit["n"]])
    return ("Per-seed log-log slopes of validation loss (the rate, per seed: |slope_EBT| / |slope_T++| - 1):"
            "\n\n" + table(["resource", "model", "seed", "slope", "r^2", "points"], rows))


# --------------------------------------------------------------------------------------------- figure

COLORS = {"transformer": "tab:blue", "ebt": "tab:red"}


def figure(runs: dict, fits: dict, s: dict, path: Path) -> Path:
    """Validation loss against tokens (the data axis's run), parameters and training FLOPs, on log axes:
    one line per model and seed, the fitted stretch of the data axis drawn solid."""
    from ebt.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    size = s["sizes"][-1]
    for model in MODELS:
        for i, seed in enumerate(sorted(runs[model][size]["seeds"])):
            label = LABELS[model] if i == 0 else None
            row = runs[model][size]
            hist = {k: v for k, v in row["seeds"][seed].items() if k > 0}
            axes[0].plot([k * row["tokens_per_step"] for k in hist], list(hist.values()), color=COLORS[model],
                         alpha=0.35, lw=1)
            x, y = data_points(row, seed, s["steps"], s["start"])
            axes[0].plot(x, y, color=COLORS[model], lw=1.6, label=label)
            for ax, res in ((axes[1], "params"), (axes[2], "flops")):
                x, y = size_points(runs[model], seed, s["steps"], res)
                ax.plot(x, y, "o-", color=COLORS[model], alpha=0.8, label=label)
    for ax, axis in zip(axes, ("tokens", "params", "flops")):
        f = fits[axis]
        ax.set(xscale="log", yscale="log", xlabel=AXIS_TEXT[axis], ylabel="validation loss (nats)",
               title=f"rate {_pct(f['rate'], *f['rate_ci95'])}\n{f['verdict']}"
                     + ("" if f["all_falling"] else " (by the slope difference)"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"scaling: one line per seed; data axis {size}, fitted (solid) from step "
                 f"{math.ceil(s['start'] * s['steps'])} of {s['steps']}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
