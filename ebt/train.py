"""The training loop, in plain PyTorch.

AdamW with parameter groups, linear warm-up then cosine to lr * min_lr_ratio, global grad-norm
clipping, gradient accumulation, bf16 autocast on CUDA, token-weighted validation, JSON-lines metrics
(+ optional TensorBoard / Weights & Biases), atomic checkpoints that resume bit for bit on CPU, and
DistributedDataParallel under `torchrun`. The loop does not know which model it trains: a model maps
a (B, S+1) window to a dict with "loss" (and "nll_sum"/"n_tokens" for token-weighted averages).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ebt.checkpoint import (load_state, load_training_state, load_weights, publish_checkpoint, read_config,
                            save_checkpoint, set_rng_state, staging_dir, unwrap)
from ebt.config import RunConfig, to_dict
from ebt.errors import CheckpointError, ConfigError, EBTError
from ebt.evaluate import autocast, evaluate_lm, fmt_ppl
from ebt.think import GRAD_METHODS, RECYCLER, draw_steps, step_range
from ebt.models import build_model
from ebt.nn import capture_cuda_graphs


class TrainingError(EBTError):
    """Training cannot go on (for example the loss became NaN)."""


# ---------------------------------------------------------------------------------------------- setup

def setup_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_pref)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but this torch build sees no GPU; use --device cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


class CapturedStep:
    """One training micro-step (forward and backward, e.g. EBT.train_step) captured as a CUDA graph and
    replayed. An EBT step launches thousands of small kernels (every layer, every unroll step, the
    second-order terms) and the CPU cannot issue them as fast as the GPU runs them; a replay issues them
    all at once. A graph needs the same shapes every call, no host synchronisation and no host-side
    randomness, so System 2's recipe is met this way:
    - a random step count is drawn here on the host (as the step itself would draw it), and each
      possible count gets its own graph, all captured at once into one memory pool (they never run at
      the same time);
    - the replay buffer samples and writes on the device (ebt.models.ebt.ReplayBuffer); until it is full
      the number of replayed rows and the rows to sample from change, so those steps run eagerly;
    - the warm-ups before the captures push no rows (`paused`): the replay after capture is the step;
      the allocator's cache (the eager steps' and warm-ups' memory) is emptied before the captures.
    A replay's outputs (its losses and the gradients it binds to .grad) last until the next replay: the
    graphs share their pool, so another count's graph writes its temporaries over them. Use them first
    (clip, optimizer step, summed logs), as the training loop does; clone what must outlive the step.
    `capture` is the capturing function (ebt.nn.capture_cuda_graphs; tests pass a stand-in on CPU)."""

    def __init__(self, model: torch.nn.Module, step, warmup: int = 2, capture=capture_cuda_graphs):
        device = next(model.parameters()).device
        if capture is capture_cuda_graphs and device.type != "cuda":
            raise ConfigError(f"--cuda-graph needs a CUDA device, and the model is on {device}: drop --cuda-graph "
                              f"or train with --device cuda")
        self.model, self.step, self.warmup, self.capture = model, step, warmup, capture
        self.recipe = getattr(getattr(model, "cfg", None), "ebt", None)
        self.replay = getattr(model, "replay", None)
        self.graphs = {}  # step count (None: the recipe's fixed one) -> (graph, (outputs, parameter grads))

    def counts(self) -> list:
        """Every step count the recipe can draw (None: it draws none)."""
        e = self.recipe
        return list(step_range(e)) if e is not None and e.rand_steps else [None]

    def __call__(self, batch: torch.Tensor, **kw) -> dict:
        if self.recipe is not None and self.recipe.rand_steps:
            kw = {**kw, "n_steps": draw_steps(self.recipe, self.model.training)}
        if self.replay is not None and self.model.training and len(self.replay) < self.replay.capacity:
            return self.step(batch, **kw)  # still filling: eager
        if not self.graphs:
            self._capture(batch, kw)
        graph, (out, grads) = self.graphs[kw.get("n_steps")]
        self.static_batch.copy_(batch)
        graph.replay()
        for p, g in zip(self.params, grads):  # the optimizer may have unbound them (set_to_none)
            p.grad = g
        return out

    def _capture(self, batch, kw) -> None:
        self.static_batch = batch.clone()  # the input of every graph, allocated outside their pool
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        def run(n):
            def fn():
                for p in self.params:  # captured from no gradient: each replay writes fresh ones, never adds
                    p.grad = None
                out = self.step(self.static_batch, **{**kw, **({} if n is None else {"n_steps": n})})
                return out, [p.grad for p in self.params]
            return fn

        def warm(n):
            def fn():
                if self.replay is not None:
                    self.replay.paused = True
                try:
                    return run(n)()
                finally:
                    if self.replay is not None:
                        self.replay.paused = False
            return fn

        counts = self.counts()
        graphs = self.capture([run(n) for n in counts], self.warmup, warmup_fns=[warm(n) for n in counts],
                              release=True)
        self.graphs = dict(zip(counts, graphs))


def leave_process_group() -> None:
    """End a torchrun process after training: every rank done, leave the group, exit. Everything is
    written by then; on CPU/gloo a rank sometimes aborts in C++ teardown at interpreter exit
    ("terminate called without an active exception"), which torchrun reports as a failed job, so the
    interpreter's teardown is skipped. Does nothing outside torchrun."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def average_gradients(model: torch.nn.Module, world: int) -> None:
    """Mean of every parameter's gradient over the ranks, in one flat all-reduce (a missing gradient
    counts as zero, so every rank sends the same layout)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine from 1 down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), none on norms and scalars.

    A model can add its own groups (say, a learnable step size with a learning-rate multiplier) by
    defining `extra_param_groups()` returning dicts with "params" and optionally "lr_mult" and
    "weight_decay"; those parameters are left out of the default groups.
    """
    extra = list(getattr(model, "extra_param_groups", lambda: [])())
    taken = {id(p) for g in extra for p in g["params"]}
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in taken]
    groups = [
        {"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": weight_decay, "name": "decay"},
        {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups + extra if g["params"]]


def make_optimizer(model, cfg, lr: float, device: torch.device):
    groups = param_groups(model, cfg.weight_decay)
    for g in groups:
        g["lr"] = lr * g.pop("lr_mult", 1.0)
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": False}  # foreach=False: same math, fewer copies on CPU
    opt = torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    return opt, sched


class MetricsLog:
    """JSON lines in out_dir/metrics.jsonl, mirrored to TensorBoard / W&B when enabled (rank 0 only)."""

    def __init__(self, out_dir: Path, cfg, run_config: dict, enabled: bool):
        self.enabled, self.tb, self.wandb = enabled, None, None
        if not enabled:
            return
        self.file = open(out_dir / "metrics.jsonl", "a")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install 'ebt[tensorboard]'") from e
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ConfigError("--wandb needs the wandb package: pip install 'ebt[wandb]' "
                                  "(credentials are read from WANDB_API_KEY)") from e
            self.wandb = wandb.init(project=cfg.wandb_project, config=run_config, dir=str(out_dir))

    def log(self, split: str, step: int, **values):
        if not self.enabled:
            return
        self.file.write(json.dumps({"split": split, "step": step, **values}) + "\n")
        self.file.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(f"{split}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


def _dtype(precision: str) -> torch.dtype:
    return torch.float64 if precision == "fp64" else torch.float32


def _available_splits(data_dir: str) -> set[str]:
    try:
        return set(json.loads((Path(data_dir) / "manifest.json").read_text())["splits"])
    except (OSError, ValueError, KeyError):
        return set()


def is_video(data_dir) -> bool:
    return (Path(data_dir) / "video.json").is_file()


IMAGES = "images:"  # --data images:fashion_mnist | images:mnist | images:/a/folder


class ImageSplit:
    """ImageData behind the trainer's loader interface (batches of images only; labels are for probes)."""

    def __init__(self, name: str, split: str, cache_dir: str, size: int, channels: int):
        from ebt.data.images import ImageData

        self.images = ImageData(name, split, cache_dir=cache_dir, size=size, channels=channels)
        self.num_windows = self.num_tokens = self.images.num_images
        self.vocab_size = self.pad_id = None
        self.tokenizer_name = f"images:{self.images.name}"

    def train_batch(self, step, global_batch, seed, rank=0, world_size=1):
        return self.images.train_batch(step, global_batch, seed, rank, world_size)

    def eval_batches(self, batch_size, rank=0, world_size=1, max_windows=None):
        for x, _ in self.images.eval_batches(batch_size, rank, world_size, max_images=max_windows):
            yield x


def open_split(dcfg, split: str, context_length: int, features=None, verify: bool = False):
    """The loader for a split: token shards, video clips encoded by `features`, or images."""
    if str(dcfg.data_dir).startswith(IMAGES):
        return ImageSplit(str(dcfg.data_dir)[len(IMAGES):], split, dcfg.image_cache, dcfg.image_size,
                          dcfg.channels)
    if features is not None:
        from ebt.data.video import ClipData

        return ClipData(dcfg.data_dir, split, context_length, features)
    from ebt.data.loader import TokenData  # data layer imported lazily: the models need none of it

    return TokenData(dcfg.data_dir, split, context_length, verify=verify)


def frame_features(run: RunConfig, resume_from: Path | None, out_dir: Path, is_main: bool):
    """For video data: the fixed frame encoder, fitted on the training frames (deterministically, so
    every rank fits the same) or, when resuming, the one saved in the checkpoint. Saved beside the run
    and then inside every checkpoint, so a trained model always travels with its encoder."""
    if str(run.data.data_dir).startswith(IMAGES) or not is_video(run.data.data_dir):
        return None
    import numpy as np

    from ebt.data.video import FrameFeatures

    saved = resume_from / "features" / "features.safetensors" if resume_from is not None else None
    if saved is not None and saved.is_file():
        feats = FrameFeatures.load(saved)
    else:
        clips = np.load(Path(run.data.data_dir) / f"{run.data.train_split}.npy", mmap_mode="r")
        feats = FrameFeatures(run.data.features, run.data.feature_dim, run.data.grid).fit(
            np.asarray(clips).reshape(-1, *clips.shape[2:]), seed=run.train.seed)
    if is_main:
        (out_dir / "features").mkdir(parents=True, exist_ok=True)
        feats.save(out_dir / "features" / "features.safetensors")
    return feats


# ----------------------------------------------------------------------------------------------- train

def train(run: RunConfig, resume: bool = False, log=print) -> dict:
    """Train `run.model` on `run.data` as `run.train` says. Returns the final evaluation."""
    cfg, mcfg = run.train, run.model
    rank, world, device = setup_distributed(cfg.device)
    is_main = rank == 0
    micro = cfg.batch_size // (world * cfg.grad_accum) if cfg.batch_size % (world * cfg.grad_accum) == 0 else 0
    if micro == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a positive multiple of world size ({world}) "
                          f"x grad_accum ({cfg.grad_accum})")
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoint"
    features = frame_features(run, ckpt_dir if resume else None, out_dir, is_main)
    data = open_split(run.data, run.data.train_split, mcfg.context_length, features, verify=run.data.verify)
    val = open_split(run.data, run.data.val_split, mcfg.context_length, features)
    if isinstance(data, ImageSplit):
        if mcfg.candidate != "image":
            raise ConfigError(f"{run.data.data_dir} holds images: train an image model (--model ebt or dit) with "
                              f"candidate='image'")
        data.images.check_model(mcfg.channels, mcfg.image_size)
    elif features is not None:
        if mcfg.candidate != "frames" or mcfg.feature_dim != data.feature_dim:
            raise ConfigError(f"{run.data.data_dir} holds video clips encoded to {data.feature_dim} features, but the "
                              f"model expects {mcfg.candidate} (feature_dim {mcfg.feature_dim}); build it with "
                              f"candidate='frames', feature_dim={data.feature_dim}")
    elif data.vocab_size != mcfg.vocab_size:
        raise ConfigError(
            f"tokenizer/vocabulary mismatch: {run.data.data_dir} was tokenized with {data.tokenizer_name!r} "
            f"(vocabulary {data.vocab_size}) but the model has vocab_size {mcfg.vocab_size}; "
            f"use vocab_size={data.vocab_size} (the CLI does this unless --vocab-size is given)")
    run_dict = to_dict(run)

    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device=device, dtype=_dtype(cfg.precision))
    if cfg.fsdp:  # FSDP2 (ebt/fsdp.py): sharded before the optimizer sees the parameters
        from ebt.fsdp import check_fsdp, shard_model

        check_fsdp(world, cfg)
        model = shard_model(model, device)
    lr = cfg.lr if cfg.lr is not None else mcfg.default_lr
    optimizer, scheduler = make_optimizer(model, cfg, lr, device)
    start_step, tokens_seen = 0, 0
    if resume:
        saved = read_config(ckpt_dir)
        if saved["model"] != to_dict(mcfg):
            raise CheckpointError(f"{ckpt_dir} was trained with model config {saved['model']}, not {to_dict(mcfg)}: "
                                  f"resume with the same model flags or use a new --out directory")
        state = load_training_state(ckpt_dir)
        if cfg.fsdp:
            from ebt.fsdp import load_full_state

            load_full_state(model, optimizer, load_state(ckpt_dir), state["optimizer"])
        else:
            load_weights(model, {k: v.to(device) for k, v in load_state(ckpt_dir).items()}, str(ckpt_dir))
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step, tokens_seen = state["trainer"]["step"], state["trainer"]["tokens_seen"]
        if getattr(model, "replay", None) is not None:
            f = ckpt_dir / f"replay_rank{rank}.pt"
            if f.is_file():
                model.replay.load_state_dict(torch.load(f, map_location=device, weights_only=False))
            else:
                log(f"rank {rank}: no replay buffer in {ckpt_dir} (saved with {state['trainer'].get('world_size')} "
                    f"processes); this rank starts with an empty one")
        if is_main:
            log(f"resumed from {ckpt_dir} at step {start_step}")
    elif is_main and (ckpt_dir / "config.json").exists():
        raise CheckpointError(f"{ckpt_dir} already holds a checkpoint: pass --resume to continue it, "
                              f"or choose another --out directory (nothing was overwritten)")
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(run_dict, indent=2, sort_keys=True) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    own_step = None if cfg.fsdp else getattr(model, "train_step", None)
    if own_step is not None and cfg.compile and hasattr(model, "compile_grad"):
        # an EBT's second-order step is not compilable as a whole: its written-out energy gradient is
        # (ebt.energy_grad), for training and for validation's thinking
        model.compile_grad = True
        fwd = model
        if is_main:
            log("EBT --compile: the written-out energy gradient and the loss gradient run through torch.compile "
                "(ebt/energy_grad.py; the first steps pay the compilation)")
    else:
        fwd = torch.compile(model) if cfg.compile else model
    # an EBT runs forward and backward itself, one unroll step's graph at a time (EBT.train_step);
    # its gradients are then averaged across ranks here rather than by DDP's per-backward hooks
    # Under FSDP it takes the plain forward + backward (FSDP's hooks wrap forward calls and reduce-scatter
    # in the loss's backward; train_step's own backward would bypass them).
    if own_step is not None:
        if cfg.ebt_grad not in ("auto", *GRAD_METHODS):
            raise ConfigError(f"unknown ebt_grad {cfg.ebt_grad!r}; choose auto or one of {GRAD_METHODS}")
        model.grad_method = cfg.ebt_grad  # auto: chosen per device and compilation (ebt.think.auto_grad_method)
    if cfg.cuda_graph:
        if own_step is None:
            raise ConfigError("--cuda-graph applies to EBT training steps (Transformer++: use --compile)")
        if cfg.grad_accum != 1:
            raise ConfigError("--cuda-graph replays one whole micro-step: use --grad-accum 1")
        own_step = CapturedStep(model, own_step)
    if world > 1 and own_step is not None:
        for p in model.parameters():  # what DDP's constructor does: every rank starts from rank 0's weights
            dist.broadcast(p.data, 0)
    elif world > 1 and not cfg.fsdp:
        fwd = DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)

    metrics = MetricsLog(out_dir, cfg, run_dict, enabled=is_main)
    extra = {name: d for name, d in (("tokenizer", Path(run.data.data_dir) / "tokenizer"),
                                     ("features", out_dir / "features")) if d.is_dir()}

    replay = getattr(model, "replay", None)

    def checkpoint(step):
        if cfg.fsdp:  # full tensors, gathered by every process
            from ebt.fsdp import full_state

            saved_model, saved_optimizer = full_state(model, optimizer)
        else:
            saved_model, saved_optimizer = model, optimizer
        if is_main:
            save_checkpoint(ckpt_dir, saved_model, run_dict, saved_optimizer, scheduler,
                            {"step": step, "tokens_seen": tokens_seen, "world_size": world,
                             "data_position": {"step": step, "seed": cfg.seed}},
                            extra_dirs=extra, publish=False)
        if world > 1:
            dist.barrier()
        if replay is not None:  # every rank writes its own buffer into the staged checkpoint
            torch.save(replay.state_dict(), staging_dir(ckpt_dir) / f"replay_rank{rank}.pt")
        if world > 1:
            dist.barrier()
        if is_main:
            publish_checkpoint(ckpt_dir)
        if world > 1:
            dist.barrier()

    def validate(step):
        RECYCLER.clear()  # the training step's reused (B, S, V) tensors would add to evaluation's own
        res = evaluate_lm(model, val, cfg.eval_batch_size, cfg.eval_windows, device, cfg.precision)
        metrics.log("val", step, loss=res["loss"], ppl=res["ppl"], tokens=res["tokens"])
        if is_main:
            ppl = {"tokens": f" | val ppl {fmt_ppl(res['ppl'])}", "frames": " (Smooth L1 per frame)",
                   "image": " (per image: Smooth L1 for the EBT, the DDPM noise MSE for the DiT)"}[mcfg.candidate]
            log(f"step {step:6d} | val loss {res['loss']:.4f}{ppl}")
        return res

    if is_main and getattr(model, "replay", None) is not None:
        e = mcfg.ebt
        row = (mcfg.context_length + 1) * 8 + mcfg.context_length * mcfg.vocab_size * 4
        log(f"replay buffer: {e.replay_buffer} rows x {row / 2**20:.1f} MiB = {e.replay_buffer * row / 2**20:.0f} MiB "
            f"per process (bounded; set with --replay-buffer)")
    if is_main:
        log(f"model {mcfg.model} {mcfg.size} ({mcfg.n_layer} layers, d {mcfg.d_model}): {n_params / 1e6:.2f}M params | "
            f"{data.num_tokens:,} train tokens | {world} process(es) on {device} | global batch {cfg.batch_size} "
            f"x {mcfg.context_length} tokens, {cfg.grad_accum} micro-step(s)")
    history = []
    if start_step == 0:
        history.append({"step": 0, **validate(0)})
    from tqdm.auto import tqdm

    # a live bar on a terminal; in logs (CI, cluster jobs) one plain line per log interval instead
    use_bar = cfg.progress and is_main and sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not use_bar, desc="train", dynamic_ncols=True)
    model.train()
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step, checked lazily
    t0, tokens_at_t0, loss_sum = time.perf_counter(), tokens_seen, torch.zeros((), device=device)
    extras: dict[str, torch.Tensor] = {}  # summed over the log interval, like loss_sum
    last = min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps
    for step in range(start_step, last):
        rows = data.train_batch(step, cfg.batch_size, cfg.seed, rank, world)
        step_loss = torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            batch = rows[m * micro:(m + 1) * micro].to(device, non_blocking=True)
            if own_step is not None:
                with autocast(device, cfg.precision):
                    out = own_step(batch, scale=1.0 / cfg.grad_accum)
            else:
                sync = contextlib.nullcontext() if world == 1 or m == cfg.grad_accum - 1 else fwd.no_sync()
                with sync, autocast(device, cfg.precision):
                    out = fwd(batch)
                (out["loss"] / cfg.grad_accum).backward()
            step_loss += out["loss"].detach().float() / cfg.grad_accum
            for k, v in out.items():  # model metrics (an EBT's per-step CE, energy gap, alpha...)
                if k not in ("loss", "nll_sum", "n_tokens"):
                    extras[k] = extras.get(k, 0.0) + v.detach().float() / cfg.grad_accum
        if world > 1 and own_step is not None:
            average_gradients(model, world)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # FSDP: a DTensor
        finite = torch.isfinite(step_loss) & torch.isfinite(gnorm)
        for v in extras.values():
            finite &= torch.isfinite(v).all()
        bad_step = torch.where((bad_step < 0) & ~finite, torch.full_like(bad_step, step), bad_step)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += cfg.batch_size * (1 if mcfg.candidate == "image" else mcfg.context_length)
        loss_sum += step_loss
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            if int(bad_step) >= 0:  # one host sync per log interval, not per step
                hint = getattr(unwrap(model), "nonfinite_hint", "lower the learning rate (--lr), check the data, "
                               "or raise --warmup-steps")
                raise TrainingError(
                    f"loss, energy or gradient became non-finite at step {int(bad_step)}: {hint}; "
                    f"the last good checkpoint is in {ckpt_dir}")
            n = done % cfg.log_every or cfg.log_every
            dt = time.perf_counter() - t0
            train_loss = float(loss_sum) / n
            rec = {"loss": train_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(gnorm),
                   "tokens_per_s": (tokens_seen - tokens_at_t0) / dt, "tokens_seen": tokens_seen,
                   **{k: float(v) / n for k, v in extras.items()}}
            extras = {}
            metrics.log("train", done, **rec)
            think = {"ce1": f"{rec['ce_first']:.2f}", "ceN": f"{rec['ce_last']:.2f}"} if "ce_last" in rec else {}
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", **think)
            if is_main and cfg.progress and not use_bar:
                log(f"step {done:6d} | loss {train_loss:.4f} | " + "".join(f"{k} {v} | " for k, v in think.items())
                    + f"{rec['tokens_per_s']:.0f} tok/s")
            t0, tokens_at_t0, loss_sum = time.perf_counter(), tokens_seen, torch.zeros((), device=device)
        evaluated = False
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            history.append({"step": done, **validate(done)})
            evaluated = True
        if (cfg.save_every and done % cfg.save_every == 0) or (evaluated and not cfg.save_every):
            checkpoint(done)
    bar.close()
    if last < cfg.steps:  # a time-boxed piece of a longer run: save and leave the rest to --resume
        checkpoint(last)
        metrics.close()
        RECYCLER.clear()
        return {"step": last, "tokens_seen": tokens_seen, "stopped_early": True, "history": history}
    final = {"step": cfg.steps, "tokens_seen": tokens_seen, "params": n_params}
    if start_step < cfg.steps or not history:
        final["val"] = validate(cfg.steps)
        history.append({"step": cfg.steps, **final["val"]})
    checkpoint(cfg.steps)
    for split in run.data.ood_splits:
        if split in _available_splits(run.data.data_dir):
            ood = open_split(run.data, split, mcfg.context_length, features)
            res = evaluate_lm(model, ood, cfg.eval_batch_size, cfg.eval_windows, device, cfg.precision)
            metrics.log(split, cfg.steps, loss=res["loss"], ppl=res["ppl"], tokens=res["tokens"])
            final[split] = res
    final["history"] = history
    if is_main:
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2) + "\n")
    metrics.close()
    RECYCLER.clear()
    return final
