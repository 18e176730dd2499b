"""Matplotlib without a screen: the one place figures are created and written."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out, dpi: int = 120) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return out


def written_lines(files: dict, json_path=None) -> list[str]:
    """'files written:' and one line per file (path, then what it holds), for an evaluation's output."""
    files = {**files, **({str(json_path): "this report as JSON (--json)"} if json_path else {})}
    width = max(len(str(path)) for path in files)
    return ["files written:"] + [f"  {str(path):<{width}}  {what}" for path, what in files.items()]
