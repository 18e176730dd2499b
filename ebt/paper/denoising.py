"""Claim 5 (denoising): the image EBT denoises better than a DiT, in and out of distribution, at the paper's
noise levels (0.1, the training level, and 0.2 on the official schedule, ebt.models.dit.level_schedule), and
its features are better for a linear probe.

Both models train on Fashion-MNIST over one learning-rate grid (seed 0); each keeps the learning rate and, per
noise level, the forward passes (EBT steps; DiT DDIM steps x recursive applications) with the best PSNR on
validation images: half of Fashion-MNIST's test split, disjoint from the other half, which gives the
in-distribution test numbers. MNIST's test digits are the out-of-distribution images. Every model sees the
same noisy images. Per seed: the PSNR difference EBT minus DiT with a bootstrap over images; over seeds: a t
interval. The linear probe (ebt.denoise.linear_probe) is scored on the in-distribution test images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ebt.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ebt.models.dit import TRAIN_LEVEL
from ebt.paper.common import (Claim, Context, Result, Row, bootstrap, fmt_interval, pooled_verdict, run_dir,
                              seed_interval, table, train_cached, verdict)

CLAIM = Claim("denoising", "The EBT denoises images better than a DiT in and out of distribution (PSNR "
                           "against forward passes), and its features probe better",
              "denoising table, PSNR-vs-passes figure (COCO; ImageNet probe)")

MODELS = ("ebt", "dit")
LABELS = {"ebt": "EBT", "dit": "DiT"}
LEVELS = (TRAIN_LEVEL, 0.2)  # the paper's in-distribution (training) and out-of-distribution noise levels
ID_SET, OOD_SET = "fashion_mnist", "mnist"
SETS = {"test": "Fashion-MNIST test images (in distribution)", "ood": "MNIST digits (out of distribution)"}
SHORT = {"test": "Fashion", "ood": "MNIST"}

# lrs: the grid both models are tuned over (seed 0, validation PSNR at the training level); images: per set
# (validation, in-distribution test, out-of-distribution test); probe_images: Fashion-MNIST training images
# the probe fits on; ebt_steps: the EBT's steps 1..N; ddim_steps x ddim_applications: the DiT's settings;
# weight_decay per model. cpu: 10 trainings (3 learning rates + 2 more seeds per model) and their
# evaluations (times: benchmarks/RESULTS.md). paper: the official job scripts' denoisers (alexiglad/EBT
# job_scripts/img/pretrain_denoising: size large, batch 128, 100k steps, warm-up 10k, lr 1e-4, DiT weight
# decay 0, 64 patches per image) on this library's images, not COCO; the paper's 300-pass DiT (100 x 3).
SCALES = {
    "tiny": dict(size="4xs", n_layer=1, d_model=32, n_head=2, image_size=32, patch=8, batch=4, steps=3,
                 warmup=1, lrs=[1e-3, 3e-3], weight_decay={"ebt": 0.01, "dit": 0.01}, images=3,
                 probe_images=20, probe_epochs=20, ebt_steps=2, ddim_steps=[1, 2], ddim_applications=2,
                 seeds=2),
    "cpu": dict(size="4xs", n_layer=2, d_model=64, n_head=2, image_size=32, patch=8, batch=32, steps=1000,
                warmup=100, lrs=[3e-4, 1e-3, 3e-3], weight_decay={"ebt": 0.01, "dit": 0.01}, images=256,
                probe_images=2000, probe_epochs=200, ebt_steps=3, ddim_steps=[1, 2, 5, 10, 20],
                ddim_applications=2, seeds=3),
    "paper": dict(size="large", image_size=32, patch=4, batch=128, steps=100_000, warmup=10_000,
                  lrs=[3e-5, 1e-4, 3e-4], weight_decay={"ebt": 0.01, "dit": 0.0}, images=5000,
                  probe_images=10_000, probe_epochs=200, ebt_steps=3, ddim_steps=[1, 10, 50, 100],
                  ddim_applications=3, seeds=3),
}


# ------------------------------------------------------------------------------------------------ data

def image_cache(ctx: Context) -> str:
    """Where the image packages are fetched: beside the text data (data/downloads by default)."""
    return str(Path(ctx.data_dir).parent / "downloads")


def spread(total: int, n: int) -> torch.Tensor:
    """min(n, total) indices spread evenly over 0..total-1 (the sets are sorted by class: no prefix)."""
    n = min(n, total)
    return (torch.arange(n) * total) // n


def image_sets(ctx: Context, s: dict) -> dict:
    """The evaluation images: validation and test from alternate images of Fashion-MNIST's test split
    (disjoint), MNIST's test digits, and Fashion-MNIST training images (with labels) for the probe."""
    from ebt.data.images import load_images

    fashion = load_images(ID_SET, image_cache(ctx), size=s["image_size"])
    mnist = load_images(OOD_SET, image_cache(ctx), size=s["image_size"])
    x, y = fashion["test"]
    ids = spread(len(x), 2 * s["images"])
    ood = mnist["test"][0]
    train_x, train_y = fashion["train"]
    probe = spread(len(train_x), s["probe_images"])
    return {"val": x[ids[0::2]], "test": x[ids[1::2]], "test_y": y[ids[1::2]],
            "ood": ood[spread(len(ood), s["images"])], "probe_x": train_x[probe], "probe_y": train_y[probe]}


