"""A/B on one machine: inference (generation and thinking) with dE/dp by autograd against the
written-out gradient (ebt/fast/written_out.py, eager), alternating the two so drift hits both.

    python benchmarks/explicit_inference.py            # CPU, 4xs, V 8192: generation at batch 1 and 8, thinking 8 steps
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import build  # noqa: E402

from ebt.fast.plan import resolve_plan  # noqa: E402
from ebt.generate import GenerateConfig, generate  # noqa: E402
from ebt.think import ThinkConfig, think  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    dev = torch.device(a.device)
    m = build("ebt", "s2", "4xs", 8192, 128, dev).eval()
    tc = ThinkConfig(steps=2, score_final=False, noise=0.0)
    rows = {}
    for _ in range(a.rounds):
        for explicit in (False, True):
            plan = resolve_plan(m, dev, explicit=explicit)
            for b in (1, 8):
                prompts = torch.randint(0, 8192, (b, 32), generator=torch.Generator().manual_seed(0)).tolist()
                generate(m, prompts, GenerateConfig(max_new_tokens=4, think=tc), plan=plan)
                t = time.perf_counter()
                generate(m, prompts, GenerateConfig(max_new_tokens=64, think=tc), plan=plan)
                rows.setdefault((f"generate batch {b}", explicit), []).append(b * 64 / (time.perf_counter() - t))
            x = torch.randint(0, 8192, (8, 128), device=dev)
            cfg = ThinkConfig(steps=8, score_final=False, noise=0.0)
            step = plan.think_step(m, cfg)
            think(m, x, cfg, step=step)
            t = time.perf_counter()
            think(m, x, cfg, step=step)
            rows.setdefault(("think 8 steps, 8 x 128", explicit), []).append(8 * 128 / (time.perf_counter() - t))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | torch {torch.__version__} | {dev} | tokens/s per round\n")
    print("| what | autograd | written out | ratio (medians) |\n|---|---|---|---|")
    for what in dict.fromkeys(k for k, _ in rows):
        ag, ex = rows[(what, False)], rows[(what, True)]
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        print(f"| {what} | {' / '.join(f'{v:,.0f}' for v in ag)} | {' / '.join(f'{v:,.0f}' for v in ex)} | "
              f"{med(ex) / med(ag):.2f}x |")


if __name__ == "__main__":
    main()
