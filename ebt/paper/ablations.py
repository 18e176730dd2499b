"""Claim 7 (the paper's Table 2): each of the System 2 recipe's four regularisers (random step size, random
step count, Langevin noise, replay buffer; docs/method.md 2.5) helps the EBT think.

The full S2 recipe is the text claims' shared run (ebt.paper.lm.shared_series, the same folders); each
variant removes one piece and trains on the same batches, per seed, to the same step `at` of the same
schedule. Each is evaluated as the paper's table measures: the percent perplexity improvement on the
out-of-distribution split from thinking `factor` x the default steps, and from that plus best-of-N
self-verification (lowest final energy), each variant at its own default inference (its trained Langevin
noise, as the official code). Per variant: the full recipe's gain minus the variant's, paired by seed, with
a t interval over seeds; the paper's sign decides the expectation. The validation perplexity of every
variant is reported beside it (not in the paper's table).
"""

from __future__ import annotations

import math
from pathlib import Path

from ebt.config import RunConfig, from_dict, recipe, to_dict
from ebt.paper.common import (Claim, Context, Result, Row, budget, fmt_interval, pooled_verdict, run_dir,
                              seed_interval, table, verdict)
from ebt.paper.lm import LM_SCALES, lm_run, text_data, train_series

CLAIM = Claim("ablations", "Each of the S2 recipe's random step size, random step count, Langevin noise and "
                           "replay buffer adds to the System 2 gain (thinking longer + self-verification, "
                           "out of distribution)",
              "Table 2 (System 2 ablations)")

# name: (folder key, EBTConfig overrides on the S2 recipe). "no random steps": randint(2, 3) is always 2,
# the full recipe's default thinking steps; rand_steps=0 would also train 1 step instead of 2-3.
VARIANTS = {
    "full S2": ("", {}),
    "no random alpha": ("noalpha", dict(alpha_rand_scale=1.0)),
    "no random steps": ("nosteps", dict(rand_steps=1, rand_steps_min=2)),
    "no Langevin": ("nolangevin", dict(langevin=0.0)),
    "no replay buffer": ("noreplay", dict(replay_buffer=0)),
}
FULL = "full S2"
# the paper's out-of-distribution percent perplexity improvement: (thinking longer, longer + verification)
PAPER = {"full S2": (7.19, 18.7), "no random alpha": (-1.47, 0.19), "no random steps": (0.00, 9.65),
         "no Langevin": (17.2, 17.0), "no replay buffer": (14.8, 17.8)}

# The shared text runs (lm.LM_SCALES) plus: at, the step every variant is compared at (one of the shared
# snapshots); windows per split; factor, the longer thinking; candidates, best-of-N. cpu: 12 variant
# trainings of 150 steps (of the shared 600-step schedule) and their evaluations, beside the shared runs
# (times: benchmarks/RESULTS.md); "at": 300 compares better-trained models at about twice the cost.
SCALES = {
    "tiny": {**LM_SCALES["tiny"], "at": 6, "windows": 8, "factor": 2, "candidates": 2},
    "cpu": {**LM_SCALES["cpu"], "at": 150, "windows": 64, "factor": 2, "candidates": 4},
    "paper": {**LM_SCALES["paper"], "at": 1_000_000, "windows": 1024, "factor": 2, "candidates": 4},
}


# ------------------------------------------------------------------------------------------- trainings

def variant_run(ctx: Context, s: dict, name: str, seed: int) -> tuple[str, RunConfig]:
    """The run's folder name and config; the full recipe's is the shared run's exactly (lm.shared_series)."""
    key, overrides = VARIANTS[name]
    run = lm_run(ctx, s, "ebt", seed, ebt=recipe("s2", **overrides))
    return (f"ebt-{key}-s{seed}" if key else f"ebt-s{seed}"), run


def weights_at(ctx: Context, name: str, run: RunConfig, at: int, points=()) -> Path:
    """The weights at step `at` of `run` (its whole schedule, paused there), trained only that far (a later
    train_series continues the same folder), pausing for a snapshot at each of `points` before it too (the
    shared series', so that it finds them); a snapshot another claim left is reused."""
    done = run_dir(ctx.runs, name, run) / f"step_{at}"
    return done if done.exists() else train_series(ctx, name, run, list(points), until=at)[at]


# ------------------------------------------------------------------------------------------ evaluation

def evaluate(ctx: Context, s: dict, snap: Path) -> dict:
    """Perplexity of one snapshot, from the same seeded starts: on validation with the default thinking and
    `factor` x it; out of distribution also with `candidates` starts (lowest final energy kept)."""
    from ebt.data.loader import TokenData
    from ebt.evaluate import evaluate_thinking
    from ebt.models import load_model
    from ebt.recipe import inference_steps
    from ebt.think import ThinkConfig

    model = load_model(snap, device=ctx.device).eval()
    base = inference_steps(model.cfg.ebt)
    longer = base * s["factor"]
    cfgs = {"default": ThinkConfig(steps=base), "longer": ThinkConfig(steps=longer),
            "verify": ThinkConfig(steps=longer, candidates=s["candidates"])}
    out = {"steps": base}
    for split, names in (("val", ("default", "longer")), ("ood", ("default", "longer", "verify"))):
        data = TokenData(ctx.data_dir, split, model.cfg.context_length)
        out[split] = {n: evaluate_thinking(model, data, cfgs[n], batch_size=16, max_windows=s["windows"],
                                           device=ctx.device, seed=0) for n in names}
    return out


