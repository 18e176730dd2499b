"""What every claim of `ebt reproduce` shares: where it writes, cached training, intervals, verdicts and
the report (a Markdown table, a JSON file and a figure per claim).

A claim module defines CLAIM (a Claim), SCALES ({"tiny" | "cpu" | "paper": its numbers}) and
run(ctx) -> Result. Finished trainings and evaluations are cached under the output folder, so an
interrupted claim resumes where it stopped and a second call only rewrites the report.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ebt.config import RunConfig, from_dict, save_json, to_dict
from ebt.errors import ConfigError

SCALE_NAMES = ("tiny", "cpu", "paper")
# the three verdicts a claim can get (issue 22): the interval decides, never the point alone
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive at this scale"


@dataclass(frozen=True)
class Claim:
    name: str  # the command's argument: `ebt reproduce NAME`
    title: str  # the paper's claim in one line
    figure: str  # where the paper shows it


@dataclass
class Context:
    """What a claim is run with. out: this claim's folder; runs: trainings shared between claims."""
    claim: str
    scale: str
    out: Path
    runs: Path
    data_dir: str
    seeds: tuple[int, ...]
    device: str = "cpu"
    log: Callable = print

    def cached(self, name: str, compute: Callable[[], dict]) -> dict:
        """compute() once: its JSON result is kept in out/cache/name.json and read back on a later call."""
        path = self.out / "cache" / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_json(value, path)
        return json.loads(path.read_text())  # as a later call reads it (lists, not tuples)


@dataclass
class Row:
    """One line of the claims table: what was measured, the paper's figure, our figure with its interval,
    the verdict and the budgets it was measured at."""
    finding: str
    ours: str
    verdict: str
    budget: str = ""


@dataclass
class Result:
    rows: list[Row]  # the first row is the claim itself (its verdict is the claim's); then details, controls
    tables: list[str] = field(default_factory=list)  # further Markdown (per seed, per setting)
    data: dict = field(default_factory=dict)  # every number behind the rows, for the JSON file
    figure: Callable[[Path], Path] | None = None  # draws the claim's figure at the given path


# ------------------------------------------------------------------------------------------- training

def run_dir(runs: Path, name: str, run: RunConfig) -> Path:
    """A training's folder: its name and a hash of its whole config, so claims share identical runs and
    never reuse a different one."""
    cfg = to_dict(run)
    for key in ("out_dir", "progress", "stop_at"):  # where it is written, its display, where it pauses
        cfg["train"].pop(key)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    return runs / f"{name}-{digest}"


def train_cached(ctx: Context, name: str, run: RunConfig) -> tuple[Path, dict]:
    """Train `run` into its shared folder, or reuse it finished, or resume it interrupted. Returns the folder
    and the final metrics."""
    from ebt.checkpoint import find_checkpoint
    from ebt.train import train

    out = run_dir(ctx.runs, name, run)
    run = from_dict(RunConfig, {**to_dict(run), "train": {**to_dict(run.train), "out_dir": str(out)}})
    done = out / "final_metrics.json"
    if done.exists() and json.loads(done.read_text()).get("step") == run.train.steps:
        return out, json.loads(done.read_text())
    ctx.log(f"[{ctx.claim}] training {name} into {out}")
    return out, train(run, resume=find_checkpoint(out) is not None, log=ctx.log)


# -------------------------------------------------------------------------------------- uncertainty

