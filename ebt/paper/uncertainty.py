"""Claim 4 (the paper's Fig. 8 and B.2): an EBT's energy tracks uncertainty. Per predicted token, the S2
EBT's final energy after the default thinking rises with the Transformer++'s NLL of that token (Spearman,
and with the EBT's own NLL), and natural text gets lower energy than the same tokens shuffled, and those
lower than uniformly random tokens (ebt.demo.energy_order, ebt.inspect.window_statistics).

Both models of the shared trainings (ebt.paper.lm.shared_series) are read at the same snapshot on the same
validation windows; thinking is seeded, with the trained Langevin noise, the final energy without noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ebt.paper.common import Claim, Result, Row, bootstrap, fmt_interval, table
from ebt.paper.lm import (LM_SCALES, all_of, eval_key, lm_budget, pooled, shared_series, split_windows, target_nll,
                          token_nll)

CLAIM = Claim("uncertainty", "Energy tracks uncertainty: per-token energy rises with the Transformer++'s "
              "NLL; natural < shuffled < random text", "Fig. 8, B.2")

# windows: validation windows; eval_batch: windows thought about at once; scatter: tokens kept for the figure.
# cpu: natural, shuffled and random text at the default steps, 3 snapshots x 3 seeds (times:
# benchmarks/RESULTS.md)
EXTRA = {"tiny": dict(windows=8, eval_batch=8, scatter=200),
         "cpu": dict(windows=128, eval_batch=16, scatter=1500),
         "paper": dict(windows=1024, eval_batch=16, scatter=3000)}
SCALES = {name: {**LM_SCALES[name], **EXTRA[name]} for name in LM_SCALES}

ORDER = (("natural", "shuffled"), ("shuffled", "random"))  # each pair: the first expected lower
RHO = ("energy_tpp_nll", "energy_own_nll", "own_nll_tpp_nll")  # rank correlations, expected above zero


@torch.no_grad()
def token_energies(model, windows: torch.Tensor, seed: int = 0, batch: int = 16) -> dict:
    """Per token (W, S): the EBT's final energy after the default thinking and its own NLL there. Per window:
    the mean final energy of natural text, of the same tokens shuffled and of uniformly random tokens, drawn
    and thought about as ebt.demo.energy_order does (batch i seeded 1000 * seed + i, all three from the same
    starts and noise)."""
    from ebt.demo import _think

    energy, own, means = [], [], {"natural": [], "shuffled": [], "random": []}
    for i, chunk in enumerate(windows.split(batch)):
        cs, tokens = 1000 * seed + i, chunk[:, :-1]
        natural = _think(model, tokens, None, cs)
        energy.append(natural.energy.double().cpu())
        own.append(target_nll(natural.z, chunk[:, 1:]).cpu())
        means["natural"].append(energy[-1].mean(1))
        g = torch.Generator().manual_seed(cs)
        perm = torch.stack([torch.randperm(tokens.shape[1], generator=g) for _ in range(tokens.shape[0])])
        rand = torch.randint(0, model.cfg.vocab_size, tokens.shape, generator=g).to(tokens.device)
        for name, x in (("shuffled", tokens.gather(1, perm.to(tokens.device))), ("random", rand)):
            means[name].append(_think(model, x, None, cs).energy.double().mean(1).cpu())
    return {"energy": torch.cat(energy), "own_nll": torch.cat(own),
            **{k: torch.cat(v) for k, v in means.items()}}


def rank_correlation(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, i=slice(None)) -> float:
    """ebt.inspect.spearman over the non-pad tokens of windows i (a, b, mask: (W, S)). Pad tokens rank
    last and weigh nothing (no boolean indexing: with several threads its synchronisation dominates a
    bootstrap)."""
    a, b, m = a[i].flatten(), b[i].flatten(), mask[i].flatten()
    w, inf = m.double(), torch.tensor(float("inf"), dtype=a.dtype)
    ranks = []
    for x in (a, b):
        r = torch.where(m, x, inf).argsort().argsort().double()
        ranks.append((r - (r * w).sum() / w.sum()) * w)
    return float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()))


def statistics(r: dict, tpp_nll: torch.Tensor, mask: torch.Tensor, scatter: int, seed: int) -> dict:
    """One seed and snapshot: the Spearman correlations and the energy order, each with its 95% bootstrap
    interval over windows, and `scatter` tokens' (energy, Transformer++ NLL) for the figure."""
    W = mask.shape[0]
    pairs = {"energy_tpp_nll": (r["energy"], tpp_nll), "energy_own_nll": (r["energy"], r["own_nll"]),
             "own_nll_tpp_nll": (r["own_nll"], tpp_nll)}
    out = {}
    for name, (a, b) in pairs.items():
        out[name] = {"point": rank_correlation(a, b, mask),
                     "interval": list(bootstrap(lambda i: rank_correlation(a, b, mask, i), W))}
    out["mean_energy"] = {k: float(r[k].mean()) for k in ("natural", "shuffled", "random")}
    for lower, higher in ORDER:
        d = r[lower] - r[higher]
        out[f"{lower} < {higher}"] = {"point": float(d.mean()),
                                      "interval": list(bootstrap(lambda i: float(d[i].mean()), W))}
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(int(mask.sum()), generator=g)[:scatter]
    out["scatter"] = {"energy": [round(v, 5) for v in r["energy"][mask][keep].tolist()],
                      "tpp_nll": [round(v, 5) for v in tpp_nll[mask][keep].tolist()]}
    out["tokens"] = int(mask.sum())
    return out


