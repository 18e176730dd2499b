"""The README's main job: embedded corpus -> Transformer++ -> validation and out-of-distribution perplexity.

Sized to finish in well under 10 minutes on 2 CPU cores (the data is built once and then reused).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ebt.config import DataConfig, ModelConfig, RunConfig, TrainConfig


def demo(out: str = "runs/demo", data_dir: str = "data/default", steps: int = 600, log=print) -> dict:
    from ebt.data.loader import TokenData
    from ebt.data.shards import prepare_dataset
    from ebt.train import train

    t0 = time.perf_counter()
    log(f"== 1/3 data: building the embedded English corpus in {data_dir} (cached after the first run)")
    prepare_dataset(data_dir, tokenizer="bpe", vocab_size=8192, log=log)
    probe = TokenData(data_dir, "train", 1)
    t_data = time.perf_counter() - t0

    log("== 2/3 training a Transformer++ (4xs: 2 layers, width 128) on CPU")
    out_dir = Path(out) / "transformer"
    run = RunConfig(
        model=ModelConfig(model="transformer", size="4xs", context_length=128, vocab_size=probe.vocab_size,
                          pad_token_id=probe.pad_id),
        data=DataConfig(data_dir=data_dir),
        train=TrainConfig(out_dir=str(out_dir), steps=steps, batch_size=32, warmup_steps=50, eval_every=100,
                          eval_windows=128, log_every=10, seed=0),
    )
    resume = (out_dir / "checkpoint" / "config.json").exists()
    final = train(run, resume=resume, log=log)
    t_train = time.perf_counter() - t0 - t_data

    log("== 3/3 report")
    hist = final["history"]
    log(f"{'step':>6} {'val ppl':>10}")
    for h in hist:
        log(f"{h['step']:>6} {h['ppl']:>10.2f}")
    lines = [f"in-domain validation perplexity : {final['val']['ppl']:.2f} ({final['val']['tokens']:,} tokens)"]
    if "ood" in final:
        lines.append(f"out-of-distribution perplexity  : {final['ood']['ppl']:.2f} ({final['ood']['tokens']:,} tokens, "
                     f"held-out source: {json.loads((Path(data_dir) / 'manifest.json').read_text()).get('ood_source', 'ood')})")
    lines.append(f"time: data {t_data:.0f} s, training+evaluation {t_train:.0f} s; checkpoint in {out_dir / 'checkpoint'}")
    for line in lines:
        log(line)
    return final