def bootstrap(stat: Callable, *sizes: int, reps: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of stat(idx, ...): one index set per group of units (windows,
    images), each resampled with replacement."""
    g = torch.Generator().manual_seed(seed)
    draws = sorted(stat(*(torch.randint(0, n, (n,), generator=g) for n in sizes)) for _ in range(reps))
    return draws[int(0.025 * reps)], draws[int(0.975 * reps) - 1]


def seed_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean over training seeds and its 95% Student-t interval (nan with one seed): ebt.scale.mean_ci."""
    from ebt.scale import mean_ci

    ci = mean_ci(values)
    return ci["mean"], *ci["ci95"]


def verdict(point: float, lo: float, hi: float, expect: str = "below") -> str:
    """The verdict on a figure the paper expects below (or above) zero, from the figure and its 95% interval:
    reproduced when the interval lies on the paper's side, not reproduced when it lies on the other, else
    inconclusive at this scale."""
    if expect not in ("below", "above"):
        raise ValueError(f"expect must be 'below' or 'above', not {expect!r}")
    if math.isnan(lo) or math.isnan(hi):
        return INCONCLUSIVE
    lo, hi = (lo, hi) if expect == "below" else (-hi, -lo)
    if hi < 0:
        return REPRODUCED
    if lo > 0:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def pooled_verdict(verdicts: list[str]) -> str:
    """The verdict on a conjunction (every seed, setting or axis): reproduced if every part is, not
    reproduced if any part is not, else inconclusive."""
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return NOT_REPRODUCED if NOT_REPRODUCED in verdicts else INCONCLUSIVE


def fmt_interval(point: float, lo: float, hi: float, fmt: str = "{:+.3g}") -> str:
    """'point [lo, hi]' with one format; an undefined interval is said so."""
    if math.isnan(lo) or math.isnan(hi):
        return f"{fmt.format(point)} (no interval: one seed)"
    return f"{fmt.format(point)} [{fmt.format(lo)}, {fmt.format(hi)}]"


# ------------------------------------------------------------------------------------------ budgets

def budget(run: RunConfig, seeds: int, flops_per_unit: float | None = None) -> str:
    """The training budget beside every comparison: steps, tokens (frames, images) and training FLOPs per
    token (text: ebt.flops; other candidates: give flops_per_unit, e.g. from ebt.flops.count_train_flops)."""
    from ebt.flops import train_flops_per_token

    t, m = run.train, run.model
    unit = "images" if m.candidate == "image" else "frames" if m.candidate == "frames" else "tokens"
    seen = t.steps * t.batch_size * (1 if m.candidate == "image" else m.context_length)
    per = flops_per_unit if flops_per_unit is not None else \
        train_flops_per_token(m) if m.candidate == "tokens" else None
    flops = "" if per is None else f", {per / 1e6:.3g} MFLOP/{unit[:-1]}"
    name = f"{m.model} {m.n_layer} layers x {m.d_model}"
    return f"{name}: {t.steps} steps, {seen:,} {unit}{flops}, {seeds} seed(s)"


# ------------------------------------------------------------------------------------------- report

def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(ctx: Context, claim: Claim, result: Result, command: str) -> dict:
    """CLAIM.md, CLAIM.json and CLAIM.png in the claim's folder. Returns the JSON content."""
    md = [f"# {claim.title}", "", f"Paper: {claim.figure}. Scale: {ctx.scale}; training seeds: "
          f"{', '.join(map(str, ctx.seeds))}. Command: `{command}`.", "",
          table(["finding", "ours (95% interval)", "verdict", "budget"],
                [[r.finding, r.ours, r.verdict, r.budget] for r in result.rows])]
    for extra in result.tables:
        md += ["", extra]
    figure = None
    if result.figure is not None:
        figure = result.figure(ctx.out / f"{claim.name}.png")
        md += ["", f"![{claim.name}]({Path(figure).name})"]
    (ctx.out / f"{claim.name}.md").write_text("\n".join(md) + "\n")
    content = {"claim": claim.name, "title": claim.title, "paper": claim.figure, "scale": ctx.scale,
               "seeds": list(ctx.seeds), "command": command,
               "rows": [vars(r) for r in result.rows], "verdict": result.rows[0].verdict,
               "data": result.data, "figure": str(figure) if figure else None}
    save_json(content, ctx.out / f"{claim.name}.json")
    return content


def check_scale(scale: str, scales: dict) -> dict:
    if scale not in scales:
        raise ConfigError(f"unknown scale {scale!r}: use one of {', '.join(scales)}")
    return scales[scale]