def fixed_noise(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One noise draw per image, shared by every model, seed and level (the comparisons are paired)."""
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- trainings

def image_run(ctx: Context, s: dict, kind: str, lr: float, seed: int) -> RunConfig:
    """One denoiser training on Fashion-MNIST at the training noise level (the EBT: recipe s1_image)."""
    size = {k: s[k] for k in ("n_layer", "d_model", "n_head") if s.get(k)}
    m = ModelConfig(model=kind, size=s["size"], candidate="image", vocab_size=1, pad_token_id=None,
                    image_size=s["image_size"], channels=1, patch=s["patch"], noise_level=TRAIN_LEVEL, **size)
    t = TrainConfig(out_dir="unused", steps=s["steps"], batch_size=s["batch"], lr=lr,
                    warmup_steps=s["warmup"], weight_decay=s["weight_decay"][kind], eval_every=0,
                    eval_windows=64, eval_batch_size=64, log_every=max(1, s["steps"] // 4), seed=seed,
                    device=ctx.device, progress=False)
    data = DataConfig(data_dir=f"images:{ID_SET}", image_cache=image_cache(ctx), image_size=s["image_size"],
                      channels=1)
    return RunConfig(model=m, data=data, train=t)


def run_name(kind: str, lr: float, seed: int) -> str:
    return f"denoise-{kind}-lr{lr:g}-s{seed}"


# ------------------------------------------------------------------------------------------ evaluation

def settings(kind: str, s: dict) -> list[tuple[str, int]]:
    """(label, forward passes) of each way a model is run, fewest passes first: the EBT's steps; the DiT's
    DDIM steps x recursive applications (each application restarts DDIM at the level's timestep)."""
    if kind == "ebt":
        return [(f"{k} step{'s' if k > 1 else ''}", k) for k in range(1, s["ebt_steps"] + 1)]
    runs = [(f"DDIM {n} x {a}", n * a) for n in s["ddim_steps"] for a in range(1, s["ddim_applications"] + 1)]
    return sorted(runs, key=lambda r: r[1])


def outputs(model, kind: str, noisy: torch.Tensor, level: float, s: dict) -> dict[str, torch.Tensor]:
    """Every setting's denoised images for one batch of noisy images."""
    from ebt.denoise import ebt_denoise
    from ebt.models.dit import recursive

    if kind == "ebt":
        # one landscape, no noise: k steps are k applications of one step, so one pass yields every k
        outs, _ = ebt_denoise(model, noisy, 1, s["ebt_steps"])
        return {f"{k} step{'s' if k > 1 else ''}": out for k, out in enumerate(outs, start=1)}
    res = {}
    for n in s["ddim_steps"]:
        outs, _ = recursive(model.net, noisy, level, n, s["ddim_applications"], model.net.schedule)
        res.update({f"DDIM {n} x {a}": out for a, out in enumerate(outs, start=1)})
    return res


@torch.no_grad()
def psnr_curves(model, kind: str, x: torch.Tensor, noise: torch.Tensor, s: dict,
                batch_size: int = 256) -> dict:
    """{level: {setting: per-image PSNR}} of `model` on images x noised with `noise` at each level."""
    from ebt.denoise import pixel_errors
    from ebt.models.dit import noise_at_level

    model.eval()
    dev = next(model.parameters()).device
    schedule = model.schedule if kind == "ebt" else model.net.schedule
    out = {}
    for level in LEVELS:
        per = {label: [] for label, _ in settings(kind, s)}
        for i in range(0, len(x), batch_size):
            clean = x[i:i + batch_size].to(dev)
            noisy, _ = noise_at_level(clean, level, noise=noise[i:i + batch_size].to(dev), schedule=schedule)
            for label, pred in outputs(model, kind, noisy, level, s).items():
                per[label] += [round(v, 4) for v in pixel_errors(pred, clean)[1].tolist()]
        out[str(level)] = per
    return out


def noisy_psnr(x: torch.Tensor, noise: torch.Tensor) -> dict:
    """Mean PSNR of the noisy images themselves at each level (what denoising starts from)."""
    from ebt.denoise import pixel_errors
    from ebt.models.dit import level_schedule, noise_at_level

    schedule = level_schedule(TRAIN_LEVEL)
    noisy = {lv: noise_at_level(x, lv, noise=noise, schedule=schedule)[0] for lv in LEVELS}
    return {str(lv): float(pixel_errors(noisy[lv], x)[1].mean()) for lv in LEVELS}


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def mean(values) -> float:
    return sum(values) / len(values)


def eval_key(s: dict, *extra) -> str:
    """A short hash of what an evaluation depends on besides the run, so another scale never reuses it."""
    keys = ("images", "ebt_steps", "ddim_steps", "ddim_applications", "image_size", "probe_images",
            "probe_epochs")
    blob = json.dumps([{k: s[k] for k in keys}, list(extra)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def evaluate(ctx: Context, s: dict, kind: str, folder: Path, sets: dict, noise: dict, splits) -> dict:
    """Per-image PSNR curves on `splits` of one trained model (cached)."""
    from ebt.models import load_model

    def compute():
        model = load_model(folder, device=ctx.device)
        return {split: psnr_curves(model, kind, sets[split], noise[split], s) for split in splits}

    return ctx.cached(f"psnr-{folder.name}-{'-'.join(splits)}-{eval_key(s)}", compute)


def probe(ctx: Context, s: dict, folder: Path, sets: dict, seed: int) -> float:
    """Linear-probe top-1 on the in-distribution test images (cached)."""
    from ebt.denoise import linear_probe
    from ebt.models import load_model

    def compute():
        model = load_model(folder, device=ctx.device).eval()
        return {"top1": linear_probe(model, sets["probe_x"], sets["probe_y"], sets["test"], sets["test_y"],
                                     epochs=s["probe_epochs"], seed=seed)}

    return ctx.cached(f"probe-{folder.name}-{eval_key(s, seed)}", compute)["top1"]


def image_flops(run: RunConfig) -> dict:
    """Training FLOPs per image and FLOPs per inference forward pass (an EBT step: its energy and the energy's
    gradient), counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from ebt.denoise import ebt_denoise
    from ebt.fast.plan import resolve_plan
    from ebt.models import build_model
    from ebt.models.dit import ddim_denoise

    torch.manual_seed(0)
    model = build_model(run.model).train()
    x = torch.rand(2, 1, run.model.image_size, run.model.image_size) * 2 - 1
    ebt = run.model.model == "ebt"
    kw = {"plan": resolve_plan(model, energy_gap=False)} if ebt else {}  # no logging forward
    with FlopCounterMode(display=False) as train:
        model(x, **kw)["loss"].backward()
    model.eval()
    with FlopCounterMode(display=False) as one_pass, torch.no_grad():
        if ebt:
            ebt_denoise(model, x, 1)
        else:
            ddim_denoise(model.net, x, 0, 1, model.net.schedule)
    return {"train": train.get_total_flops() / len(x), "pass": one_pass.get_total_flops() / len(x)}


# ------------------------------------------------------------------------------------------ statistics

def best_setting(curve: dict, passes: dict) -> str:
    """The setting with the highest mean PSNR; at a tie, the one with fewer forward passes."""
    return max(curve, key=lambda label: (curve[label], -passes[label]))


def choose(val: dict, passes: dict) -> dict:
    """From {lr: {level: {setting: mean validation PSNR}} or {"diverged": why}}: the lr whose best setting
    scores highest at the training level (the first at a tie), and that lr's best setting per level."""
    from ebt.train import TrainingError

    ok = {lr: v for lr, v in val.items() if "diverged" not in v}
    if not ok:
        raise TrainingError(f"every learning rate of the grid ({', '.join(val)}) diverged: lower them")
    best = {lr: {lv: best_setting(c, passes) for lv, c in v.items()} for lr, v in ok.items()}
    top = str(TRAIN_LEVEL)
    lr = max(ok, key=lambda k: ok[k][top][best[k][top]])
    return {"lr": lr, "setting": best[lr], "best": best, "val": val}


def paired_difference(a: list[float], b: list[float], seed: int = 0) -> dict:
    """Mean of a - b over the same images, with a 95% bootstrap interval over images."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    lo, hi = bootstrap(lambda i: float(d[i].mean()), len(d), seed=seed)
    return {"diff": float(d.mean()), "lo": lo, "hi": hi}


def claim_statistics(seeds, tuned: dict, curves: dict, probes: dict) -> dict:
    """Per seed and cell (image set x level): each model's mean PSNR at its chosen setting and the paired
    difference; over seeds: t intervals of the differences and of the probe's top-1 difference.
    curves: {(kind, seed): {split: {level: {setting: per-image PSNR}}}}; probes: {(kind, seed): top-1}."""
    per_seed, over = {}, {}
    for seed in seeds:
        cells = {}
        for split in SETS:
            for lv in LEVELS:
                e, d = (curves[k, seed][split][str(lv)][tuned[k]["setting"][str(lv)]] for k in MODELS)
                cells[f"{split}-{lv}"] = {"ebt": mean(e), "dit": mean(d), **paired_difference(e, d, seed)}
        per_seed[str(seed)] = {"cells": cells, "probe": {k: probes[k, seed] for k in MODELS}}
    for cell in per_seed[str(seeds[0])]["cells"]:
        over[cell] = seed_interval([v["cells"][cell]["diff"] for v in per_seed.values()])
    over["probe"] = seed_interval([v["probe"]["ebt"] - v["probe"]["dit"] for v in per_seed.values()])
    return {"per_seed": per_seed, "over_seeds": over}


def mean_curves(curves: dict, seeds, kind: str, split: str) -> dict:
    """{level: {setting: PSNR averaged over images, then over seeds}}."""
    first = curves[kind, seeds[0]][split]
    return {lv: {label: mean([mean(curves[kind, x][split][lv][label]) for x in seeds]) for label in per}
            for lv, per in first.items()}


# ---------------------------------------------------------------------------------------------- the claim

def tune(ctx: Context, s: dict, kind: str, sets: dict, noise: dict) -> dict:
    """Train `kind` at each learning rate of the grid (the first seed) and choose on the validation images.
    A learning rate whose training goes non-finite is recorded as diverged (and not trained again)."""
    from ebt.train import TrainingError

    seed, val = ctx.seeds[0], {}
    for lr in s["lrs"]:
        name, run = run_name(kind, lr, seed), image_run(ctx, s, kind, lr, seed)

        def compute():
            try:
                folder, _ = train_cached(ctx, name, run)
            except TrainingError as e:
                ctx.log(f"[{ctx.claim}] {name} diverged: {e}")
                return {"diverged": str(e)}
            psnr = evaluate(ctx, s, kind, folder, sets, noise, ("val",))["val"]
            return {lv: {label: mean(v) for label, v in per.items()} for lv, per in psnr.items()}

        val[f"{lr:g}"] = ctx.cached(f"val-{run_dir(ctx.runs, name, run).name}-{eval_key(s)}", compute)
    return choose(val, dict(settings(kind, s)))


def run(ctx: Context, s: dict) -> Result:
    (ctx.out / "cache").mkdir(parents=True, exist_ok=True)  # ctx.cached writes there
    sets = image_sets(ctx, s)
    noise = {split: fixed_noise(sets[split], k) for k, split in enumerate(("val", "test", "ood"))}
    tuned = {kind: tune(ctx, s, kind, sets, noise) for kind in MODELS}
    curves, probes, runs = {}, {}, {}
    for kind in MODELS:
        lr = next(x for x in s["lrs"] if f"{x:g}" == tuned[kind]["lr"])
        for seed in ctx.seeds:
            runs[kind] = image_run(ctx, s, kind, lr, seed)
            folder, _ = train_cached(ctx, run_name(kind, lr, seed), runs[kind])
            curves[kind, seed] = evaluate(ctx, s, kind, folder, sets, noise, tuple(SETS))
            probes[kind, seed] = probe(ctx, s, folder, sets, seed)
    stats = claim_statistics(ctx.seeds, tuned, curves, probes)
    flops = ctx.cached(f"flops-{eval_key(s, [to_key(r) for r in runs.values()])}",
                       lambda: {kind: image_flops(r) for kind, r in runs.items()})
    base = {split: noisy_psnr(sets[split], noise[split]) for split in SETS}
    means = {kind: {split: mean_curves(curves, ctx.seeds, kind, split) for split in SETS} for kind in MODELS}
    passes = {kind: dict(settings(kind, s)) for kind in MODELS}
    budgets = {kind: train_budget(runs[kind], flops[kind], len(ctx.seeds)) for kind in MODELS}
    data = {"tuning": tuned, "statistics": stats, "flops": flops, "noisy_psnr": base, "mean_psnr": means,
            "passes": passes, "images": {k: len(sets[k]) for k in ("val", "test", "ood", "probe_x")}}
    return Result(rows=claim_rows(stats, tuned, passes, budgets, flops, len(sets["test"])),
                  tables=claim_tables(stats, tuned, means, base, budgets, s, sets), data=data,
                  figure=lambda path: plot_curves(means, base, passes, tuned, path))


def to_key(run: RunConfig) -> str:
    m = run.model
    return f"{m.model}-{m.n_layer}x{m.d_model}-p{m.patch}"


def train_budget(run: RunConfig, flops: dict, seeds: int) -> str:
    t, m = run.train, run.model
    return (f"{LABELS[m.model]} {m.n_layer}x{m.d_model} (patch {m.patch}), lr {t.lr:g}: {t.steps} steps, "
            f"{t.steps * t.batch_size:,} images, {flops['train'] / 1e6:.3g} MFLOP/image, {seeds} seed(s)")


# ------------------------------------------------------------------------------------------------ report

def claim_rows(stats: dict, tuned: dict, passes: dict, budgets: dict, flops: dict, images: int) -> list[Row]:
    over, rows = stats["over_seeds"], []
    ratio = flops["ebt"]["pass"] / flops["dit"]["pass"]
    both = "; ".join(budgets[k] for k in MODELS)
    for split in SETS:
        for lv in LEVELS:
            cell = over[f"{split}-{lv}"]
            used = {k: tuned[k]["setting"][str(lv)] for k in MODELS}
            where = "the training level" if lv == TRAIN_LEVEL else "above the training level"
            spent = " vs ".join(f"{LABELS[k]} {used[k]} ({plural(passes[k][used[k]], 'pass')})"
                                for k in MODELS)
            rows.append(Row(f"PSNR EBT minus DiT (dB), {SETS[split]}, noise {lv} ({where}); paired by seed "
                            f"(t over seeds), each model at its validation-chosen forward passes",
                            fmt_interval(*cell, fmt="{:+.2f}") + f"; {spent}", verdict(*cell, expect="above"),
                            f"{images} images per seed; an EBT pass (energy and its gradient) costs "
                            f"{ratio:.1f}x a DiT pass's FLOPs"))
    summary = "; ".join(f"{SHORT[sp]} {lv}: {over[f'{sp}-{lv}'][0]:+.2f} dB" for sp in SETS for lv in LEVELS)
    claim = Row("the EBT denoises better than the DiT (PSNR, EBT minus DiT) on in- and out-of-distribution "
                "images at noise 0.1 and 0.2: every one of the four rows below", summary,
                pooled_verdict([r.verdict for r in rows]), both)
    pr = over["probe"]
    rows.append(Row("linear-probe top-1 on frozen mean-pooled final tokens, EBT minus DiT (percentage "
                    "points, Fashion-MNIST test images), t over seeds",
                    fmt_interval(*(100 * v for v in pr), fmt="{:+.1f}"), verdict(*pr, expect="above"), both))
    return [claim] + rows


def tuning_table(tuned: dict, n_val: int) -> str:
    rows = []
    for kind in MODELS:
        t = tuned[kind]
        for lr, val in t["val"].items():
            if "diverged" in val:
                rows.append([LABELS[kind], lr, *(["diverged"] * len(LEVELS)), ""])
                continue
            best = t["best"][lr]
            cells = [f"{val[str(lv)][best[str(lv)]]:.2f} ({best[str(lv)]})" for lv in LEVELS]
            rows.append([LABELS[kind], lr, *cells, "chosen" if lr == t["lr"] else ""])
    return (f"Learning-rate tuning (the first seed; validation: {n_val} Fashion-MNIST test images disjoint "
            "from the test images; each level's best setting in brackets; the lr is chosen at noise 0.1):\n\n"
            + table(["model", "lr", *(f"val PSNR {lv}" for lv in LEVELS), ""], rows))


def seed_table(stats: dict, sets: dict) -> str:
    rows = []
    for seed, v in stats["per_seed"].items():
        for split in SETS:
            for lv in LEVELS:
                c = v["cells"][f"{split}-{lv}"]
                rows.append([seed, SHORT[split], lv, f"{c['ebt']:.2f}", f"{c['dit']:.2f}",
                             fmt_interval(c["diff"], c["lo"], c["hi"], "{:+.2f}")])
    return ("Test PSNR (dB) per seed at each model's chosen setting; the difference's interval is a "
            f"bootstrap over images ({len(sets['test'])} Fashion-MNIST, {len(sets['ood'])} MNIST):\n\n"
            + table(["seed", "images", "noise", "EBT", "DiT", "EBT - DiT (95%)"], rows))


def curve_table(means: dict, base: dict, s: dict) -> str:
    cols = [(split, str(lv)) for split in SETS for lv in LEVELS]
    rows = [["noisy input", "-", 0, *(f"{base[sp][lv]:.2f}" for sp, lv in cols)]]
    for kind in MODELS:
        for label, n in settings(kind, s):
            rows.append([LABELS[kind], label, n, *(f"{means[kind][sp][lv][label]:.2f}" for sp, lv in cols)])
    head = ["model", "setting", "passes", *(f"{SHORT[sp]} {lv}" for sp, lv in cols)]
    return ("PSNR (dB) against forward passes, mean over seeds (an EBT pass is its energy and the energy's "
            "gradient):\n\n" + table(head, rows))


def probe_table(stats: dict, sets: dict) -> str:
    rows = []
    for seed, v in stats["per_seed"].items():
        e, d = (100 * v["probe"][k] for k in MODELS)
        rows.append([seed, f"{e:.1f}", f"{d:.1f}", f"{e - d:+.1f}"])
    return (f"Linear probe top-1 (%) per seed ({len(sets['probe_x'])} training images, {len(sets['test'])} "
            "test images):\n\n" + table(["seed", "EBT", "DiT", "EBT - DiT"], rows))


def claim_tables(stats: dict, tuned: dict, means: dict, base: dict, budgets: dict, s: dict,
                 sets: dict) -> list[str]:
    return [tuning_table(tuned, len(sets["val"])), seed_table(stats, sets), curve_table(means, base, s),
            probe_table(stats, sets),
            "Budgets: " + "; ".join(budgets[k] for k in MODELS)
            + ". The EBT's training step backpropagates through its denoising step (second order)."]


def plot_panel(ax, kind: str, curve: dict, passes: dict, chosen: str) -> None:
    """One model's PSNR against passes; the DiT's recursive applications as separate lines."""
    color = "tab:red" if kind == "ebt" else "tab:blue"
    groups = {}
    for label in curve:
        groups.setdefault(label.split(" x ")[-1] if kind == "dit" else "", []).append(label)
    for g, labels in groups.items():
        pts = sorted((passes[lb], curve[lb]) for lb in labels)
        ax.plot(*zip(*pts), marker="o" if kind == "ebt" else "s", color=color, ms=4,
                alpha=1.0 if g in ("", "1") else 0.5, label=LABELS[kind] + (f" x {g}" if g else ""))
    ax.scatter([passes[chosen]], [curve[chosen]], s=120, facecolors="none", edgecolors=color)


def plot_curves(means: dict, base: dict, passes: dict, tuned: dict, path: Path) -> Path:
    """PSNR against forward passes per image set (rows) and noise level (columns), mean over seeds; a ring
    marks each model's chosen setting."""
    from ebt.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(len(SETS), len(LEVELS), figsize=(5 * len(LEVELS), 3.4 * len(SETS)),
                             squeeze=False)
    for row, split in enumerate(SETS):
        for col, lv in enumerate(str(x) for x in LEVELS):
            ax = axes[row][col]
            for kind in MODELS:
                plot_panel(ax, kind, means[kind][split][lv], passes[kind], tuned[kind]["setting"][lv])
            ax.axhline(base[split][lv], color="gray", ls="--", lw=1, label="noisy input")
            ax.set_xscale("log")
            ticks = sorted({n for kind in MODELS for n in passes[kind].values()})
            ax.set_xticks(ticks, [str(n) for n in ticks], fontsize=7)
            ax.minorticks_off()
            ax.set_xlabel("forward passes")
            ax.set_ylabel("PSNR (dB)")
            ax.set_title(f"{SETS[split]}, noise {lv}", fontsize=8)
            ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)
