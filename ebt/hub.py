"""Hugging Face conventions: a folder a model hub takes as it is (config.json, model.safetensors, the
tokenizer files and a model card README.md), written by `save_pretrained` / `ebt export RUN --out DIR` and
read back by `from_pretrained`.

The folder is an ebt checkpoint (ebt/checkpoint.py: config.json records the sha256 of model.safetensors, the
weights are written to `<dir>.tmp` and swapped in by renames, nothing is unpickled on load) with the tokenizer
at its top level, as hubs expect, and no training state (optimizer, random generators).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ebt import __version__
from ebt.config import RECIPES, to_dict
from ebt.errors import ConfigError

CARD = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_meta.json", "tokenizer_config.json")
HUB_FILES = ("config.json", "model.safetensors", *TOKENIZER_FILES, CARD)  # everything an export writes
FAMILY = {"ebt": "Energy-Based Transformer (EBT)", "transformer": "Transformer++", "dit": "DiT"}


class HubMixin:
    """`model.save_pretrained(dir)` and `Model.from_pretrained(dir)` for a model class with it as a base."""

    def save_pretrained(self, out_dir, tokenizer=None, run=None) -> Path:
        return save_pretrained(self, out_dir, tokenizer=tokenizer, run=run)

    @classmethod
    def from_pretrained(cls, path, device="cpu"):
        model = from_pretrained(path, device=device)
        if not isinstance(model, cls):
            raise ConfigError(f"{path} holds a {type(model).__name__} model, not {cls.__name__}: load it "
                              f"with ebt.hub.from_pretrained, which builds the model the folder describes")
        return model


def from_pretrained(path, device="cpu"):
    """The model in a folder written by `save_pretrained`, `ebt export` or `ebt train` (a run directory or
    its checkpoint): built from config.json, weights checked against their sha256."""
    from ebt.models import load_model

    return load_model(path, device=device)


def load_tokenizer(path, data_dir=None):
    """The tokenizer of an exported folder (its top level), of a run or checkpoint (their tokenizer/ folder),
    else the one beside `data_dir`."""
    from ebt.checkpoint import resolve
    from ebt.data.loader import tokenizer_for_checkpoint

    return tokenizer_for_checkpoint(resolve(path), data_dir)  # it looks at an export's top level too


def check_destination(out: Path) -> None:
    """Refuse a folder that holds anything an export did not write: replacing it would delete that."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} is a file: give --out a new or empty folder")
    entries = sorted(p.name for p in out.iterdir())
    foreign = [n for n in entries if n not in HUB_FILES]
    if entries and (foreign or not _is_export(out / "config.json")):
        what = ", ".join((foreign or entries)[:3]) + (" ..." if len(foreign or entries) > 3 else "")
        raise ConfigError(f"{out} is not empty and was not written by `ebt export` (it holds {what}); "
                          f"choose a new or empty folder")


def _is_export(config: Path) -> bool:
    try:
        return json.loads(config.read_text()).get("library_name") == "ebt"
    except (OSError, ValueError, AttributeError):
        return False