def gain(res: dict, split: str, how: str) -> float:
    """Percent perplexity improvement over the default thinking (the paper's table's unit)."""
    base = res[split]["default"]["ppl"]
    return 100 * (base - res[split][how]["ppl"]) / base


def evaluate_all(ctx: Context, s: dict) -> dict:
    """{variant: {"seeds": [...], "results": [per seed evaluate()], "flops_per_token", "budget"}}."""
    from ebt.flops import train_flops_per_token, transformer_train_flops

    (ctx.out / "cache").mkdir(parents=True, exist_ok=True)  # ctx.cached writes there
    out = {}
    for name in [*(n for n in VARIANTS if n != FULL), FULL]:  # the full runs last: other claims share them
        results = []
        for seed in ctx.seeds:
            folder_name, run = variant_run(ctx, s, name, seed)
            snap = weights_at(ctx, folder_name, run, s["at"], s["points"] if name == FULL else ())
            key = (f"eval-{snap.parent.name}-at{s['at']}-w{s['windows']}-x{s['factor']}"
                   f"-n{s['candidates']}")
            results.append(ctx.cached(key, lambda: evaluate(ctx, s, snap)))
        at_run = from_dict(RunConfig, {**to_dict(run), "train": {**to_dict(run.train), "steps": s["at"]}})
        flops = train_flops_per_token(run.model)
        out[name] = {"seeds": list(ctx.seeds), "results": results, "flops_per_token": flops,
                     "flops_vs_transformer": flops / transformer_train_flops(run.model),
                     "budget": budget(at_run, len(ctx.seeds))}
    return {name: out[name] for name in VARIANTS}


# ----------------------------------------------------------------------------------------- statistics

def paired(full: list[float], variant: list[float]) -> tuple[float, float, float]:
    """Mean full - variant over seeds (paired) and its t interval."""
    return seed_interval([f - v for f, v in zip(full, variant)])


def expectation(name: str, column: int) -> str:
    """The paper's direction of full - variant in its table's column (0: longer, 1: longer + verification)."""
    return "above" if PAPER[FULL][column] - PAPER[name][column] > 0 else "below"


def compare(evals: dict) -> dict:
    """Per variant: its gains per seed and, against the full recipe (paired by seed), the drop of each gain
    and the validation perplexity difference (variant - full), with intervals and the verdicts."""
    def per_seed(name, split, how):
        return [gain(r, split, how) for r in evals[name]["results"]]

    def val_ppl(name):
        return [r["val"]["default"]["ppl"] for r in evals[name]["results"]]

    out = {}
    for name in VARIANTS:
        row = {"ood_longer": per_seed(name, "ood", "longer"), "ood_verify": per_seed(name, "ood", "verify"),
               "val_longer": per_seed(name, "val", "longer"), "val_ppl": val_ppl(name),
               "ood_ppl": [r["ood"]["default"]["ppl"] for r in evals[name]["results"]]}
        row["summary"] = {k: seed_interval(v) for k, v in row.items()}
        if name != FULL:
            for col, key in ((0, "ood_longer"), (1, "ood_verify")):
                d = paired(out[FULL][key], row[key])
                row[f"drop_{key}"] = {"mean": d[0], "ci95": [d[1], d[2]], "expect": expectation(name, col),
                                      "verdict": verdict(*d, expect=expectation(name, col))}
            d = seed_interval([v - f for f, v in zip(out[FULL]["val_ppl"], row["val_ppl"])])
            row["val_ppl_minus_full"] = {"mean": d[0], "ci95": [d[1], d[2]]}
        out[name] = row
    return out


# ------------------------------------------------------------------------------------------------ run

def _pts(d: dict) -> str:
    return fmt_interval(d["mean"], *d["ci95"], "{:+.2f}") + " points"