def evaluate_snapshot(ctx, s: dict, ebt_path: Path, tpp_path: Path, windows: torch.Tensor, seed: int) -> dict:
    """token_energies and the Transformer++'s NLL on the same windows at one snapshot, as statistics
    (cached)."""
    def compute():
        from ebt.models import load_model

        w = windows.to(ctx.device)
        r = token_energies(load_model(ebt_path, device=ctx.device).eval(), w, seed, s["eval_batch"])
        nll, mask = token_nll(load_model(tpp_path, device=ctx.device).eval(), w, s["eval_batch"])
        return statistics(r, nll, mask, s["scatter"], seed)

    key = eval_key(ebt_path, tpp_path, len(windows), s["scatter"], seed)
    return ctx.cached(f"energy-s{seed}-{ebt_path.name}-{key}", compute)


# ------------------------------------------------------------------------------------------- report

def pooled_statistics(per_seed: dict, steps: list[int]) -> dict:
    """Across seeds per snapshot: mean, t interval and verdict of each correlation (expected above zero)
    and energy difference (expected below)."""
    out = {}
    for st in steps:
        cell = lambda key, expect: pooled([per_seed[x][str(st)][key]["point"] for x in per_seed], expect)
        out[str(st)] = {**{key: cell(key, "above") for key in RHO},
                        **{f"{a} < {b}": cell(f"{a} < {b}", "below") for a, b in ORDER}}
        out[str(st)]["mean_energy"] = {k: pooled([per_seed[x][str(st)]["mean_energy"][k] for x in per_seed])
                                       for k in ("natural", "shuffled", "random")}
    return out


def _rho(d: dict) -> str:
    return fmt_interval(d["mean"], *d["interval"], "{:+.3f}")


def _diff(d: dict) -> str:
    return fmt_interval(d["mean"], *d["interval"], "{:+.3g}")


def claim_rows(p: dict, steps: list[int], cost: str) -> list[Row]:
    last = str(steps[-1])
    g = p[last]
    keys = ["energy_tpp_nll", *[f"{a} < {b}" for a, b in ORDER]]
    rows = [Row(f"Per-token energy rises with the Transformer++'s NLL (Spearman), and natural < shuffled < "
                f"random text energy (snapshot {last})",
                f"Spearman {_rho(g['energy_tpp_nll'])}; natural minus shuffled "
                f"{_diff(g['natural < shuffled'])}; shuffled minus random {_diff(g['shuffled < random'])}",
                all_of([g[k]["verdict"] for k in keys]), cost),
            Row("Spearman of the EBT's final energy with the Transformer++'s NLL, per token (Fig. 8)",
                _rho(g["energy_tpp_nll"]), g["energy_tpp_nll"]["verdict"], cost),
            Row("Spearman of the EBT's final energy with its own NLL, per token",
                _rho(g["energy_own_nll"]), g["energy_own_nll"]["verdict"], cost)]
    for a, b in ORDER:
        d = g[f"{a} < {b}"]
        rows.append(Row(f"Mean energy of {a} text minus {b} (B.2; expected below zero)", _diff(d),
                        d["verdict"], cost))
    return rows


