"""Claim 3 (the paper's self-verification, Fig. 6a): thinking from N independent random starts and keeping,
per predicted position, the candidate of lowest final energy (best-of-N) lowers an S2 EBT's perplexity
against one candidate, and more after more training. Control: a random pick among the same N candidates
(their NLL averaged): is choosing by energy better than not choosing?

Every candidate thinks with the official inference (ebt.think.ThinkConfig's defaults: the default steps,
the trained Langevin noise before every step, the final candidate scored without noise), so candidates
differ by their starts and their noise; they are drawn in the order think(candidates=N) draws them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ebt.demo import CAP
from ebt.paper.common import Claim, Result, Row, bootstrap, fmt_interval, table
from ebt.paper.lm import (LM_SCALES, shared_series, text_data, all_of, eval_key, lm_budget, points, pooled, shown, split_label,
                                split_windows, target_mask, target_nll)

CLAIM = Claim("verification", "Self-verification (best-of-N by minimum energy) helps, more with more "
              "training", "Fig. 6a (S2 self-verification)")

# windows: evaluation windows per split; eval_batch: windows thought about at once. cpu: 4 candidates x 2
# splits x 3 snapshots x 3 seeds at the default steps (times: benchmarks/RESULTS.md)
EXTRA = {"tiny": dict(windows=8, eval_batch=8),
         "cpu": dict(windows=96, eval_batch=16),
         "paper": dict(windows=1024, eval_batch=16)}
SCALES = {name: {**LM_SCALES[name], **EXTRA[name]} for name in LM_SCALES}

CANDIDATES = (1, 2, 4)  # N; the N = 2 pick uses the first two of the four candidates
SPLITS = ("val", "ood")
# the comparisons: (name, pick, against): best of N vs one candidate; the control, best of N vs a random pick
# of the same N; and the random pick vs one candidate (no gain expected: a check of the control)
COMPARE = (("best", "best", "one"), ("best_vs_random", "best", "random"), ("random", "random", "one"))


@torch.no_grad()
def candidate_nll(model, windows: torch.Tensor, n: int = CANDIDATES[-1], seed: int = 0,
                  batch: int = 16) -> dict:
    """n candidates per window, each thought about as ThinkConfig() says, drawn as think(candidates=n) draws
    them (batch i seeded 1000 * seed + i). Per window: the summed NLL of each candidate alone ("single",
    (n, W)) and of the lowest-energy candidate per position among the first k ("picked"[k], think's
    select="min", the first on ties) for k = 1..n; the token counts."""
    from ebt.fast.plan import resolve_plan
    from ebt.runtime import seeded
    from ebt.think import ThinkConfig, think

    dev, cfg = windows.device, ThinkConfig()
    step = resolve_plan(model, dev).think_step(model, cfg)
    single, picked, tokens = [], {k: [] for k in range(1, n + 1)}, []
    for i, chunk in enumerate(windows.split(batch)):
        targets = chunk[:, 1:]
        mask = target_mask(targets, model.cfg.pad_token_id)
        energy, nll = [], []
        with seeded(1000 * seed + i, dev):
            for _ in range(n):
                out = think(model, chunk[:, :-1], cfg, step=step)
                energy.append(out.energy.double())
                nll.append(target_nll(out.z, targets) * mask)
        energy, nll = torch.stack(energy), torch.stack(nll)  # (n, B, S)
        single.append(nll.sum(-1).cpu())
        for k in picked:
            pick = energy[:k].argmin(0, keepdim=True)
            picked[k].append(nll[:k].gather(0, pick).squeeze(0).sum(-1).cpu())
        tokens.append(mask.sum(1).double().cpu())
    return {"single": torch.cat(single, 1), "picked": {k: torch.cat(v) for k, v in picked.items()},
            "tokens": torch.cat(tokens)}


def evaluate_snapshot(ctx, s: dict, path: Path, windows: dict, seed: int) -> dict:
    """candidate_nll on every split at one snapshot (cached): {split: its sums, in JSON}."""
    def compute():
        from ebt.models import load_model

        model = load_model(path, device=ctx.device).eval()
        out = {}
        for name, w in windows.items():
            r = candidate_nll(model, w.to(ctx.device), CANDIDATES[-1], seed, s["eval_batch"])
            out[name] = {"single": r["single"].tolist(), "tokens": r["tokens"].tolist(),
                         "picked": {str(k): v.tolist() for k, v in r["picked"].items()}}
        return out

    key = eval_key(path, {n: len(w) for n, w in windows.items()}, CANDIDATES[-1], seed)
    return ctx.cached(f"verify-s{seed}-{path.name}-{key}", compute)


def as_sums(d: dict) -> dict:
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    return {"single": t(d["single"]), "tokens": t(d["tokens"]),
            "picked": {int(k): t(v) for k, v in d["picked"].items()}}


# -------------------------------------------------------------------------------------- statistics

def pick_nll(r: dict, k: int, how: str) -> torch.Tensor:
    """Per-window NLL of k candidates: "best", the lowest energy per position; "one", the first candidate
    alone (what one candidate gives); "random", a random pick per position (the k candidates' NLL
    averaged)."""
    if how == "best":
        return r["picked"][k]
    return r["single"][0] if how == "one" else r["single"][:k].mean(0)


def change(r: dict, k: int, how: str = "best", against: str = "one", i=slice(None)) -> float:
    """Relative perplexity change of windows i from `against` to `how` (pick_nll's) among k candidates."""
    d = pick_nll(r, k, how)[i] - pick_nll(r, k, against)[i]
    return math.expm1(min(float(d.sum() / r["tokens"][i].sum()), CAP))


def ppl(nll: torch.Tensor, tokens: torch.Tensor) -> float:
    return math.exp(min(float(nll.sum() / tokens.sum()), CAP))


def seed_statistics(sums: dict, steps: list[int]) -> dict:
    """One seed: per snapshot, split and N the perplexities and the changes against one candidate and against
    a random pick (95% bootstrap over windows); per split the training gain of the best of the most."""
    out, top = {"snapshots": {}}, CANDIDATES[-1]
    for step in steps:
        out["snapshots"][str(step)] = snap = {}
        for n, r in sums[step].items():
            W = r["tokens"].numel()
            cell = lambda k, how, a: {"point": change(r, k, how, a), "interval": list(bootstrap(
                lambda i: change(r, k, how, a, i), W))}
            snap[n] = {**{f"ppl_{how}{k}": ppl(pick_nll(r, k, how), r["tokens"]) for k in CANDIDATES
                          for how in ("best", "random")},
                       **{f"{key}{k}": cell(k, how, a) for k in CANDIDATES[1:] for key, how, a in COMPARE}}
    end, start = sums[steps[-1]], sums[steps[0]]
    out["training"] = {}
    for n in end:
        d = lambda i: change(end[n], top, i=i) - change(start[n], top, i=i)
        out["training"][n] = {"point": d(slice(None)),
                              "interval": list(bootstrap(d, end[n]["tokens"].numel()))}
    return out


def pooled_statistics(per_seed: dict, steps: list[int], names: list[str]) -> dict:
    """Across seeds (mean, t interval, verdict): every snapshot's changes, and the training gain."""
    over = lambda get: pooled([get(x) for x in per_seed])
    keys = [f"{key}{k}" for k in CANDIDATES[1:] for key, _, _ in COMPARE]
    cell = lambda st, n, key: over(lambda x: per_seed[x]["snapshots"][str(st)][n][key]["point"])
    return {"snapshots": {str(st): {n: {key: cell(st, n, key) for key in keys} for n in names}
                          for st in steps},
            "training": {n: over(lambda x: per_seed[x]["training"][n]["point"]) for n in names}}


# ------------------------------------------------------------------------------------------- report

def claim_rows(p: dict, labels: dict, steps: list[int], cost: str) -> list[Row]:
    top, last, first = CANDIDATES[-1], str(steps[-1]), str(steps[0])
    g = p["snapshots"][last]
    parts = [g[n][f"best{top}"]["verdict"] for n in labels] + [p["training"][n]["verdict"] for n in labels]
    rows = [Row(f"The lowest-energy of {top} candidates lowers perplexity against one candidate on "
                f"{' and '.join(labels.values())} (snapshot {last}), and more than at snapshot {first}",
                "; ".join(f"{labels[n]} {shown(g[n][f'best{top}'])}, last minus first snapshot "
                          f"{shown(p['training'][n], points)}" for n in labels), all_of(parts), cost)]
    for n in labels:
        for k in CANDIDATES[1:]:
            c = g[n][f"best{k}"]
            rows.append(Row(f"Best of {k} against 1 candidate on {labels[n]}: perplexity change (snapshot "
                            f"{last})", shown(c), c["verdict"], cost))
    for n in labels:
        c = g[n][f"best_vs_random{top}"]
        rows.append(Row(f"Control, {labels[n]}: best of {top} by energy against a random pick among the same "
                        f"{top} (their NLL averaged)", shown(c), c["verdict"], cost))
    for n in labels:
        t = p["training"][n]
        rows.append(Row(f"More gain after more training on {labels[n]}: best of {top}'s change at snapshot "
                        f"{last} minus at {first}", shown(t, points), t["verdict"], cost))
    return rows


def _iv(d: dict) -> str:
    return fmt_interval(100 * d["point"], *[100 * v for v in d["interval"]], "{:+.3g}") + "%"


def report_tables(per_seed: dict, p: dict, labels: dict, steps: list[int]) -> list[str]:
    """Pooled per snapshot, split and N; then per seed with bootstrap intervals."""
    mean = lambda st, n, key: sum(per_seed[x]["snapshots"][str(st)][n][key] for x in per_seed) / len(per_seed)
    rows = [[st, labels[n], k, *[f"{mean(st, n, key):.4g}" for key in ("ppl_best1", f"ppl_random{k}",
                                                                          f"ppl_best{k}")],
             *[shown(p["snapshots"][str(st)][n][f"{key}{k}"]) for key, _, _ in COMPARE]]
            for st in steps for n in labels for k in CANDIDATES[1:]]
    one = table(["snapshot", "split", "N", "ppl 1 candidate", "ppl random pick of N", "ppl best of N",
                 "best of N vs 1", "best of N vs random pick", "random pick vs 1"], rows)
    rows = [[x, st, labels[n], k, *[_iv(c[f"{key}{k}"]) for key, _, _ in COMPARE]]
            for x, sd in per_seed.items() for st in steps for n in labels
            for c in [sd["snapshots"][str(st)][n]] for k in CANDIDATES[1:]]
    two = table(["seed", "snapshot", "split", "N", "best of N vs 1", "best of N vs random pick",
                 "random pick vs 1"], rows)
    return ["Perplexity, mean over seeds; changes with their 95% t interval over seeds (each candidate: the "
            "default steps with the trained Langevin noise; picked per position by lowest final energy):",
            one,
            "Per seed (95% bootstrap intervals over windows):", two]


def draw(path: Path, p: dict, labels: dict, steps: list[int]) -> Path:
    """One panel per split: the change against one candidate for N = 1, 2, 4 at each snapshot; dashed: the
    random pick's."""
    from ebt.paper.thinking import bar_values
    from ebt.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4.2), squeeze=False)
    zero = {"mean": 0.0, "interval": [0.0, 0.0]}
    for a, n in zip(ax[0], labels):
        for j, st in enumerate(steps):
            g = p["snapshots"][str(st)][n]
            bars = [bar_values(zero)] + [bar_values(g[f"best{k}"]) for k in CANDIDATES[1:]]
            a.errorbar(CANDIDATES, [b[0] for b in bars], yerr=list(zip(*[b[1] for b in bars])), marker="o",
                       capsize=3, color=f"C{j}", label=f"best of N, snapshot {st}")
            rnd = [bar_values(zero)[0]] + [bar_values(g[f"random{k}"])[0] for k in CANDIDATES[1:]]
            a.plot(CANDIDATES, rnd, ls="--", color=f"C{j}", lw=1)
        a.axhline(0, color="grey", lw=0.5)
        a.set(xlabel="candidates N", ylabel="perplexity change vs 1 candidate (%)", xticks=list(CANDIDATES),
              title=f"{labels[n]}; dashed: a random pick of N")
    ax[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def run(ctx, s: dict) -> Result:
    ebt = shared_series(ctx, s, "ebt")
    windows = split_windows(ctx, s, SPLITS)
    labels = {n: split_label(n, text_data(ctx)["ood_source"]) for n in windows}
    steps = sorted(next(iter(ebt.values())))
    per_seed = {}
    for seed in ctx.seeds:
        sums = {st: {n: as_sums(r) for n, r in evaluate_snapshot(ctx, s, path, windows, seed).items()}
                for st, path in sorted(ebt[seed].items())}
        per_seed[str(seed)] = seed_statistics(sums, steps)
    p = pooled_statistics(per_seed, steps, list(labels))
    cost = lm_budget(ctx, s) + "; best of N thinks N times the default steps per token"
    data = {"splits": labels, "windows": {n: len(w) for n, w in windows.items()}, "snapshots": steps,
            "candidates": list(CANDIDATES), "per_seed": per_seed, "pooled": p}
    return Result(claim_rows(p, labels, steps, cost), report_tables(per_seed, p, labels, steps), data,
                  lambda path: draw(path, p, labels, steps))
