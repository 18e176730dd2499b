"""Image denoising evaluation (docs/method.md 4): the EBT denoiser against a DiT, in distribution (noise
level 0.1, the training level) and out of distribution (0.2).

Per-image MSE on [0, 255] pixels and PSNR = 10 log10(255^2 / MSE), averaged over the test images, with
the forward passes each configuration spends: the EBT at 1, 2, 3 steps and applied recursively to its
own output; the DiT with DDIM started at the level's timestep, at several step counts and 1-3 recursive
applications. Both are noised on the training level's schedule (`ebt.models.dit.level_schedule`), as in
the official code: level 0.1 is alpha_bar 0.896, level 0.2 is 0.658. Also a PSNR-versus-passes plot,
image grids and a linear probe on each frozen model's mean-pooled final tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ebt.errors import ConfigError
from ebt.runtime import seeded
from ebt.models.dit import noise_at_level, recursive
from ebt.think import ThinkConfig, think
from ebt.plots import pyplot, save_figure


def pixel_errors(pred: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image MSE on [0, 255] pixels and PSNR = 10 log10(255^2 / MSE) for images in [-1, 1]."""
    pred_px = (pred.clamp(-1, 1) + 1) * 127.5
    clean_px = (clean.clamp(-1, 1) + 1) * 127.5
    mse = (pred_px.double() - clean_px.double()).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))
    return mse, psnr


def ebt_denoise(model, noisy: torch.Tensor, steps: int, applications: int = 1) -> tuple[list, int]:
    """The EBT's prediction after `steps` steps from the noisy image, re-applied to its own output
    `applications` times. Returns the output of each application and the forward passes spent."""
    outs, x = [], noisy
    for _ in range(applications):
        x = think(model, x, ThinkConfig(steps=steps, score_final=False)).z
        outs.append(x)
    return outs, steps * applications


def shared_schedule(ebt_model, dit=None):
    """The EBT's noise schedule, which the DiT must share: one training level, one set of noisy images."""
    if dit is not None:
        ebt_cfg, dit_cfg = ebt_model.dcfg, dit.net.cfg
        ebt_level, dit_level = ebt_cfg.noise_level, dit_cfg.noise_level
        ebt_steps, dit_steps = ebt_cfg.diffusion_steps, dit_cfg.diffusion_steps
        if (ebt_level, ebt_steps) != (dit_level, dit_steps):
            raise ConfigError(f"the EBT was trained at noise level {ebt_level} and the DiT at {dit_level} "
                              f"({ebt_steps} vs {dit_steps} diffusion steps): train both at one level "
                              f"(--noise-level)")
    return ebt_model.schedule


def _batches(x: torch.Tensor, n: int):
    for i in range(0, len(x), n):
        yield x[i:i + n]


@torch.no_grad()
def denoising_table(ebt_model, dit=None, images: torch.Tensor = None, levels=(0.1, 0.2),
                    ebt_steps=(1, 2, 3), ebt_applications=3, dit_steps=(10, 50, 100), dit_applications=3,
                    batch_size: int = 256, seed: int = 0, log=print) -> list[dict]:
    """Rows: {"model", "config", "passes", level: {"mse", "psnr"}} averaged over `images`."""
    rows: dict[tuple, dict] = {}

    def add(model, config, passes, level, pred, clean):
        mse, psnr = pixel_errors(pred, clean)
        row = rows.setdefault((model, config), {"model": model, "config": config, "passes": passes})
        acc = row.setdefault(str(level), {"mse": 0.0, "psnr": 0.0, "n": 0})
        acc["mse"] += float(mse.sum())
        acc["psnr"] += float(psnr.sum())
        acc["n"] += len(mse)

    dev = next(ebt_model.parameters()).device
    trained = ebt_model.cfg.ebt.eval_steps
    schedule = shared_schedule(ebt_model, dit)
    for level in levels:
        with seeded(seed, dev):
            for clean in _batches(images, batch_size):
                clean = clean.to(dev)
                noisy, _ = noise_at_level(clean, level, schedule=schedule)
                add("noisy input", "-", 0, level, noisy, clean)
                for s in ebt_steps:
                    outs, passes = ebt_denoise(ebt_model, noisy, s)
                    add("EBT", f"{s} step{'s' if s > 1 else ''}", passes, level, outs[-1], clean)
                outs, _ = ebt_denoise(ebt_model, noisy, trained, ebt_applications)
                for a, out in enumerate(outs[1:], start=2):
                    add("EBT", f"{trained} step(s) x {a} applications", trained * a, level, out, clean)
                if dit is not None:
                    for n in dit_steps:
                        outs, _ = recursive(dit.net, noisy, level, n, dit_applications, dit.net.schedule)
                        for a, out in enumerate(outs, start=1):
                            add("DiT", f"DDIM {n} steps x {a}", n * a, level, out, clean)
        log(f"  level {level}: done")
    table = []
    for row in rows.values():
        for level in levels:
            acc = row[str(level)]
            row[str(level)] = {"mse": acc["mse"] / acc["n"], "psnr": acc["psnr"] / acc["n"]}
        table.append(row)
    return table


