"""`ebt reproduce CLAIM`: one command per finding of the paper, each trained, evaluated with seeds and
intervals, and given a verdict (reproduced / not reproduced / inconclusive at this scale).

Each claim lives in its own module here (CLAIM, SCALES, run); ebt/paper/common.py holds what they share.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from ebt.errors import ConfigError
from ebt.paper.common import SCALE_NAMES, Context, write_report

CLAIMS = ("scaling", "thinking", "verification", "uncertainty", "denoising", "video", "ablations")


def claim_module(name: str):
    if name not in CLAIMS:
        raise ConfigError(f"unknown claim {name!r}: choose one of {', '.join(CLAIMS)} (ebt reproduce --list)")
    return importlib.import_module(f"ebt.paper.{name}")


def list_claims() -> list[str]:
    """One line per claim: its name, the paper's figure and the claim."""
    lines = []
    for name in CLAIMS:
        c = claim_module(name).CLAIM
        lines += [f"{name:<13} {c.title}", f"{'':<13} paper: {c.figure}"]
    return lines


def reproduce(name: str, scale: str = "cpu", out: str = "runs/reproduce", data_dir: str = "data/default",
              seeds: int | None = None, device: str = "cpu", log=print) -> dict:
    """Run one claim at `scale` with `seeds` training seeds (None: the scale's), writing
    out/NAME/NAME.{md,json,png}; trainings are shared between claims in out/runs. Returns the JSON."""
    mod = claim_module(name)
    if scale not in SCALE_NAMES:
        raise ConfigError(f"unknown scale {scale!r}: use one of {', '.join(SCALE_NAMES)}")
    s = mod.SCALES[scale]
    n = seeds or s["seeds"]
    if n < 1:
        raise ConfigError(f"--seeds must be at least 1 (got {n})")
    ctx = Context(claim=name, scale=scale, out=Path(out) / name, runs=Path(out) / "runs", data_dir=data_dir,
                  seeds=tuple(range(n)), device=device, log=log)
    ctx.out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    result = mod.run(ctx, s)
    command = f"ebt reproduce {name} --scale {scale}" + (f" --seeds {seeds}" if seeds else "")
    content = write_report(ctx, mod.CLAIM, result, command)
    log(f"[{name}] {content['verdict']}: {ctx.out / (name + '.md')} ({time.perf_counter() - t:.0f} s)")
    return content


def summary(out: str = "runs/reproduce") -> str:
    """The claims table from the finished claims in `out`: claim | paper | ours | verdict | command."""
    import json

    from ebt.paper.common import table

    rows = []
    for name in CLAIMS:
        path = Path(out) / name / f"{name}.json"
        if not path.exists():
            rows.append([name, claim_module(name).CLAIM.figure, "not run", "-", f"`ebt reproduce {name}`"])
            continue
        c = json.loads(path.read_text())
        first = c["rows"][0]
        rows.append([f"{name}: {c['title']}", c["paper"], f"{first['ours']} ({c['scale']} scale; {first['budget']})",
                     c["verdict"], f"`{c['command']}`"])
    return table(["claim", "paper", "ours (95% interval)", "verdict", "command"], rows)


EXAMPLES = """examples:
  ebt reproduce --list                       # the claims, the paper's figures
  ebt reproduce thinking                     # one claim at CPU scale (seeds, intervals, verdict)
  ebt reproduce --summary                    # the table of every finished claim
  ebt reproduce scaling --scale paper --device cuda   # the paper's sizes, for a GPU cluster
"""


def cmd_reproduce(args) -> None:
    if args.summary:
        print(summary(args.out))
        return
    if args.list or not args.claim:
        print("\n".join(list_claims()))
        return
    from ebt.runtime import resolve_device

    reproduce(args.claim, scale=args.scale, out=args.out, data_dir=args.data, seeds=args.seeds,
              device=str(resolve_device(args.device)))


def add_reproduce_command(sub, fmt) -> None:
    """Register `ebt reproduce` on the CLI's subparsers."""
    from ebt.config import Bound

    rp = sub.add_parser("reproduce", help="one paper claim: train, evaluate with seeds and intervals, verdict",
                        formatter_class=fmt, epilog=EXAMPLES, description=__doc__.split("\n\n")[0])
    rp.add_argument("claim", nargs="?", choices=CLAIMS, metavar="CLAIM", help=f"one of: {', '.join(CLAIMS)}")
    rp.add_argument("--list", action="store_true", help="list the claims and the paper's figures")
    rp.add_argument("--summary", action="store_true",
                    help="print the table of the finished claims in --out (Markdown)")
    rp.add_argument("--scale", choices=SCALE_NAMES, default="cpu",
                    help="cpu: 2 cores in about an hour per claim (default); paper: the paper's sizes; "
                         "tiny: seconds, for tests")
    rp.add_argument("--seeds", type=Bound(int, 1), default=None, help="training seeds (default: the scale's)")
    rp.add_argument("--out", default="runs/reproduce", help="reports in OUT/CLAIM, trainings in OUT/runs")
    rp.add_argument("--data", default="data/default", help="the text data set (prepared if missing)")
    rp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    rp.set_defaults(func=cmd_reproduce)