def save_pretrained(model, out_dir, tokenizer=None, run=None) -> Path:
    """Write `model` as a hub folder: config.json, model.safetensors, the tokenizer (if given; with `run`,
    the run's own) and a model card. run: the run directory (or checkpoint) the model comes from, whose
    config and metrics the card describes. An existing folder is replaced only if an export wrote it."""
    from ebt.checkpoint import publish_checkpoint, read_config, resolve, save_checkpoint, staging_dir, unwrap

    out = Path(out_dir)
    check_destination(out)
    model = unwrap(model)
    run_cfg = read_config(run) if run is not None else {}
    if tokenizer is None and run is not None:
        tokenizer = _run_tokenizer(resolve(run))
    config = {"model": to_dict(model.cfg), "library_name": "ebt", "ebt_version": __version__,
              "model_type": model.cfg.model, "architectures": [type(model).__name__]}
    config.update({k: run_cfg[k] for k in ("data", "train") if k in run_cfg})
    save_checkpoint(out, model, config, publish=False)
    tmp = staging_dir(out)
    if tokenizer is not None:
        tokenizer.save(tmp)
        for name in TOKENIZER_FILES[:2]:
            _fsync(tmp / name)
        hf = tokenizer_config(tokenizer, model.cfg)
        _write(tmp / "tokenizer_config.json", json.dumps(hf, indent=2) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    _write(tmp / CARD, model_card(config, n_params, out.name, _run_dir(run), tokenizer))
    return publish_checkpoint(out)


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    _fsync(path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _run_tokenizer(ckpt: Path):
    """The tokenizer a run trained with, or None (image and video runs have none)."""
    from ebt.errors import DataError

    try:
        return load_tokenizer(ckpt)
    except DataError:
        return None


def _run_dir(run) -> Path | None:
    """The run directory (metrics.jsonl, eval.json) of a run or of its checkpoint folder."""
    if run is None:
        return None
    run = Path(run)
    in_checkpoint = not (run / "metrics.jsonl").is_file() and (run.parent / "metrics.jsonl").is_file()
    return run.parent if in_checkpoint else run


def tokenizer_config(tok, mcfg) -> dict:
    """tokenizer_config.json as hubs read it: the special tokens and the longest input."""
    name = tok.tk.id_to_token
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": name(tok.eos_id),
            "pad_token": name(tok.pad_id), "model_max_length": mcfg.context_length,
            "clean_up_tokenization_spaces": False, "ebt_tokenizer": tok.name}


def export_run(run, out) -> Path:
    """`ebt export`: a run's (or checkpoint's) model, tokenizer and card as a hub folder at `out`."""
    from ebt.checkpoint import resolve

    ckpt = resolve(run)
    check_destination(Path(out))  # before loading: a refusal should not cost the load
    return save_pretrained(from_pretrained(ckpt), out, run=run)


# ---------------------------------------------------------------------------------------------- model card


def recipe_of(ebt_cfg: dict, image: bool = False) -> tuple[str, dict]:
    """The recipe (of text, or of images) an EBT config is closest to, and the fields it overrides."""
    def diff(name):
        return {k: v for k, v in ebt_cfg.items() if k in RECIPES[name] and RECIPES[name][k] != v}

    return min(((len(diff(n)), n, diff(n)) for n in RECIPES if n.endswith("_image") == image))[1:]


def model_card(config: dict, n_params: int, name: str, run_dir: Path | None, tokenizer) -> str:
    """README.md: what was trained, on what, its metrics, how to load it."""
    m = config["model"]
    what = f"An {FAMILY['ebt']}" if m["model"] == "ebt" else f"A {FAMILY.get(m['model'], m['model'])} model"
    title = f"# {name}\n\n{what} trained with the `ebt` library (Energy-Based Transformers and baselines).\n"
    parts = [_front_matter(m), title, _summary(m, n_params, tokenizer), _data_section(config, run_dir),
             _metrics_section(run_dir, m["model"]), _usage(m, name, tokenizer is not None),
             f"Written by `ebt export` (ebt {config['ebt_version']}).\n"]
    return "\n".join(p for p in parts if p)


def _front_matter(m: dict) -> str:
    tags = ["ebt", "energy-based-transformer" if m["model"] == "ebt" else m["model"]]
    lines = ["---", "library_name: ebt", "tags:"] + [f"- {t}" for t in tags]
    if m["candidate"] == "tokens":
        lines.append("pipeline_tag: text-generation")
    return "\n".join(lines + ["---", ""])


def _summary(m: dict, n_params: int, tokenizer) -> str:
    kind = {"tokens": "text (next-token prediction)", "frames": "video frames (next-frame features)",
            "image": "image denoising"}[m["candidate"]]
    rows = [("model", FAMILY.get(m["model"], m["model"])), ("task", kind),
            ("size", f"{m['size']}: {_n(m['n_layer'], 'layer')}, d_model {m['d_model']}, "
                     f"{_n(m['n_head'], 'head')}"),
            ("parameters", f"{n_params:,}"), ("context length", str(m["context_length"]))]
    if m["candidate"] == "tokens":
        tok = f", tokenizer `{tokenizer.name}` (eos id {tokenizer.eos_id})" if tokenizer is not None else ""
        rows.append(("vocabulary", f"{m['vocab_size']}{tok}"))
    if m["model"] == "ebt":
        rec, over = recipe_of(m["ebt"], image=m["candidate"] == "image")
        extra = f" with {', '.join(f'{k} {v}' for k, v in over.items())}" if over else ""
        e = m["ebt"]
        rows.append(("recipe", f"`{rec}`{extra}"))
        rows.append(("thinking", f"{_n(e['landscapes'], 'landscape')}, step size {e['alpha']}, "
                                 f"Langevin std {e['langevin']}"))
    return "## What was trained\n\n" + _table(["", ""], rows)


def _n(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def _data_section(config: dict, run_dir: Path | None) -> str:
    data, train = config.get("data"), config.get("train")
    if not data:
        return "## Training data\n\nNot recorded (the model was saved without its run).\n"
    lines = ["## Training data\n", f"- data: `{data['data_dir']}` ({data.get('windows', 'packed')} windows)"]
    corpus = _read_json(Path(data["data_dir"]) / "corpus.json")
    for src in (corpus or {}).get("sources_used", []):
        lic = corpus.get("licenses", {}).get(src, {})
        lines.append(f"  - {src}: {lic.get('text', 'licence not recorded')} "
                     f"({lic.get('package', 'source not recorded')})")
    if corpus and corpus.get("ood_source"):
        lines.append(f"  - held out as the out-of-distribution split: {corpus['ood_source']}")
    state = _read_json(run_dir / "checkpoint" / "trainer_state.json") if run_dir else None
    row, unit = {"frames": ("clips", "frames"), "image": ("images", "images")}.get(
        (config.get("model") or {}).get("candidate"), ("sequences", "tokens"))
    if train:
        lr = train["lr"] if train.get("lr") is not None else "the size's default"
        lines.append(f"- training: {train['steps']} steps of {train['batch_size']} {row}, learning rate "
                     f"{lr}, {train['warmup_steps']} warm-up steps, seed {train['seed']}, precision "
                     f"{train['precision']}")
    if state:
        lines.append(f"- trained for {state['step']} steps, {state['tokens_seen']:,} {unit}")
    return "\n".join(lines) + "\n"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_metrics(run_dir: Path) -> dict[str, dict]:
    """The last row of every split in a run's metrics.jsonl ({split: row})."""
    rows = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(row, dict) and "split" in row:
            rows[row["split"]] = row
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e6 else f"{v:.3e}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _metrics_section(run_dir: Path | None, model: str) -> str:
    rows = last_metrics(run_dir) if run_dir else {}
    out = ["## Metrics\n"]
    if rows:
        out.append("From the run's metrics.jsonl (the last row of each split; perplexity is exp of the "
                   "token-weighted mean loss):\n")
        keys = ["loss", "ppl", "tokens"]
        out.append(_table(["split", "step", *keys],
                          [(s, _fmt(r["step"]), *(_fmt(r[k]) if k in r else "-" for k in keys))
                           for s, r in rows.items()]))
        if model == "ebt":
            out.append("An EBT validates as the official code does: its training-time steps, with its "
                       "Langevin noise; `ebt eval --think` scores other thinking budgets.\n")
    evaluated = (_read_json(run_dir / "eval.json") or {}).get("results") if run_dir else None
    scored = {s: r for s, r in (evaluated or {}).items() if isinstance(r, dict) and "ppl" in r}
    if scored:
        out.append("From the run's eval.json (`ebt eval --json`):\n")
        out.append(_table(["split", "loss", "ppl", "tokens"],
                          [(s, _fmt(r.get("loss", "-")), _fmt(r["ppl"]), _fmt(r.get("tokens", "-")))
                           for s, r in scored.items()]))
    if len(out) == 1:
        out.append("No metrics were recorded with this model.\n")
    return "\n".join(out)


def _table(head: list[str], rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def _usage(m: dict, name: str, has_tokenizer: bool) -> str:
    lines = ["## How to load\n", "With the `ebt` library installed (`pip install -e .` in its repository):\n",
             "```python", "from ebt.hub import from_pretrained, load_tokenizer", "",
             f'model = from_pretrained("{name}")  # checks model.safetensors against config.json\'s sha256']
    if m["candidate"] == "tokens" and has_tokenizer:
        new = max(1, min(40, m["context_length"] // 2))
        lines += [f'tok = load_tokenizer("{name}")', "",
                  "from ebt.generate import GenerateConfig, generate", "", 'ids = tok.encode("The")',
                  f"new = generate(model, [ids], GenerateConfig(max_new_tokens={new}, eos_id=tok.eos_id))[0]",
                  "print(tok.decode(ids + new, skip_special=True))", "```", "",
                  "Scored with lm-evaluation-harness (`pip install -e '.[lm_eval]'`):", "", "```bash",
                  f"python -m ebt.integrations.lm_eval --model ebt --model_args pretrained={name} "
                  f"--tasks TASKS",
                  "```"]
    else:
        lines.append("```")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- command line


def add_export_command(sub, fmt=argparse.RawDescriptionHelpFormatter) -> None:
    """Register `ebt export` on the CLI's subparsers."""
    ep = sub.add_parser("export", help="write a run as a hub-ready folder (config.json, model.safetensors, "
                        "tokenizer, model card)", formatter_class=fmt,
                        description="Write a run's model as a folder a model hub takes as it is: "
                        "config.json, model.safetensors (sha256 in config.json), the tokenizer files and a "
                        "model card README.md (what was trained, on what data, its metrics, how to load it). "
                        "No optimizer state. An existing folder is replaced only if `ebt export` wrote it.",
                        epilog="example:\n  ebt export runs/demo/ebt --out exports/ebt_demo\n")
    ep.add_argument("run", help="run directory (or its checkpoint)")
    ep.add_argument("--out", required=True, help="the folder to write (new, empty, or an earlier export)")
    ep.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    out = export_run(args.run, args.out)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
