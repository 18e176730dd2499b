"""The README's main job: embedded corpus -> a Transformer++ and an EBT (System 1) of the same size ->
validation and out-of-distribution perplexity side by side.

Sized to finish in under 10 minutes on 2 CPU cores (the data is built once, finished runs are reused).
At this scale the paper expects the EBT to be behind the Transformer++ (it overtakes only with far
more data); the report prints what it measures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ebt.config import DataConfig, ModelConfig, RunConfig, TrainConfig, recipe

MODELS = {"transformer": "Transformer++", "ebt": "EBT (S1)"}


def demo_run(model: str, data_dir: str, out_dir: Path, steps: int, vocab_size: int, pad_id: int) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model=model, size="4xs", context_length=64, vocab_size=vocab_size, pad_token_id=pad_id,
                          ebt=recipe("s1") if model == "ebt" else None),
        data=DataConfig(data_dir=data_dir),
        train=TrainConfig(out_dir=str(out_dir), steps=steps, batch_size=16, warmup_steps=30, eval_every=50,
                          eval_windows=96, eval_batch_size=32, log_every=10, seed=0),
    )


def demo(out: str = "runs/demo", data_dir: str = "data/default", steps: int = 300, log=print) -> dict:
    from ebt.data.loader import TokenData
    from ebt.data.shards import prepare_dataset
    from ebt.evaluate import fmt_ppl
    from ebt.checkpoint import find_checkpoint
    from ebt.train import train

    t0 = time.perf_counter()
    log(f"== 1/4 data: the embedded English corpus in {data_dir} (built once, then reused)")
    prepare_dataset(data_dir, tokenizer="bpe", vocab_size=8192, log=log)
    probe = TokenData(data_dir, "train", 1)
    ood_source = json.loads((Path(data_dir) / "manifest.json").read_text())["corpus"]["ood_source"]
    times = {"data": time.perf_counter() - t0}
    finals = {}
    for i, (model, name) in enumerate(MODELS.items(), start=2):
        log(f"== {i}/4 training the {name}: size 4xs (2 layers, width 128), {steps} steps of 16 x 64 tokens")
        t = time.perf_counter()
        run = demo_run(model, data_dir, Path(out) / model, steps, probe.vocab_size, probe.pad_id)
        done = (Path(run.train.out_dir) / "final_metrics.json")
        if done.exists() and json.loads(done.read_text()).get("step") == steps:
            log(f"   (already trained: reusing {run.train.out_dir})")
            finals[model] = json.loads(done.read_text())
        else:
            resume = find_checkpoint(run.train.out_dir) is not None
            finals[model] = train(run, resume=resume, log=log)
        times[model] = time.perf_counter() - t

    log("== 4/4 report: token-weighted perplexity (lower is better)")
    steps_seen = [h["step"] for h in finals["transformer"]["history"]]
    log(f"{'step':>6} " + " ".join(f"{MODELS[m]:>15}" for m in MODELS))
    for j, s in enumerate(steps_seen):
        row = []
        for m in MODELS:
            hist = finals[m]["history"]
            row.append(f"{fmt_ppl(hist[j]['ppl']):>15}" if j < len(hist) and hist[j]["step"] == s else f"{'-':>15}")
        log(f"{s:>6} " + " ".join(row))
    log("")
    log(f"{'':<34} " + " ".join(f"{MODELS[m]:>15}" for m in MODELS))
    log(f"{'in-domain validation perplexity':<34} " + " ".join(f"{fmt_ppl(finals[m]['val']['ppl']):>15}" for m in MODELS))
    if all("ood" in finals[m] for m in MODELS):
        log(f"{'out-of-distribution (' + ood_source + ')':<34} " + " ".join(f"{fmt_ppl(finals[m]['ood']['ppl']):>15}" for m in MODELS))
    log(f"{'training + evaluation time (s)':<34} " + " ".join(f"{times[m]:>15.0f}" for m in MODELS))
    log(f"data: {times['data']:.0f} s. The paper expects the EBT behind at this scale; it scales faster with data.")
    log(f"checkpoints: {Path(out) / 'transformer' / 'checkpoint'} and {Path(out) / 'ebt' / 'checkpoint'}")
    return finals
