"""Evaluation: token-weighted loss and perplexity, exp(sum NLL / tokens), never a mean of batch perplexities."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from ebt.checkpoint import unwrap


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked ('auto' or 'bf16'); float32/64 runs need no context."""
    if precision in ("auto", "bf16") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fmt_ppl(ppl: float) -> str:
    """Perplexities of untrained models are astronomically large: print those in scientific notation."""
    return f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.2e}"


@torch.no_grad()
def evaluate_lm(model, data, batch_size: int = 32, max_windows: int | None = None, device="cpu",
                precision: str = "auto", seed: int = 1234, noise: float | None = None) -> dict:
    """Token-weighted validation loss over `data` (a TokenData split). DDP-aware: each rank scores its
    share of the windows and the sums are all-reduced, so every rank returns the same numbers.

    An EBT validates as the official code: eval_steps steps, its trained Langevin noise before every
    step (noise None; 0: none, another value: that std). Its random starts and noise are drawn from
    seed + rank, so an evaluation repeats exactly and another seed draws other noise."""
    device = torch.device(device)
    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    dist_on = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist_on else (0, 1)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # nll, tokens
    kw = {} if noise is None else {"noise": noise}  # only an EBT's forward takes it
    with seeded(seed + rank, device):
        for batch in data.eval_batches(batch_size, rank=rank, world_size=world, max_windows=max_windows):
            with autocast(device, precision):
                out = bare(batch.to(device, non_blocking=True), **kw)
            sums[0] += out["nll_sum"].double()
            sums[1] += out["n_tokens"].double()
    if dist_on:
        dist.all_reduce(sums)
    bare.train(was_training)
    nll, n = sums.tolist()
    if n == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    loss = nll / n
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(n)}


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Fix the random starts of an evaluation without disturbing the caller's random stream."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def evaluate_thinking(model, data, think_cfg, batch_size: int = 16, max_windows: int | None = None,
                      device="cpu", seed: int = 0) -> dict:
    """Token-weighted perplexity of an EBT's thinking (ebt.think.think) on a TokenData split, with the
    optimisation steps actually taken per token and the energy evaluations ("forward passes", each a
    forward and a first-order backward) per token."""
    from ebt.think import think

    device = torch.device(device)
    bare = unwrap(model).eval()
    pad = bare.cfg.pad_token_id
    nll, n, steps, passes, batches = 0.0, 0, 0.0, 0, 0
    with seeded(seed, device):
        for batch in data.eval_batches(batch_size, max_windows=max_windows):
            batch = batch.to(device)
            tokens, targets = batch[:, :-1], batch[:, 1:]
            out = think(bare, tokens, think_cfg)
            logp = torch.log_softmax(out.z.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            mask = targets != pad if pad is not None else torch.ones_like(targets, dtype=torch.bool)
            nll -= float(logp[mask].double().sum())
            n += int(mask.sum())
            steps += float(out.steps_used[mask].double().sum())
            passes += out.passes
            batches += 1
    loss = nll / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": n, "steps_per_token": steps / max(n, 1),
            "passes_per_token": passes / max(batches, 1)}


def thinking_grid(model, splits: dict, steps: list[int], candidates: list[int], tol: float | None,
                  batch_size: int = 16, max_windows: int | None = None, device="cpu", baseline=None,
                  log=print, final_landscape: bool = False, noise: float | None = None) -> dict:
    """Perplexity of an EBT for a grid of thinking budgets on several splits ({name: TokenData}).

    steps: per landscape (ThinkConfig.steps; final_landscape: on the last one only); noise: the Langevin
    std (None: the trained one). The first row (the first step count, one candidate) is the reference for
    the relative improvement; every configuration starts from the same random candidates and draws the
    same noise (seeded). `baseline`, a Transformer++, is scored once per split as a flat reference row."""
    from ebt.think import ThinkConfig

    rows = []
    configs = [(s, c, None) for s in steps for c in candidates]
    if tol is not None:
        configs += [(max(steps), c, tol) for c in candidates]
    where = "on the last landscape" if final_landscape else "per landscape"
    where = where if model.cfg.ebt.landscapes > 1 else ""
    for s, c, t in configs:
        row = {"model": "ebt", "steps": s, "where": where, "candidates": c, "tol": t, "results": {}}
        cfg = ThinkConfig(steps=s, final_landscape=final_landscape, candidates=c, tol=t, noise=noise)
        for name, data in splits.items():
            row["results"][name] = evaluate_thinking(model, data, cfg, batch_size, max_windows, device)
        rows.append(row)
        log("  " + format_row(row, rows[0]))
    base = rows[0]
    for row in rows:
        for name, r in row["results"].items():
            r["improvement_pct"] = 100 * (base["results"][name]["ppl"] - r["ppl"]) / base["results"][name]["ppl"]
    out = {"rows": rows}
    if baseline is not None:
        out["baseline"] = {name: evaluate_lm(baseline, data, batch_size, max_windows, device)
                           for name, data in splits.items()}
    return out


def _steps_label(row) -> str:
    """'3 steps', or with several landscapes '3 steps per landscape' (or 'on the last landscape')."""
    return f"{row['steps']} steps" + (f" {row['where']}" if row.get("where") else "")


def format_row(row, base) -> str:
    cells = [f"steps {row['steps']:>2} x {row['candidates']:>2} cand" + (f" tol {row['tol']:g}" if row["tol"] else "")]
    for name, r in row["results"].items():
        cells.append(f"{name} {fmt_ppl(r['ppl'])}")
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
        r0 = row["results"][names[0]]
        cells = [label, f"{r0['passes_per_token']:.0f}", f"{r0['steps_per_token']:.2f}"]
        for n in names:
            r = row["results"][n]
            cells += [fmt_ppl(r["ppl"]), f"{r['improvement_pct']:+.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    if "baseline" in grid:
        cells = ["Transformer++ (reference)", "1", "-"]
        for n in names:
            cells += [fmt_ppl(grid["baseline"][n]["ppl"]), "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