def table_markdown(table: list[dict], levels=(0.1, 0.2)) -> str:
    kinds = ["ID" if i == 0 else "OOD" for i in range(len(levels))]
    head = "| model | configuration | forward passes | " + " | ".join(
        f"{kind} {lv} MSE | {kind} {lv} PSNR" for kind, lv in zip(kinds, levels)) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(levels))]
    for row in table:
        cells = [row["model"], row["config"], str(row["passes"])]
        for lv in levels:
            cells += [f"{row[str(lv)]['mse']:.1f}", f"{row[str(lv)]['psnr']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_psnr(table: list[dict], out, levels=(0.1, 0.2)) -> Path:
    plt = pyplot()

    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 3.4), squeeze=False)
    for ax, lv in zip(axes[0], levels):
        for model, marker in (("EBT", "o"), ("DiT", "s")):
            points = sorted((row["passes"], row[str(lv)]["psnr"]) for row in table if row["model"] == model)
            if points:
                ax.scatter(*zip(*points), marker=marker, label=model)
        base = [row[str(lv)]["psnr"] for row in table if row["model"] == "noisy input"]
        if base:
            ax.axhline(base[0], color="gray", ls="--", lw=1, label="noisy input")
        ax.set_xscale("log")
        ax.set_xlabel("forward passes")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"noise level {lv} ({'in' if lv == levels[0] else 'out of'} distribution)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)


@torch.no_grad()
def image_grid(ebt_model, dit, clean: torch.Tensor, level: float, out, dit_steps: int = 50) -> Path:
    """Rows of clean / noisy / EBT / DiT images at one noise level."""
    plt = pyplot()

    from ebt.data.images import from_model_range

    dev = next(ebt_model.parameters()).device
    with seeded(1, dev):
        noisy, _ = noise_at_level(clean.to(dev), level, schedule=shared_schedule(ebt_model, dit))
        rows = {"clean": clean, "noisy": noisy,
                "EBT": ebt_denoise(ebt_model, noisy, ebt_model.cfg.ebt.eval_steps)[0][-1]}
        if dit is not None:
            outs, _ = recursive(dit.net, noisy, level, dit_steps, 1, dit.net.schedule)
            rows[f"DiT (DDIM {dit_steps})"] = outs[-1]
    n = clean.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0), squeeze=False)
    for row, (name, imgs) in enumerate(rows.items()):
        pixels = from_model_range(imgs.cpu())
        for i in range(n):
            axes[row][i].imshow(pixels[i], cmap="gray" if pixels.ndim == 3 else None, vmin=0, vmax=255)
            axes[row][i].axis("off")
        axes[row][0].set_title(name, fontsize=7, loc="left")
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