def rows_of(stats: dict, s: dict, spend: str) -> list[Row]:
    """The claim (every removal lowers the gain with self-verification), then one row per variant and
    column of the paper's table."""
    n, f = s["candidates"], s["factor"]
    rows = []
    for name in VARIANTS:
        if name == FULL:
            continue
        for col, key, what in ((1, "ood_verify", f"{f}x steps + best of {n}"),
                               (0, "ood_longer", f"{f}x steps")):
            d = stats[name][f"drop_{key}"]
            word = "lowers" if d["expect"] == "above" else "raises"
            rows.append(Row(f"{name} {word} the OOD gain from {what} (paper: {PAPER[FULL][col]:+.2f}% full, "
                            f"{PAPER[name][col]:+.2f}% without)", "full - variant: " + _pts(d), d["verdict"],
                            spend))
    removed = [name for name in VARIANTS if name != FULL]
    drops = [stats[name]["drop_ood_verify"] for name in removed]
    full = stats[FULL]["summary"]["ood_verify"]
    claim = Row(CLAIM.title, f"full S2 gain {fmt_interval(*full, '{:+.2f}')}%; full - variant: "
                + "; ".join(f"{name} {_pts(d)}" for name, d in zip(removed, drops)),
                pooled_verdict([d["verdict"] for d in drops]), spend)
    return [claim, *rows]


def variant_table(stats: dict, evals: dict, ood: str) -> str:
    """Per variant, mean over seeds [t interval]: val perplexity and its difference from the full recipe,
    the gains, and the training FLOPs per token."""
    rows = []
    for name, st in stats.items():
        sm = st["summary"]
        diff = st.get("val_ppl_minus_full")
        pct = [fmt_interval(*sm[k], "{:+.2f}") + "%" for k in ("val_longer", "ood_longer", "ood_verify")]
        rows.append([name, fmt_interval(*sm["val_ppl"], "{:.1f}"),
                     fmt_interval(diff["mean"], *diff["ci95"], "{:+.1f}") if diff else "-",
                     fmt_interval(*sm["ood_ppl"], "{:.1f}"), *pct,
                     f"{evals[name]['flops_per_token'] / 1e6:.3g}"])
    return (f"Per variant (mean over seeds [95% t interval]; OOD = {ood}; gains: percent perplexity "
            f"improvement over the default thinking; the S2 EBT's replay rows add half a batch of work):\n\n"
            + table(["variant", "val ppl", "val ppl - full", "OOD ppl", "val gain, longer",
                     "OOD gain, longer", "OOD gain, longer + best of N", "train MFLOP/token"], rows))


def run(ctx: Context, s: dict) -> Result:
    evals = evaluate_all(ctx, s)
    stats = compare(evals)
    spend = (f"{evals[FULL]['budget']} (step {s['at']} of a {s['steps']}-step schedule; "
             f"{evals[FULL]['flops_vs_transformer']:.1f}x a Transformer++'s FLOPs per token, replay rows "
             f"aside)")
    ood = text_data(ctx)["ood_source"]
    data = {"variants": {k: v[1] for k, v in VARIANTS.items()}, "paper": PAPER, "evaluations": evals,
            "stats": stats, "scale": s, "ood_source": ood}
    return Result(rows_of(stats, s, spend), tables=[variant_table(stats, evals, ood)], data=data,
                  figure=lambda path: figure(stats, s, path))


# --------------------------------------------------------------------------------------------- figure

def figure(stats: dict, s: dict, path: Path) -> Path:
    """Bars with 95% t intervals over seeds: each variant's OOD gains, and its val perplexity minus the full
    recipe's."""
    from ebt.plots import pyplot, save_figure

    plt = pyplot()
    names = list(stats)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.4))
    width = 0.38
    for j, (key, label) in enumerate((("ood_longer", f"{s['factor']}x steps"),
                                      ("ood_verify", f"{s['factor']}x steps + best of {s['candidates']}"))):
        means = [stats[n]["summary"][key][0] for n in names]
        errs = [_err(stats[n]["summary"][key]) for n in names]
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        left.bar(xs, means, width, yerr=list(zip(*errs)), capsize=3, label=label)
        left.scatter(xs, [PAPER[n][j] for n in names], marker="x", color="k", zorder=3,
                     label="paper" if j == 0 else None)
    left.set(xticks=range(len(names)), ylabel="OOD perplexity improvement (%)",
             title="System 2 gain per variant (mean over seeds, 95% t)")
    left.set_xticklabels(names, rotation=15, fontsize=8)
    left.axhline(0, color="k", lw=0.6)
    left.legend(fontsize=8)
    rest = names[1:]
    diffs = [stats[n]["val_ppl_minus_full"] for n in rest]
    right.bar(range(len(rest)), [d["mean"] for d in diffs], 0.6,
              yerr=list(zip(*[_err((d["mean"], *d["ci95"])) for d in diffs])), capsize=3, color="tab:gray")
    right.set(xticks=range(len(rest)), ylabel="val perplexity, variant - full",
              title=f"validation perplexity (step {s['at']})")
    right.set_xticklabels(rest, rotation=15, fontsize=8)
    right.axhline(0, color="k", lw=0.6)
    fig.tight_layout()
    return save_figure(fig, path)


def _err(summary) -> tuple[float, float]:
    """Error-bar lengths below and above the mean (0 where the interval is undefined)."""
    mean, lo, hi = summary
    return (0.0, 0.0) if math.isnan(lo) else (mean - lo, hi - mean)
