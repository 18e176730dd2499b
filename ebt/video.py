"""Continuous sequences (docs/method.md 5): evaluating next-frame prediction on moving-digit videos.

Next-frame Smooth L1 and MSE (in feature space), multi-step rollouts (the model's own predictions fed
back as context), per-frame energy along a clip (the paper's uncertainty figure: energy should rise where
the next frame is less predictable, such as when a digit bounces) and picture strips of real against
predicted frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ebt.fast.plan import resolve_plan
from ebt.runtime import seeded
from ebt.think import ThinkConfig, think
from ebt.plots import pyplot, save_figure


def predict_next(model, context: torch.Tensor,
                 think_cfg: ThinkConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predicted next-frame features (B, S, F) for context frames (B, S, F), and an EBT's final energy."""
    if hasattr(model, "energy_from"):
        think_cfg = think_cfg or ThinkConfig()
        out = think(model, context, think_cfg, step=resolve_plan(model).think_step(model, think_cfg))
        return out.z, out.energy
    with torch.no_grad():
        return model.logits(context), None


@torch.no_grad()
def next_frame_errors(model, data, think_cfg=None, batch_size: int = 32, max_windows: int | None = None,
                      seed: int = 0) -> dict:
    """Frame-weighted next-frame Smooth L1 and MSE over a ClipData split."""
    model.eval()
    smooth_l1 = mse = 0.0
    n = 0
    dev = next(model.parameters()).device
    with seeded(seed, dev):
        for window in data.eval_batches(batch_size, max_windows=max_windows):
            window = window.to(dev, model.tok_emb.weight.dtype)
            pred, target = predict_next(model, window[:, :-1], think_cfg)[0], window[:, 1:]
            smooth_l1 += float(F.smooth_l1_loss(pred, target, beta=1.0, reduction="none").mean(-1).sum())
            mse += float((pred - target).pow(2).mean(-1).sum())
            n += window.shape[0] * (window.shape[1] - 1)
    return {"smooth_l1": smooth_l1 / n, "mse": mse / n, "frames": n}


@torch.no_grad()
def rollout_errors(model, clips: torch.Tensor, context: int, horizon: int = 8, think_cfg=None,
                   seed: int = 0) -> dict:
    """Feed `context` true frames, then predict `horizon` frames one at a time, each prediction appended
    to the context. Returns the MSE per horizon step (averaged over clips) and its mean."""
    model.eval()
    dev = next(model.parameters()).device
    clips = clips.to(dev, model.tok_emb.weight.dtype)
    if clips.shape[1] < context + horizon:
        raise ValueError(f"clips have {clips.shape[1]} frames; a rollout needs context {context} + "
                         f"horizon {horizon}")
    seq = clips[:, :context]
    per_step = []
    with seeded(seed, dev):
        for h in range(horizon):
            window = seq[:, -model.cfg.context_length:]
            pred, _ = predict_next(model, window, think_cfg)
            next_frame = pred[:, -1:]
            per_step.append(float((next_frame[:, 0] - clips[:, context + h]).pow(2).mean()))
            seq = torch.cat([seq, next_frame], 1)
    return {"mse_per_step": per_step, "mse_mean": sum(per_step) / horizon}


@torch.no_grad()
def energy_along_clips(model, clips: torch.Tensor, bounces: torch.Tensor, think_cfg=None,
                       seed: int = 0) -> dict:
    """Final energy of each predicted frame (B, T-1): prediction i is frame i+1. Compares the mean energy
    of predictions whose target frame follows a bounce with the others."""
    model.eval()
    dev = next(model.parameters()).device
    clips = clips.to(dev, model.tok_emb.weight.dtype)
    S = min(model.cfg.context_length, clips.shape[1] - 1)
    with seeded(seed, dev):
        _, energy = predict_next(model, clips[:, :S], think_cfg)
    # frame t+1 is hard to predict when a bounce happens between t and t+1 (flag at frame t+1)
    hard = bounces[:, 1:S + 1].to(dev)
    energy = energy.double()
    return {"energy": energy.cpu(), "hard": hard.cpu(),
            "mean_energy_bounce": float(energy[hard].mean()) if hard.any() else float("nan"),
            "mean_energy_other": float(energy[~hard].mean()) if (~hard).any() else float("nan")}


