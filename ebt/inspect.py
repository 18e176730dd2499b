"""Energy as uncertainty (ebt-method.md 7, the paper's Figure 8): which tokens an EBT is unsure of.

For a text: a heatmap of each token's energy across thinking steps. On validation windows: the mean
final energy of natural text against the same tokens shuffled and against uniformly random tokens,
and the rank correlation (Spearman) between each token's final energy and its negative
log-likelihood under the model's own prediction.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ebt.errors import EBTError
from ebt.plots import pyplot, save_figure


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (average ranks are not needed: ties have measure zero here)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def energy_heatmap(trace: torch.Tensor, labels: list[str], out: str | Path, title: str = "") -> Path:
    """trace (steps+1, T): energy of each position's candidate after each step, as a PNG."""
    plt = pyplot()

    steps, T = trace.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * T), 1.2 + 0.35 * steps))
    im = ax.imshow(trace.numpy(), aspect="auto", cmap="viridis", origin="upper")
    ax.set_xticks(range(T), labels, rotation=70, fontsize=8)
    ax.set_yticks(range(steps), [f"step {k}" for k in range(steps)], fontsize=8)
    ax.set_xlabel("predicted token")
    ax.set_title(title or "energy per token across thinking steps (lower: more certain)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="energy")
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)


@torch.no_grad()
def window_statistics(model, windows: torch.Tensor, steps: int | None, seed: int = 0,
                      noise: float | None = None) -> dict:
    """Mean final energy of natural, shuffled and random windows, and Spearman(energy, NLL). steps: per
    landscape, noise: the Langevin std (None: the model's defaults, ebt.think.ThinkConfig)."""
    from ebt.evaluate import seeded
    from ebt.think import ThinkConfig, think

    dev = windows.device
    tokens, targets = windows[:, :-1], windows[:, 1:]
    cfg = ThinkConfig(steps=steps, noise=noise)
    with seeded(seed, dev):
        natural = think(model, tokens, cfg)
        g = torch.Generator(device="cpu").manual_seed(seed)
        perm = torch.stack([torch.randperm(tokens.shape[1], generator=g) for _ in range(tokens.shape[0])]).to(dev)
        shuffled = think(model, tokens.gather(1, perm), cfg)
        rand = torch.randint(0, model.cfg.vocab_size, tokens.shape, generator=g).to(dev)
        random_ = think(model, rand, cfg)
    nll = -torch.log_softmax(natural.z.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return {
        "mean_energy_natural": float(natural.energy.mean()),
        "mean_energy_shuffled": float(shuffled.energy.mean()),
        "mean_energy_random": float(random_.energy.mean()),
        "spearman_energy_nll": spearman(natural.energy.flatten().double(), nll.flatten()),
        "tokens": int(targets.numel()),
    }


def inspect_energy(checkpoint, text: str, out: str | Path, steps: int | None = None, data_dir: str | None = None,
                   device: str = "auto", windows: int = 64, noise: float | None = None) -> dict:
    """The heatmap (thinking `steps` per landscape, Langevin `noise`: None the model's defaults, seeded) and,
    with data, `window_statistics`."""
    from ebt.checkpoint import load_model, read_config, resolve
    from ebt.data.loader import TokenData, tokenizer_for_checkpoint
    from ebt.evaluate import seeded
    from ebt.think import ThinkConfig, think
    from ebt.train import setup_distributed

    path = resolve(checkpoint)
    _, _, dev = setup_distributed(device)
    model = load_model(path, device=dev).eval()
    if model.cfg.model != "ebt":
        raise EBTError(f"{path} is a {model.cfg.model}: energies need an EBT checkpoint")
    data_dir = data_dir or read_config(path).get("data", {}).get("data_dir")
    tok = tokenizer_for_checkpoint(path, data_dir)
    ids = tok.encode(text)
    if len(ids) < 2:
        raise EBTError("the text must have at least 2 tokens (one to read, one to predict)")
    ids = ids[: model.cfg.context_length + 1]
    x = torch.tensor(ids, device=dev)[None]
    with seeded(0, dev):
        thought = think(model, x[:, :-1], ThinkConfig(steps=steps, noise=noise, trace=True))
    labels = [tok.decode([i]).replace("\n", "\\n") for i in ids[1:]]
    png = energy_heatmap(thought.trace[:, 0].cpu(), labels, out)
    report = {"png": str(png), "tokens": labels, "final_energy": thought.energy[0].tolist()}
    if data_dir:
        val = TokenData(data_dir, "val", model.cfg.context_length)
        w = torch.cat(list(val.eval_batches(windows, max_windows=windows))).to(dev)
        report["validation"] = window_statistics(model, w, steps, noise=noise)
    return report
