"""The language-model trainings the text claims share: a Transformer++ and an EBT per seed on the same
batches, with snapshots of the weights along training (the paper's "more training" series)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from ebt.config import DataConfig, ModelConfig, RunConfig, TrainConfig, recipe
from ebt.paper.common import (Context, budget, fmt_interval, pooled_verdict, run_dir, seed_interval,
                              train_cached, verdict)


def text_data(ctx: Context) -> dict:
    """The text data set (the embedded corpus, prepared once as `ebt data prepare` does): its vocabulary
    size, pad id and out-of-distribution source."""
    from ebt.data.loader import TokenData
    from ebt.data.shards import prepare_dataset

    if not (Path(ctx.data_dir) / "manifest.json").exists():
        prepare_dataset(ctx.data_dir, tokenizer="bpe", vocab_size=8192, log=ctx.log)
    probe = TokenData(ctx.data_dir, "train", 1)
    manifest = json.loads((Path(ctx.data_dir) / "manifest.json").read_text())
    ood = manifest.get("corpus", {}).get("ood_source") or "ood"
    return {"vocab_size": probe.vocab_size, "pad_id": probe.pad_id, "ood_source": ood}


def lm_run(ctx: Context, s: dict, model: str, seed: int, ebt=None, **train) -> RunConfig:
    """One text training at scale `s` (keys: size, n_layer, d_model, n_head, context, batch, steps,
    warmup, eval_windows; any TrainConfig field in `train` overrides). ebt: an EBTConfig (default S2)."""
    data = text_data(ctx)
    size = {k: s[k] for k in ("n_layer", "d_model", "n_head") if s.get(k)}
    m = ModelConfig(model=model, size=s["size"], context_length=s["context"], vocab_size=data["vocab_size"],
                    pad_token_id=data["pad_id"], ebt=(ebt or recipe("s2")) if model == "ebt" else None, **size)
    kw = dict(out_dir="unused", steps=s["steps"], batch_size=s["batch"], warmup_steps=s["warmup"],
              eval_every=s.get("eval_every", 0), eval_windows=s["eval_windows"], eval_batch_size=32,
              log_every=max(1, s["steps"] // 10), seed=seed, device=ctx.device, progress=False)
    return RunConfig(model=m, data=DataConfig(data_dir=ctx.data_dir), train=TrainConfig(**{**kw, **train}))


def snapshot(run_folder: Path, step: int) -> Path:
    """Keep the weights at `step` (config, model, tokenizer) beside the run: what later evaluations load."""
    src, dst = run_folder / "checkpoint", run_folder / f"step_{step}"
    if not dst.exists():
        tmp = run_folder / f".step_{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy2(src / name, tmp / name)
        if (src / "tokenizer").exists():
            shutil.copytree(src / "tokenizer", tmp / "tokenizer")
        tmp.rename(dst)
    return dst


def train_series(ctx: Context, name: str, run: RunConfig, points: list[int],
                 until: int | None = None) -> dict[int, Path]:
    """Train `run`, stopping at each of `points` to snapshot the weights, up to `until` (a snapshot too;
    default: the run's end; a later call continues the same folder). The schedule is the whole run's at
    every point: the snapshots are one run seen along the way."""
    from ebt.checkpoint import find_checkpoint
    from ebt.config import from_dict, to_dict

    folder = run_dir(ctx.runs, name, run)
    end = run.train.steps if until is None else until
    out = {}
    for k in sorted({p for p in points if p <= end} | {end}):
        if (folder / f"step_{k}").exists():
            out[k] = folder / f"step_{k}"
            continue
        at = json.loads((folder / "checkpoint" / "trainer_state.json").read_text())["step"] \
            if find_checkpoint(folder) else 0
        if at > k:
            raise RuntimeError(f"{folder} is already past step {k} without a snapshot there: remove the folder "
                               f"to train the series again")
        piece = from_dict(RunConfig, {**to_dict(run), "train": {**to_dict(run.train),
                                                                 "stop_at": 0 if k == run.train.steps else k}})
        train_cached(ctx, name, piece)
        out[k] = snapshot(folder, k)
    return out


# The text claims' shared trainings. cpu: the demo's model (4xs: 2 layers, width 128) on twice its batches;
# paper: the official job scripts' xxs pretraining (ebt.config.PRESETS["paper"]), for a GPU cluster.
# points: the snapshots along training; windows: evaluation windows per split.
LM_SCALES = {
    "tiny": dict(size="4xs", n_layer=1, d_model=32, n_head=2, context=16, batch=4, steps=6, warmup=2,
                 eval_windows=8, points=[3, 6], windows=8, seeds=2),
    "cpu": dict(size="4xs", context=64, batch=16, steps=600, warmup=30, eval_windows=96,
                points=[150, 300, 600], windows=128, seeds=3),
    "paper": dict(size="xxs", context=256, batch=256, steps=1_000_000, warmup=10_000, eval_windows=1024,
                  points=[250_000, 500_000, 1_000_000], windows=1024, seeds=3),
}


def shared_series(ctx: Context, s: dict, model: str) -> dict[int, dict[int, Path]]:
    """{seed: {step: snapshot}} of the shared text training of `model` ("ebt": S2, or "transformer")."""
    return {seed: train_series(ctx, f"{model}-s{seed}", lm_run(ctx, s, model, seed), s["points"])
            for seed in ctx.seeds}


SPLITS = ("val", "ood", "dyck", "arithmetic")  # in-domain first; the reasoning sets are generated


# ------------------------------------------------------- evaluation helpers shared by the text claims

def eval_key(*parts) -> str:
    """A short hash of what an evaluation depends on (snapshots, windows, settings), so a cached evaluation
    never serves another scale's or run's numbers. A snapshot counts by its run folder (named by its config's
    hash) and step, not by where the output folder is."""
    named = [f"{p.parent.name}/{p.name}" if isinstance(p, Path) else str(p) for p in parts]
    return hashlib.sha256(json.dumps(named).encode()).hexdigest()[:10]


def split_label(name: str, ood_source: str) -> str:
    return {"val": "validation", "ood": f"held-out {ood_source}", "dyck": "Dyck (generated)",
            "arithmetic": "arithmetic (generated)"}.get(name, name)


def split_windows(ctx, s: dict, names=SPLITS) -> dict[str, torch.Tensor]:
    """s["windows"] windows spread evenly over each split, the same on every run: validation and the held-out
    source from the data; the reasoning sets generated into ctx.out/reasoning_data, as `ebt eval --reasoning`
    does (the data folder is never written)."""
    from ebt.data.loader import TokenData
    from ebt.data.reasoning import GENERATORS, add_reasoning_splits
    from ebt.demo import windows_of

    folder = dict.fromkeys(names, ctx.data_dir)
    made = [n for n in names if n in GENERATORS]
    if made:
        where = ctx.out / "reasoning_data"
        add_reasoning_splits(ctx.data_dir, where, names=made, n=s["reasoning_n"], log=ctx.log)
        folder.update(dict.fromkeys(made, where))
    return {n: windows_of(TokenData(folder[n], f"ood_{n}" if n in GENERATORS else n, s["context"]),
                          s["windows"]) for n in names}


def target_mask(targets: torch.Tensor, pad: int | None) -> torch.Tensor:
    return targets != pad if pad is not None else torch.ones_like(targets, dtype=torch.bool)


def target_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each target's NLL (B, S) under logits (B, S, V), in float64 (as ebt.demo.thinking_runs)."""
    return -torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def window_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed NLL per window, pad targets left out, on the CPU."""
    return (target_nll(logits, targets) * mask).sum(1).cpu()


def temperature_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                    t: float) -> torch.Tensor:
    """window_nll of logits / t, as logsumexp minus the target's logit: no (B, S, V) log-probabilities
    written, the sum in float64."""
    lse = torch.logsumexp(logits.float() / t, -1).double()
    nll = lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double() / t
    return (nll * mask).sum(1).cpu()


@torch.no_grad()
def token_nll(model, windows: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A Transformer++'s NLL of every target (W, S) in float64 and the mask of non-pad targets, on the CPU."""
    nll, mask = [], []
    for chunk in windows.split(batch):
        targets = chunk[:, 1:]
        nll.append(target_nll(model.logits(chunk[:, :-1]), targets).cpu())
        mask.append(target_mask(targets, model.cfg.pad_token_id).cpu())
    return torch.cat(nll), torch.cat(mask)


def lm_budget(ctx, s: dict) -> str:
    """The shared trainings' budgets, and how many times the Transformer++'s FLOPs per token the EBT
    spends."""
    from ebt.flops import train_flops_per_token

    ebt, tpp = lm_run(ctx, s, "ebt", 0), lm_run(ctx, s, "transformer", 0)
    ratio = train_flops_per_token(ebt.model) / train_flops_per_token(tpp.model)
    return (f"{budget(ebt, len(ctx.seeds))} (S2); {budget(tpp, len(ctx.seeds))}; the EBT spends {ratio:.1f}x "
            f"the Transformer++'s training FLOPs per token")


all_of = pooled_verdict  # the thinking claims' name for it


def pct(point: float, lo: float, hi: float) -> str:
    """A relative change with its interval, in percent."""
    return fmt_interval(100 * point, 100 * lo, 100 * hi, "{:+.3g}%")


def points(point: float, lo: float, hi: float) -> str:
    """A difference of relative changes with its interval, in percentage points."""
    return fmt_interval(100 * point, 100 * lo, 100 * hi, "{:+.3g}") + " points"


def pooled(values: list[float], expect: str = "below") -> dict:
    """Mean over seeds with its t interval and the verdict of a figure the paper expects below (or above)
    zero."""
    m, lo, hi = seed_interval(values)
    return {"mean": m, "interval": [lo, hi], "seeds": values, "verdict": verdict(m, lo, hi, expect)}


def shown(p: dict, fmt=pct) -> str:
    return fmt(p["mean"], *p["interval"])