def plot_energy(energy: torch.Tensor, hard: torch.Tensor, out: str | Path, clips_shown: int = 4) -> Path:
    """Per-frame energy along a few clips, with the frames that follow a bounce marked."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for c in range(min(clips_shown, energy.shape[0])):
        line, = ax.plot(range(1, energy.shape[1] + 1), energy[c].numpy(), marker="o", ms=3,
                        label=f"clip {c}")
        idx = hard[c].nonzero().flatten()
        ax.scatter((idx + 1).numpy(), energy[c, idx].numpy(), s=70, facecolors="none",
                   edgecolors=line.get_color())
    ax.set_xlabel("predicted frame (circled: a digit bounced)")
    ax.set_ylabel("energy")
    ax.set_title("EBT energy of each predicted frame along a few clips", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)


def frame_strip(rows: dict[str, "object"], out: str | Path) -> Path:
    """A PNG with one row of frames per entry (name -> uint8 array (T, H, W))."""
    plt = pyplot()

    names = list(rows)
    T = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(names), T, figsize=(T * 0.9, len(names) * 1.0), squeeze=False)
    for row, name in enumerate(names):
        for t in range(T):
            ax = axes[row][t]
            ax.axis("off")
            if t < len(rows[name]):
                ax.imshow(rows[name][t], cmap="gray", vmin=0, vmax=255)
        axes[row][0].set_title(name, fontsize=7, loc="left")
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


def load_features(ckpt):
    from ebt.checkpoint import resolve
    from ebt.data.video import FrameFeatures
    from ebt.errors import CheckpointError

    path = resolve(ckpt) / "features" / "features.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path.parent.parent} has no frame encoder (features/): "
                              f"it was not trained on video")
    return FrameFeatures.load(path)


def video_report(checkpoint, data_dir: str | None = None, baseline=None, think_steps=None, candidates=(1,),
                 split: str = "test", max_windows: int | None = 512, clips: int = 64, horizon: int = 8,
                 out_dir: str | Path = "video_eval", device="cpu", log=print, final_landscape: bool = False,
                 noise: float | None = None) -> dict:
    """The video table (next-frame and rollout errors for the EBT at several thinking budgets and the
    baseline), the energy-along-clips plot and a real/predicted frame strip. think_steps: per landscape
    (default: the official inference default x 1, 2, 4; final_landscape: on the last one only); noise:
    the Langevin std (None: the trained one)."""
    import json

    from ebt.checkpoint import read_config, resolve
    from ebt.models import load_model
    from ebt.data.video import ClipData

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = resolve(checkpoint)
    data_dir = data_dir or read_config(ckpt)["data"]["data_dir"]
    model = load_model(ckpt, device=device).eval()
    feats = load_features(ckpt)
    S = model.cfg.context_length
    data = ClipData(data_dir, split, S, feats)
    all_clips = data.clips()[:clips]
    context = min(S, all_clips.shape[1] - horizon)
    steps_list = think_steps or sorted({model.inference_steps() * m for m in (1, 2, 4)})
    rows = _ebt_rows(model, data, all_clips, context, horizon, steps_list, candidates, final_landscape,
                     noise, max_windows, log)
    base_model = base_data = None
    if baseline is not None:
        base_model = load_model(resolve(baseline), device=device).eval()
        base_data = ClipData(data_dir, split, base_model.cfg.context_length, load_features(baseline))
        base = {"model": base_model.cfg.model,
                **next_frame_errors(base_model, base_data, max_windows=max_windows),
                "rollout": rollout_errors(base_model, base_data.clips()[:clips], context, horizon)}
        rows.append(base)
        log(f"  baseline {base['model']}: next-frame smooth L1 {base['smooth_l1']:.4f} "
            f"mse {base['mse']:.4f} | rollout mse {base['rollout']['mse_mean']:.4f}")
    bounce_file = Path(data_dir) / f"{split}_bounces.npy"  # unknown (absent) for users' own clips
    bounces = torch.from_numpy(np.load(bounce_file)[:clips]) if bounce_file.is_file() else \
        torch.zeros(all_clips.shape[:2], dtype=torch.bool)
    energy = energy_along_clips(model, all_clips, bounces, ThinkConfig(noise=noise))
    plot_energy(energy["energy"], energy["hard"], out_dir / "energy_along_clips.png")
    real = np.load(Path(data_dir) / f"{split}.npy", mmap_mode="r")[0]
    strip = _strip(model, feats, all_clips, real, noise, base_model, base_data, baseline)
    frame_strip(strip, out_dir / "frames.png")
    report = {"checkpoint": str(ckpt), "data": data_dir, "split": split, "rows": rows,
              "energy": {k: energy[k] for k in ("mean_energy_bounce", "mean_energy_other")},
              "png": [str(out_dir / "energy_along_clips.png"), str(out_dir / "frames.png")]}
    report["files"] = {str(out_dir / "video_eval.md"): "next-frame and rollout errors (Markdown)",
                       str(out_dir / "video_eval.json"): "this report as JSON",
                       str(out_dir / "energy_along_clips.png"): "figure: energy along clips, bounces marked",
                       str(out_dir / "frames.png"): "figure: real and predicted frames"}
    (out_dir / "video_eval.json").write_text(json.dumps(report, indent=2))
    (out_dir / "video_eval.md").write_text(video_markdown(report))
    return report


def _ebt_rows(model, data, all_clips, context, horizon, steps_list, candidates, final_landscape, noise,
              max_windows, log) -> list[dict]:
    """Next-frame and rollout errors of the EBT for each thinking budget (steps x candidates)."""
    rows = []
    where = "on the last landscape" if final_landscape else "per landscape"
    where = where if model.cfg.ebt.landscapes > 1 else ""
    for steps in steps_list:
        for c in candidates:
            cfg = ThinkConfig(steps=steps, final_landscape=final_landscape, candidates=c, noise=noise)
            row = {"model": "ebt", "steps": steps, "where": where, "candidates": c,
                   **next_frame_errors(model, data, cfg, max_windows=max_windows),
                   "rollout": rollout_errors(model, all_clips, context, horizon, cfg)}
            rows.append(row)
            log(f"  EBT {steps} steps x {c}: next-frame smooth L1 {row['smooth_l1']:.4f} "
                f"mse {row['mse']:.4f} | rollout mse {row['rollout']['mse_mean']:.4f}")
    return rows


def _strip(model, feats, all_clips, real, noise, base_model, base_data, baseline) -> dict:
    """Frame strip rows: real frames, the EBT's one-step predictions, and (if given) the baseline's."""
    S = model.cfg.context_length
    with seeded(0, next(model.parameters()).device):  # the start and any noise repeat
        pred, _ = predict_next(model, all_clips[:1, :S].to(model.tok_emb.weight.dtype),
                               ThinkConfig(noise=noise))
    strip = {"real frames 1..": np.asarray(real[1:S + 1]),
             "EBT next-frame prediction": feats.decode(pred[0].cpu())}
    if base_model is not None:
        base_clip = base_data.clips()[:1, :base_model.cfg.context_length]
        base_pred, _ = predict_next(base_model, base_clip.to(base_model.tok_emb.weight.dtype))
        strip[f"{base_model.cfg.model} prediction"] = load_features(baseline).decode(base_pred[0].cpu())
    strip["real decoded through the encoder"] = feats.decode(all_clips[0, 1:S + 1])
    return strip


def video_markdown(report: dict) -> str:
    lines = ["| model | thinking | next-frame Smooth L1 | next-frame MSE | rollout MSE (mean of 8) "
             "| rollout MSE at 1 / 4 / 8 |",
             "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        where = f" {row['where']}" if row.get("where") else ""
        thinking = f"{row['steps']} steps{where} x {row['candidates']} cand." if "steps" in row else "-"
        rollout = row["rollout"]["mse_per_step"]
        lines.append(f"| {row['model']} | {thinking} | {row['smooth_l1']:.4f} | {row['mse']:.4f} | "
                     f"{row['rollout']['mse_mean']:.4f} | "
                     f"{rollout[0]:.4f} / {rollout[min(3, len(rollout) - 1)]:.4f} / {rollout[-1]:.4f} |")
    energy = report["energy"]
    lines.append(f"\nMean EBT energy of predicted frames right after a bounce: "
                 f"{energy['mean_energy_bounce']:.4f}; other frames: {energy['mean_energy_other']:.4f}.")
    return "\n".join(lines) + "\n"
