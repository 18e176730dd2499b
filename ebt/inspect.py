"""Energy as uncertainty (docs/method.md 7, the paper's Figure 8): which tokens an EBT is unsure of.

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
    rank_a = a.argsort().argsort().double()
    rank_b = b.argsort().argsort().double()
    rank_a, rank_b = rank_a - rank_a.mean(), rank_b - rank_b.mean()
    return float((rank_a * rank_b).sum() / (rank_a.norm() * rank_b.norm()))


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
    from ebt.fast.plan import resolve_plan
    from ebt.runtime import seeded
    from ebt.think import ThinkConfig, think

    dev = windows.device
    tokens, targets = windows[:, :-1], windows[:, 1:]
    cfg = ThinkConfig(steps=steps, noise=noise)
    step = resolve_plan(model, dev).think_step(model, cfg)
    with seeded(seed, dev):
        natural = think(model, tokens, cfg, step=step)
        g = torch.Generator(device="cpu").manual_seed(seed)
        perm = torch.stack([torch.randperm(tokens.shape[1], generator=g)
                            for _ in range(tokens.shape[0])]).to(dev)
        shuffled = think(model, tokens.gather(1, perm), cfg, step=step)
        rand = torch.randint(0, model.cfg.vocab_size, tokens.shape, generator=g).to(dev)
        random_ = think(model, rand, cfg, step=step)
    nll = -torch.log_softmax(natural.z.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return {
        "mean_energy_natural": float(natural.energy.mean()),
        "mean_energy_shuffled": float(shuffled.energy.mean()),
        "mean_energy_random": float(random_.energy.mean()),
        "spearman_energy_nll": spearman(natural.energy.flatten().double(), nll.flatten()),
        "tokens": int(targets.numel()),
    }


def inspect_energy(checkpoint, text: str, out: str | Path, steps: int | None = None,
                   data_dir: str | None = None, device: str = "auto", windows: int = 64,
                   noise: float | None = None) -> dict:
    """The heatmap (thinking `steps` per landscape, Langevin `noise`: None the model's defaults, seeded)
    and, with data, `window_statistics`."""
    from ebt.checkpoint import read_config, resolve
    from ebt.models import load_model
    from ebt.data.loader import TokenData, tokenizer_for_checkpoint
    from ebt.fast.plan import resolve_plan
    from ebt.runtime import seeded
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
    cfg = ThinkConfig(steps=steps, noise=noise, trace=True)
    with seeded(0, dev):
        thought = think(model, x[:, :-1], cfg, step=resolve_plan(model, dev).think_step(model, cfg))
    labels = [tok.decode([i]).replace("\n", "\\n") for i in ids[1:]]
    png = energy_heatmap(thought.trace[:, 0].cpu(), labels, out)
    report = {"png": str(png), "tokens": labels, "final_energy": thought.energy[0].tolist()}
    if data_dir:
        val = TokenData(data_dir, "val", model.cfg.context_length)
        val_windows = torch.cat(list(val.eval_batches(windows, max_windows=windows))).to(dev)
        report["validation"] = window_statistics(model, val_windows, steps, noise=noise)
    return report


def _order_reading(stats: dict) -> str:
    means = {k: stats[f"mean_energy_{k}"] for k in ("natural", "shuffled", "random")}
    order = " < ".join(sorted(means, key=means.get))
    if order == "natural < shuffled < random":
        return ("natural < shuffled < random holds: real text gets the lowest energy, random tokens "
                "the highest")
    return (f"natural < shuffled < random does not hold (the order is {order}): the model does not yet "
            f"give real text lower energy than scrambled or random tokens")


def _spearman_reading(rho: float) -> str:
    if rho != rho:  # NaN: a single token, nothing to rank
        return "undefined: too few tokens to rank"
    if rho >= 0.3:
        return "energy tracks the model's own loss: it is higher where the prediction is worse"
    if rho >= 0.1:
        return "a weak link: energy rises only a little with the model's own loss"
    if rho > -0.1:
        return "no link: energy says little about where the model's prediction is worse"
    return ("energy runs against the model's own loss (lower where the prediction is worse): "
            "not yet a sign of uncertainty")


def _token_rows(tokens: list[str], energy: list[float], max_tokens: int) -> list[str]:
    rows = list(range(len(tokens)))
    half = max_tokens // 2
    if len(rows) > max_tokens:  # the first and last tokens; the heatmap and --json hold them all
        rows = rows[:half] + [None] + rows[-half:]
    lines = [f"{'#':>5}  {'token':<20} {'energy':>10}"]
    for i in rows:
        if i is None:
            lines.append(f"{'...':>5}  ({len(tokens) - 2 * half} tokens left out)")
            continue
        label = "'" + (tokens[i] if len(tokens[i]) <= 18 else tokens[i][:15] + "...") + "'"
        lines.append(f"{i + 1:>5}  {label:<20} {energy[i]:>10.4f}")
    return lines


def report_lines(report: dict, max_tokens: int = 40) -> list[str]:
    """inspect_energy's report as lines to read: the heatmap, a per-token table (its middle left out when
    longer than max_tokens) and, with data, the energies of natural, shuffled and random text."""
    tokens = report["tokens"]
    lines = [f"energy heatmap: {report['png']}",
             f"final energy of each predicted token ({len(tokens)} tokens; lower: more certain)"]
    lines += _token_rows(tokens, report["final_energy"], max_tokens)
    stats = report.get("validation")
    if stats:
        rho = stats["spearman_energy_nll"]
        lines += [f"validation windows ({stats['tokens']:,} tokens): mean final energy",
                  f"  natural text      {stats['mean_energy_natural']:.4f}",
                  f"  the same shuffled {stats['mean_energy_shuffled']:.4f}",
                  f"  random tokens     {stats['mean_energy_random']:.4f}",
                  f"  {_order_reading(stats)}",
                  f"Spearman correlation of final energy with the model's own NLL: {rho:+.3f}",
                  f"  {_spearman_reading(rho)}"]
    return lines