def report_tables(per_seed: dict, p: dict, steps: list[int]) -> list[str]:
    rows = [[st, *[_rho(p[str(st)][k]) for k in RHO],
             *[f"{p[str(st)]['mean_energy'][k]['mean']:.4g}" for k in ("natural", "shuffled", "random")],
             *[_diff(p[str(st)][f"{a} < {b}"]) for a, b in ORDER]] for st in steps]
    head = ["rho(energy, T++ NLL)", "rho(energy, own NLL)", "rho(own NLL, T++ NLL)", "energy natural",
            "shuffled", "random", "natural minus shuffled", "shuffled minus random"]
    one = table(["snapshot", *head], rows)
    iv = lambda d, f: fmt_interval(d["point"], *d["interval"], f)
    rows = [[x, st, *[iv(c[k], "{:+.3f}") for k in RHO],
             *[f"{c['mean_energy'][k]:.4g}" for k in ("natural", "shuffled", "random")],
             *[iv(c[f"{a} < {b}"], "{:+.3g}") for a, b in ORDER], c["tokens"]]
            for x, sd in per_seed.items() for st in steps for c in [sd[str(st)]]]
    two = table(["seed", "snapshot", *head, "tokens"], rows)
    return ["Mean over seeds with 95% t intervals over seeds (rho: Spearman over the validation windows' "
            "tokens; the Transformer++ at the same snapshot; the energy after the default thinking steps):",
            one, "Per seed (95% bootstrap intervals over windows):", two]


def draw(path: Path, per_seed: dict, p: dict, steps: list[int]) -> Path:
    """The energy against the Transformer++'s NLL (the first seed, last snapshot), the correlations across
    training, and the mean energy of natural, shuffled and random text."""
    from ebt.paper.thinking import bar_values
    from ebt.plots import pyplot, save_figure

    plt = pyplot()
    last, first_seed = str(steps[-1]), next(iter(per_seed))
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    sc = per_seed[first_seed][last]["scatter"]
    ax[0].scatter(sc["tpp_nll"], sc["energy"], s=4, alpha=0.4)
    ax[0].set(xlabel="Transformer++ NLL of the token (nats)", ylabel="EBT final energy",
              title=f"seed {first_seed}, snapshot {last} (rho over seeds {_rho(p[last]['energy_tpp_nll'])})")
    for j, (key, label) in enumerate((("energy_tpp_nll", "energy vs T++ NLL"),
                                      ("energy_own_nll", "energy vs own NLL"))):
        bars = [bar_values(p[str(st)][key], scale=1, clip=1) for st in steps]
        ax[1].errorbar(steps, [b[0] for b in bars], yerr=list(zip(*[b[1] for b in bars])), marker="o",
                       capsize=3, color=f"C{j}", label=label)
    ax[1].axhline(0, color="grey", lw=0.5)
    ax[1].set(xlabel="training step (snapshot)", ylabel="Spearman rho", title="across training")
    ax[1].legend(fontsize=8)
    kinds = ("natural", "shuffled", "random")
    bars = [bar_values(p[last]["mean_energy"][k], scale=1, clip=float("inf")) for k in kinds]
    ax[2].bar(kinds, [b[0] for b in bars], yerr=list(zip(*[b[1] for b in bars])), capsize=4,
              color=["C2", "C1", "C3"])
    ax[2].set(ylabel="mean final energy", title=f"snapshot {last} (95% t interval over seeds)")
    fig.tight_layout()
    return save_figure(fig, path)


def run(ctx, s: dict) -> Result:
    ebt, tpp = shared_series(ctx, s, "ebt"), shared_series(ctx, s, "transformer")
    windows = split_windows(ctx, s, ("val",))["val"]
    steps = sorted(next(iter(ebt.values())))
    per_seed = {str(seed): {str(st): evaluate_snapshot(ctx, s, ebt[seed][st], tpp[seed][st], windows, seed)
                            for st in steps} for seed in ctx.seeds}
    p = pooled_statistics(per_seed, steps)
    data = {"windows": len(windows), "snapshots": steps, "per_seed": per_seed, "pooled": p}
    return Result(claim_rows(p, steps, lm_budget(ctx, s)), report_tables(per_seed, p, steps), data,
                  lambda path: draw(path, per_seed, p, steps))
