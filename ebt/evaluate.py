"""Evaluation: token-weighted loss and perplexity, exp(sum NLL / tokens), never a mean of batch
perplexities."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ebt.checkpoint import unwrap
from ebt.runtime import autocast, seeded


def eval_batch_count(data, batch_size: int, max_windows: int | None = None) -> int:
    """How many batches one process's `data.eval_batches(batch_size, max_windows=...)` yields."""
    n = len(data) if max_windows is None else min(max_windows, len(data))
    return -(-n // batch_size)


def progress_bar(total: int, desc: str = "eval", enabled: bool = True, file=None):
    """A tqdm bar with a time-left estimate; off a terminal (a log file) it redraws every 30 s, not 10/s."""
    import sys

    from tqdm.auto import tqdm

    file = file or sys.stderr
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, file=file,
                mininterval=0.1 if file.isatty() else 30.0)


def fmt_ppl(ppl: float) -> str:
    """Perplexities of untrained models are astronomically large: print those in scientific notation."""
    return f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.2e}"


@torch.no_grad()
def evaluate_lm(model, data, batch_size: int = 32, max_windows: int | None = None, device="cpu",
                precision: str = "auto", seed: int = 1234, noise: float | None = None, plan=None,
                bar=None) -> dict:
    """Token-weighted validation loss over `data` (a TokenData split). DDP-aware: each rank scores its
    share of the windows and the sums are all-reduced, so every rank returns the same numbers.

    An EBT validates as the official code: eval_steps steps, its trained Langevin noise before every
    step (noise None; 0: none, another value: that std). Its random starts and noise are drawn from
    seed + rank, so an evaluation repeats exactly and another seed draws other noise. plan: the run's
    paths (ebt.fast.plan.Plan; an EBT's default when None); bar: a progress bar advanced per batch."""
    device = torch.device(device)
    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    dist_on = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist_on else (0, 1)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # nll, tokens
    noise_kw = {} if noise is None else {"noise": noise}  # only an EBT's forward takes these
    noise_kw.update({} if plan is None else {"plan": plan})
    with seeded(seed + rank, device):
        for batch in data.eval_batches(batch_size, rank=rank, world_size=world, max_windows=max_windows):
            with autocast(device, precision):
                out = bare(batch.to(device, non_blocking=True), **noise_kw)
            sums[0] += out["nll_sum"].double()
            sums[1] += out["n_tokens"].double()
            if bar is not None:
                bar.update(1)
    if dist_on:
        dist.all_reduce(sums)
    bare.train(was_training)
    nll, n = sums.tolist()
    if n == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    loss = nll / n
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(n)}


def evaluate_thinking(model, data, think_cfg, batch_size: int = 16, max_windows: int | None = None,
                      device="cpu", seed: int = 0, plan=None, bar=None) -> dict:
    """Token-weighted perplexity of an EBT's thinking (ebt.think.think) on a TokenData split, with the
    optimisation steps actually taken per token and the energy evaluations ("forward passes", each a
    forward and a first-order backward) per token. plan: the run's paths (None: the device's default);
    bar: a progress bar advanced per batch by its cost (think_cost)."""
    from ebt.fast.plan import resolve_plan
    from ebt.think import think

    device = torch.device(device)
    bare = unwrap(model).eval()
    step = (plan or resolve_plan(bare, device)).think_step(bare, think_cfg)
    pad = bare.cfg.pad_token_id
    nll, n, steps, passes, batches = 0.0, 0, 0.0, 0, 0
    with seeded(seed, device):
        for batch in data.eval_batches(batch_size, max_windows=max_windows):
            batch = batch.to(device)
            tokens, targets = batch[:, :-1], batch[:, 1:]
            out = think(bare, tokens, think_cfg, step=step)
            logp = torch.log_softmax(out.z.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            mask = targets != pad if pad is not None else torch.ones_like(targets, dtype=torch.bool)
            nll -= float(logp[mask].double().sum())
            n += int(mask.sum())
            steps += float(out.steps_used[mask].double().sum())
            passes += out.passes
            batches += 1
            if bar is not None:
                bar.update(think_cost(bare, think_cfg))
    loss = nll / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": n,
            "steps_per_token": steps / max(n, 1), "passes_per_token": passes / max(batches, 1)}


def think_cost(model, cfg) -> int:
    """A thinking batch's relative cost for progress estimates: energy evaluations per candidate
    (its steps and the final scoring) times candidates."""
    return ((cfg.steps or model.inference_steps()) + int(cfg.score_final)) * cfg.candidates