def linear_probe(model, train_x, train_y, test_x, test_y, batch_size: int = 512, epochs: int = 200,
                 seed: int = 0) -> float:
    """Top-1 test accuracy of a logistic regression on the frozen model's mean-pooled final tokens."""
    dev = next(model.parameters()).device

    @torch.no_grad()
    def feats(x):
        return torch.cat([model.tokens(b.to(dev)).mean(1).float().cpu() for b in _batches(x, batch_size)])

    train_feats, test_feats = feats(train_x), feats(test_x)
    mean, std = train_feats.mean(0), train_feats.std(0).clamp_min(1e-6)
    train_feats, test_feats = (train_feats - mean) / std, (test_feats - mean) / std
    gen = torch.Generator().manual_seed(seed)
    clf = torch.nn.Linear(train_feats.shape[1], int(train_y.max()) + 1)
    torch.nn.init.normal_(clf.weight, std=0.01, generator=gen)
    torch.nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=epochs, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(clf(train_feats), train_y) + 1e-4 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float((clf(test_feats).argmax(1) == test_y).float().mean())


def denoise_report(ebt_ckpt, dit_ckpt=None, images: str | None = None, test_images: int | None = 2000,
                   probe_train: int = 10000, out_dir="denoise_eval", device="cpu", dit_steps=(10, 50, 100),
                   log=print) -> dict:
    from ebt.checkpoint import read_config, resolve
    from ebt.models import load_model
    from ebt.data.images import ImageData

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ebt_path = resolve(ebt_ckpt)
    cfg = read_config(ebt_path)
    name = images or str(cfg["data"]["data_dir"]).split(":", 1)[1]
    cache = cfg["data"].get("image_cache", "data/downloads")
    model = load_model(ebt_path, device=device).eval()
    dit = load_model(resolve(dit_ckpt), device=device).eval() if dit_ckpt else None
    test = ImageData(name, "test", cache_dir=cache, size=model.cfg.image_size, channels=model.cfg.channels)
    test.check_model(model.cfg.channels, model.cfg.image_size)
    n = min(test_images or test.num_images, test.num_images)
    ids = (torch.arange(n) * test.num_images) // n  # spread over the test set
    x = test.x[ids]
    log(f"denoising {n} test images of {name}")
    table = denoising_table(model, dit, x, dit_steps=tuple(dit_steps), log=log)
    (out_dir / "denoise.md").write_text(table_markdown(table))
    plot_psnr(table, out_dir / "psnr_vs_passes.png")
    for lv in (0.1, 0.2):
        image_grid(model, dit, x[:10], lv, out_dir / f"grid_level{lv}.png")
    train = ImageData(name, "train", cache_dir=cache, size=model.cfg.image_size, channels=model.cfg.channels)
    n_probe = min(probe_train, train.num_images)
    probe_ids = (torch.arange(n_probe) * train.num_images) // n_probe
    probe = {"EBT": linear_probe(model, train.x[probe_ids], train.y[probe_ids], test.x, test.y)}
    if dit is not None:
        probe["DiT"] = linear_probe(dit, train.x[probe_ids], train.y[probe_ids], test.x, test.y)
    with open(out_dir / "denoise.md", "a") as f:
        scores = ", ".join(f"{k} {100 * v:.2f}%" for k, v in probe.items())
        f.write("\nLinear probe (logistic regression on mean-pooled final tokens, "
                f"top-1 on the full test set): {scores}\n")
    pngs = ("psnr_vs_passes.png", "grid_level0.1.png", "grid_level0.2.png")
    report = {"images": name, "test_images": n, "table": table, "probe_top1": probe,
              "png": [str(out_dir / png) for png in pngs]}
    report["files"] = {str(out_dir / "denoise.md"): "PSNR table and linear probe (Markdown)",
                       str(out_dir / "denoise.json"): "this report as JSON",
                       str(out_dir / pngs[0]): "figure: PSNR against forward passes",
                       **{str(out_dir / png): f"figure: clean, noisy and denoised images, noise {png[10:-4]}"
                          for png in pngs[1:]}}
    (out_dir / "denoise.json").write_text(json.dumps(report, indent=2))
    return report