def thinking_grid(model, splits: dict, steps: list[int], candidates: list[int], tol: float | None,
                  batch_size: int = 16, max_windows: int | None = None, device="cpu", baseline=None,
                  log=None, final_landscape: bool = False, noise: float | None = None, plan=None,
                  progress: bool = False) -> dict:
    """Perplexity of an EBT for a grid of thinking budgets on several splits ({name: TokenData}).

    steps: per landscape (ThinkConfig.steps; final_landscape: on the last one only); noise: the Langevin
    std (None: the trained one). The first row (the first step count, one candidate) is the reference for
    the relative improvement; every configuration starts from the same random candidates and draws the
    same noise (seeded). `baseline`, a Transformer++, is scored once per split as a flat reference row.
    plan: the run's paths (ebt.fast.plan.Plan; None: the device's default). progress: one bar for the
    whole grid, its current cell in the description; log: where each finished row goes (None: printed
    above the bar)."""
    from tqdm.auto import tqdm

    from ebt.think import ThinkConfig

    rows = []
    configs = [(s, c, None) for s in steps for c in candidates]
    if tol is not None:
        configs += [(max(steps), c, tol) for c in candidates]
    where = "on the last landscape" if final_landscape else "per landscape"
    where = where if model.cfg.ebt.landscapes > 1 else ""
    batches = sum(eval_batch_count(data, batch_size, max_windows) for data in splits.values())
    cost = sum(think_cost(model, ThinkConfig(steps=s, candidates=c)) for s, c, _ in configs) * batches
    bar = progress_bar(cost + (batches if baseline is not None else 0), "thinking", progress)
    log = log or tqdm.write
    for s, c, t in configs:
        row = {"model": "ebt", "steps": s, "where": where, "candidates": c, "tol": t, "results": {}}
        cfg = ThinkConfig(steps=s, final_landscape=final_landscape, candidates=c, tol=t, noise=noise)
        for name, data in splits.items():
            bar.set_description(f"steps {s} x {c} cand{f' tol {t:g}' if t else ''} | {name}")
            row["results"][name] = evaluate_thinking(model, data, cfg, batch_size, max_windows, device,
                                                     plan=plan, bar=bar)
        rows.append(row)
        log("  " + format_row(row, rows[0]))
    base = rows[0]
    for row in rows:
        for name, result in row["results"].items():
            base_ppl = base["results"][name]["ppl"]
            result["improvement_pct"] = 100 * (base_ppl - result["ppl"]) / base_ppl
    out = {"rows": rows}
    if baseline is not None:
        out["baseline"] = {}
        for name, data in splits.items():
            bar.set_description(f"Transformer++ | {name}")
            out["baseline"][name] = evaluate_lm(baseline, data, batch_size, max_windows, device, bar=bar)
    bar.close()
    return out


def _steps_label(row) -> str:
    """'3 steps', or with several landscapes '3 steps per landscape' (or 'on the last landscape')."""
    return f"{row['steps']} steps" + (f" {row['where']}" if row.get("where") else "")


def format_row(row, base) -> str:
    tol = f" tol {row['tol']:g}" if row["tol"] else ""
    cells = [f"steps {row['steps']:>2} x {row['candidates']:>2} cand" + tol]
    for name, result in row["results"].items():
        cells.append(f"{name} {fmt_ppl(result['ppl'])}")
    return " | ".join(cells)


def grid_markdown(grid: dict) -> str:
    """The thinking grid as a Markdown table: perplexity and relative improvement per split."""
    names = list(grid["rows"][0]["results"])
    head = "| thinking | forward passes / token | steps / token (" + names[0] + ") | " + " | ".join(
        f"{n} ppl | {n} vs trained" for n in names) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(names))]
    for row in grid["rows"]:
        tol = f", adaptive tol {row['tol']:g}" if row["tol"] else ""
        label = f"{_steps_label(row)}, {row['candidates']} cand.{tol}"
        first = row["results"][names[0]]
        cells = [label, f"{first['passes_per_token']:.0f}", f"{first['steps_per_token']:.2f}"]
        for n in names:
            result = row["results"][n]
            cells += [fmt_ppl(result["ppl"]), f"{result['improvement_pct']:+.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    if "baseline" in grid:
        cells = ["Transformer++ (reference)", "1", "-"]
        for n in names:
            cells += [fmt_ppl(grid["baseline"][n]["ppl"]), "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
