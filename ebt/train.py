"""The training loop, in plain PyTorch.

AdamW with the official parameter groups and schedule (linear warm-up, then cosine to lr * min_lr_ratio),
global grad-norm clipping, gradient accumulation, bf16 autocast on CUDA, token-weighted validation,
JSON-lines metrics (+ optional TensorBoard / Weights & Biases), atomic checkpoints that resume bit for
bit on CPU, and DistributedDataParallel under `torchrun`. The loop does not know which model it trains:
a model maps a (B, S+1) window to a dict with "loss" (and "nll_sum"/"n_tokens" for token-weighted
averages)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ebt.checkpoint import (NonFiniteWeights, find_checkpoint, load_pt, load_state, load_training_state,
                            load_weights, publish_checkpoint, read_config, remove_checkpoint, save_checkpoint,
                            save_staged, set_rng_state, unwrap)
from ebt.config import RunConfig, to_dict
from ebt.errors import CheckpointError, ConfigError, EBTError, first_line
from ebt.evaluate import evaluate_lm, fmt_ppl
from ebt.runtime import autocast, resolve_device
from ebt.fast.plan import GRAD_METHODS, resolve_plan
from ebt.objective import train_step, trains_itself
from ebt.models import build_model
from ebt.fast.cuda_graph import UNPROVEN, CapturedStep, draws_in_step


class TrainingError(EBTError):
    """Training cannot go on (for example the loss became NaN)."""


# ---------------------------------------------------------------------------------------------- setup

def setup_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


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


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, divider: float = -1.0,
              mult: float = 1.0) -> float:
    """The official schedule (optimization.py, WarmUpCosineAnnealingLR) at optimizer step `step` (from 0),
    as a fraction of the group's peak, `mult` x the run's peak lr: linear warm-up over `warmup` steps from
    0 (divider -1) or from peak / divider, then PyTorch's cosine towards ONE floor, min_ratio x the run's
    peak, for every group (alpha's group, mult > 1, decays to the run's floor, not to its own peak x
    min_ratio)."""
    t = step + 1  # the official scheduler steps once when it is built: step k runs at its (k+1)-th value
    if t <= warmup:
        start = 0.0 if divider == -1 else 1 / divider
        return start + (1 - start) * t / warmup
    floor = min_ratio / mult if mult > 0 else 0.0  # a zero multiplier keeps alpha fixed
    # no clamp past `total`, as CosineAnnealingLR; train() never runs past it
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total - warmup)))


def param_groups(model: torch.nn.Module, weight_decay: float, matrices_only: bool = False) -> list[dict]:
    """AdamW groups as the official trainer builds them: one group decays every parameter, norms and
    embeddings included; matrices_only (opt-in) decays only weights of >= 2 dimensions instead.

    A model can add its own groups (an EBT's alpha: lr x multiplier, no decay) by defining
    `extra_param_groups()` returning dicts with "params" and optionally "lr_mult" and "weight_decay";
    those parameters are left out of the others. The model's own groups come last, so group 0 is the
    run's peak lr (the one the metrics log)."""
    extra = list(getattr(model, "extra_param_groups", lambda: [])())
    taken = {id(p) for g in extra for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    if not matrices_only:
        groups = [{"params": rest, "weight_decay": weight_decay, "name": "decay"}]
        return [g for g in groups + extra if g["params"]]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "name": "decay"},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups + extra if g["params"]]


def make_optimizer(model, cfg, lr: float, device: torch.device):
    """AdamW over `param_groups`, each on the official schedule (`lr_factor`), peak lr x its multiplier."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_matrices_only)
    mults = [g.pop("lr_mult", 1.0) for g in groups]
    for g, mult in zip(groups, mults):
        g["lr"] = lr * mult
    # foreach=False: the same maths with fewer copies on CPU
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": False}
    opt = torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), **kwargs)
    c = cfg
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [
        lambda s, m=m: lr_factor(s, c.warmup_steps, c.steps, c.min_lr_ratio, c.warmup_base_lr_divider, m)
        for m in mults])
    return opt, sched


def optimizer_step(model, own_step, fwd, rows: torch.Tensor, optimizer, scheduler, cfg, device: torch.device,
                   world: int = 1, init: torch.Tensor | None = None):
    """One optimizer step in the official trainer's order: forward and backward of each micro-batch of
    `rows` (own_step: the model's own forward + backward, e.g. ebt.objective.train_step; else fwd's
    loss.backward()), gradients averaged over ranks, clipped by global norm, AdamW step, schedule
    step. init: the EBT's
    starting candidates (a reference replay), else the model draws them. Returns (loss, summed model
    metrics, gradient norm before clipping) in the run's precision (fp64 keeps float64). The training
    loop and `ebt check-reference` (ebt.compat.official) share it."""
    accum = cfg.grad_accum
    micro = rows.shape[0] // accum
    dt = _dtype(cfg.precision)
    step_loss, extras = torch.zeros((), device=device, dtype=dt), {}
    for m in range(accum):
        part = slice(m * micro, (m + 1) * micro)
        batch = rows[part].to(device, non_blocking=True)
        if own_step is not None:
            kw = {} if init is None else {"init": init[part].to(device)}
            with autocast(device, cfg.precision):
                out = own_step(batch, scale=1.0 / accum, **kw)
        else:
            sync = contextlib.nullcontext() if world == 1 or m == accum - 1 else fwd.no_sync()
            with sync, autocast(device, cfg.precision):
                out = fwd(batch)
            (out["loss"] / accum).backward()
        step_loss += out["loss"].detach().to(dt) / accum
        for k, v in out.items():  # model metrics (an EBT's per-step CE, energy gap, alpha...)
            if k not in ("loss", "nll_sum", "n_tokens"):
                extras[k] = extras.get(k, 0.0) + v.detach().to(dt) / accum
    if world > 1 and own_step is not None:
        average_gradients(model, world)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # FSDP: a DTensor
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, extras, gnorm


# per candidate type: what a step consumes, the rate's name, and the first/last step loss's names
LOG_UNITS = {"tokens": ("tokens", "tok/s", ("ce1", "ceN")),
             "frames": ("frames", "frames/s", ("sl1_1", "sl1_N")),  # Smooth L1 on the next frame
             "image": ("images", "images/s", ("sl1_1", "sl1_N"))}  # Smooth L1 to the clean image


class MetricsLog:
    """JSON lines in out_dir/metrics.jsonl, mirrored to TensorBoard / W&B when enabled (rank 0 only)."""

    def __init__(self, out_dir: Path, cfg, run_config: dict, enabled: bool, keep_until: int | None = None):
        """keep_until: the step a resumed run continues from; rows logged after it (by the run that died
        after its last checkpoint) are dropped so no step appears twice. None: a new run, a new file."""
        self.enabled, self.tb, self.wandb = enabled, None, None
        if not enabled:
            return
        path = out_dir / "metrics.jsonl"
        kept = _rows_until(path, keep_until) if keep_until is not None else []
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        self.file = open(path, "a")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install "
                                  "'ebt[tensorboard]'") from e
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        if cfg.wandb:  # key and package checked by train() before any work (check_wandb)
            import wandb

            try:
                self.wandb = wandb.init(project=cfg.wandb_project, config=run_config, dir=str(out_dir))
            except Exception as e:  # wandb's own errors (bad key, no network) are not ours to trace back
                raise ConfigError(f"--wandb: Weights & Biases refused to start ({first_line(e)}); "
                                  f"check WANDB_API_KEY, or drop --wandb") from e

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


def _rows_until(path: Path, step: int) -> list[str]:
    """The lines of a metrics file logged at or before `step` (a torn last line is dropped)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    return kept


def check_wandb() -> None:
    """--wandb takes its key from WANDB_API_KEY only (never ~/.netrc) and needs the package: checked at
    start."""
    if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        raise ConfigError("--wandb needs WANDB_API_KEY in the environment (or WANDB_MODE=offline); "
                          "set it, or drop --wandb")
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ConfigError("--wandb needs the wandb package: pip install 'ebt[wandb]' "
                          "(credentials are read from WANDB_API_KEY)") from e


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
    """The loader for a split: token shards (packed or document windows), video clips encoded by
    `features`, or images."""
    if dcfg.windows != "packed" and (features is not None or str(dcfg.data_dir).startswith(IMAGES)):
        raise ConfigError(f"windows={dcfg.windows!r} applies to token data; {dcfg.data_dir} holds "
                          f"{'images' if features is None else 'video clips'} (use windows='packed')")
    if str(dcfg.data_dir).startswith(IMAGES):
        return ImageSplit(str(dcfg.data_dir)[len(IMAGES):], split, dcfg.image_cache, dcfg.image_size,
                          dcfg.channels)
    if features is not None:
        from ebt.data.video import ClipData

        return ClipData(dcfg.data_dir, split, context_length, features)
    from ebt.data.loader import TokenData  # data layer imported lazily: the models need none of it

    return TokenData(dcfg.data_dir, split, context_length, verify=verify, windows=dcfg.windows)


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

def warmup_warning(cfg) -> str:
    """A run shorter than its warm-up never reaches its peak learning rate: say so before it starts."""
    last = lr_factor(cfg.steps - 1, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, cfg.warmup_base_lr_divider)
    return (f"warning: --warmup-steps {cfg.warmup_steps} is not below --steps {cfg.steps}: the learning "
            f"rate only warms up (its last step at {100 * last:.0f}% of the peak) and early figures will "
            f"look poor; lower --warmup-steps (about a tenth of --steps is usual)")


def resume_from(src: Path, model, optimizer, scheduler, mcfg, cfg, rank: int, device, log) -> tuple[int, int]:
    """Load weights, optimizer, schedule, RNG and replay buffer, all from the one checkpoint `src`.
    Returns (step, tokens seen)."""
    saved, ours = read_config(src)["model"], to_dict(mcfg)
    if saved != ours:
        keys = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        diff = "; ".join(f"{k}: {saved.get(k)!r} there, {ours.get(k)!r} here" for k in keys)
        raise CheckpointError(f"{src} was trained with another model config ({diff}): resume with its model "
                              f"flags (or none: --resume reads them from the run's config.json) or use a new "
                              f"--out directory")
    state = load_training_state(src)
    if cfg.fsdp:
        from ebt.fsdp import load_full_state

        load_full_state(model, optimizer, load_state(src), state["optimizer"])
    else:
        load_weights(model, {k: v.to(device) for k, v in load_state(src).items()}, str(src))
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:  # other parameter groups: an older version or other settings
            raise CheckpointError(f"{src / 'optimizer.pt'} does not fit this run's optimizer ({e}): it was "
                                  f"written by an older ebt or with other optimizer settings "
                                  f"(--decay-matrices-only); resume with the settings it was written with, "
                                  f"or start anew with --force") from e
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    if getattr(model, "replay", None) is not None:
        f = src / f"replay_rank{rank}.pt"
        if f.is_file():
            try:
                model.replay.load_state_dict({k: v.to(device) if isinstance(v, torch.Tensor) else v
                                              for k, v in load_pt(f, "replay buffer").items()})
            except (ConfigError, AttributeError) as e:
                raise CheckpointError(f"{f}: {e}" if isinstance(e, ConfigError) else f"{f} is not a replay "
                                      f"buffer (corrupt); resume from another checkpoint") from e
        else:
            log(f"rank {rank}: no replay buffer in {src} (saved with {state['trainer'].get('world_size')} "
                f"processes); this rank starts with an empty one")
    return state["trainer"]["step"], state["trainer"]["tokens_seen"]


def start_point(out_dir: Path, resume: bool, force: bool) -> Path | None:
    """The checkpoint a run continues from (None: a new run). A new run never silently replaces a
    checkpoint: it refuses one it finds unless `force`."""
    found = find_checkpoint(out_dir)
    if resume:
        if found is None:
            raise CheckpointError(f"--resume: {out_dir} holds no checkpoint to continue; drop --resume to "
                                  f"start a new run there")
        return found
    if found is not None and not force:
        raise CheckpointError(f"{found} already holds a checkpoint: pass --resume to continue it, --force to "
                              f"start again and replace it, or choose another --out directory (nothing was "
                              f"overwritten)")
    return None


def open_ood_splits(run: RunConfig, features) -> dict:
    """The out-of-distribution splits the data has, opened (and so checked) before training starts."""
    have = _available_splits(run.data.data_dir)
    return {s: open_split(run.data, s, run.model.context_length, features)
            for s in run.data.ood_splits if s in have}


def open_data(run: RunConfig, src: Path | None, out_dir: Path, is_main: bool):
    """(train split, val split, ood splits) opened and checked against the model before any work."""
    mcfg = run.model
    features = frame_features(run, src, out_dir, is_main)
    data = open_split(run.data, run.data.train_split, mcfg.context_length, features, verify=run.data.verify)
    val = open_split(run.data, run.data.val_split, mcfg.context_length, features)
    if run.data.windows == "document" and mcfg.pad_token_id != data.loss_pad_id:  # else padding is scored
        raise ConfigError(f"document windows are padded with eos id {data.loss_pad_id}, which the loss must "
                          f"ignore: set pad_token_id={data.loss_pad_id}, not {mcfg.pad_token_id}")
    ood = open_ood_splits(run, features)
    if isinstance(data, ImageSplit):
        if mcfg.candidate != "image":
            raise ConfigError(f"{run.data.data_dir} holds images: train an image model (--model ebt or "
                              f"dit) with candidate='image'")
        data.images.check_model(mcfg.channels, mcfg.image_size)
    elif features is not None:
        if mcfg.candidate != "frames" or mcfg.feature_dim != data.feature_dim:
            raise ConfigError(f"{run.data.data_dir} holds video clips encoded to {data.feature_dim} "
                              f"features, but the model expects {mcfg.candidate} (feature_dim "
                              f"{mcfg.feature_dim}); build it with candidate='frames', "
                              f"feature_dim={data.feature_dim}")
    elif data.vocab_size != mcfg.vocab_size:
        raise ConfigError(
            f"tokenizer/vocabulary mismatch: {run.data.data_dir} was tokenized with {data.tokenizer_name!r} "
            f"(vocabulary {data.vocab_size}) but the model has vocab_size {mcfg.vocab_size}; "
            f"use vocab_size={data.vocab_size} (the CLI does this unless --vocab-size is given)")
    return data, val, ood


def step_functions(model, cfg, world: int, device: torch.device, is_main: bool, log):
    """(plan, own_step, fwd): the run's paths (ebt.fast.plan, resolved once, here), the model's own forward
    + backward (an EBT's ebt.objective.train_step, maybe replayed as a CUDA graph; None for the plain path)
    and the forward the plain path calls (compiled, or wrapped by DDP)."""
    own = not cfg.fsdp and trains_itself(model)
    if own and cfg.ebt_grad not in ("auto", *GRAD_METHODS):
        raise ConfigError(f"unknown ebt_grad {cfg.ebt_grad!r}; choose auto or one of {GRAD_METHODS}")
    # an EBT's second-order step is not compilable as a whole: its written-out energy gradient is
    # (ebt.fast.written_out), for training and for validation's thinking; "auto": per device and compilation
    plan = resolve_plan(model, device, compile=own and cfg.compile, cuda_graph=cfg.cuda_graph,
                        grad=cfg.ebt_grad if own else "auto")
    own_step = partial(train_step, model, plan=plan) if own else None
    if own and cfg.compile:
        fwd = model
        if is_main:
            log("EBT --compile: the written-out energy gradient and the loss gradient run through "
                "torch.compile (ebt/fast/written_out.py; the first steps pay the compilation)")
    else:
        fwd = torch.compile(model) if cfg.compile else model
    # an EBT runs forward and backward itself, one unroll step's graph at a time (ebt.objective.train_step);
    # its gradients are then averaged across ranks here rather than by DDP's per-backward hooks
    # Under FSDP it takes the plain forward + backward (FSDP's hooks wrap forward calls and reduce-scatter
    # in the loss's backward; train_step's own backward would bypass them).
    if cfg.cuda_graph:
        if own_step is None:
            raise ConfigError("--cuda-graph applies to EBT training steps (Transformer++: use --compile)")
        if cfg.grad_accum != 1:
            raise ConfigError("--cuda-graph replays one whole micro-step: use --grad-accum 1")
        if device.type == "cuda" and draws_in_step(getattr(model.cfg, "ebt", None)):
            raise ConfigError(UNPROVEN)  # on the CPU the stand-in capture's bookkeeping stays testable
        own_step = CapturedStep(model, own_step)
    if world > 1 and own_step is not None:
        for p in model.parameters():  # what DDP's constructor does: every rank starts from rank 0's weights
            dist.broadcast(p.data, 0)
    elif world > 1 and not cfg.fsdp:
        fwd = DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    return plan, own_step, fwd


class Trainer:
    """One training run's state and its pieces: set-up (__init__), one optimizer step, the log of an
    interval, validation, checkpointing and the end. `train` is the loop over them."""

    def __init__(self, run: RunConfig, resume: bool, force: bool, log):
        cfg = self.cfg = run.train
        self.mcfg, self.log = run.model, log
        self.rank, self.world, self.device = setup_distributed(cfg.device)
        self.is_main = self.rank == 0
        per_step = self.world * cfg.grad_accum
        if cfg.batch_size % per_step or cfg.batch_size < per_step:  # each micro-step gets >= 1 row
            raise ConfigError(f"batch_size {cfg.batch_size} must be a positive multiple of world size "
                              f"({self.world}) x grad_accum ({cfg.grad_accum})")
        self.out_dir = out_dir = Path(cfg.out_dir)
        self.ckpt_dir = out_dir / "checkpoint"
        src = start_point(out_dir, resume, force)  # every file of a resumed checkpoint is read from src
        if force and src is None and self.is_main:
            remove_checkpoint(out_dir)
        self.data, self.val, self.ood = open_data(run, src, out_dir, self.is_main)
        self.run_dict = to_dict(run)
        self._build_model(src)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.plan, self.own_step, self.fwd = step_functions(self.model, cfg, self.world, self.device,
                                                            self.is_main, log)
        self.eval_plan = self.plan if hasattr(self.model, "energy_from") else None  # EBTs think with it
        self.metrics = MetricsLog(out_dir, cfg, self.run_dict, enabled=self.is_main,
                                  keep_until=self.start_step if src is not None else None)
        self.extra = {name: d for name, d in (("tokenizer", Path(run.data.data_dir) / "tokenizer"),
                                              ("features", out_dir / "features")) if d.is_dir()}
        self.replay = getattr(self.model, "replay", None)
        self.last_good = (src, self.start_step) if src is not None else None  # newest checkpoint known finite
        if self.is_main:
            self._announce()
        self.history = []
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite step
        self.use_bar = cfg.progress and self.is_main and sys.stderr.isatty()

    def _build_model(self, src: Path | None) -> None:
        """The model (seeded, sharded under FSDP), its optimizer and schedule, resumed from `src` if given."""
        cfg, mcfg, device = self.cfg, self.mcfg, self.device
        torch.manual_seed(cfg.seed)
        model = build_model(mcfg).to(device=device, dtype=_dtype(cfg.precision))
        if cfg.fsdp:  # FSDP2 (ebt/fsdp.py): sharded before the optimizer sees the parameters
            from ebt.fsdp import check_fsdp, shard_model

            check_fsdp(self.world, cfg)
            model = shard_model(model, device)
        lr = cfg.lr if cfg.lr is not None else mcfg.default_lr
        self.model = model
        self.optimizer, self.scheduler = make_optimizer(model, cfg, lr, device)
        self.start_step, self.tokens_seen = 0, 0
        if src is not None:
            self.start_step, self.tokens_seen = resume_from(src, model, self.optimizer, self.scheduler, mcfg,
                                                            cfg, self.rank, device, self.log)
            if self.start_step > cfg.steps:
                at = self.start_step
                raise ConfigError(f"--steps {cfg.steps} is below the step of the checkpoint in {src} ({at}): "
                                  f"pass --steps above {at} to train further")
            if self.is_main:
                self.log(f"resumed from {src} at step {self.start_step}")
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            config = json.dumps(self.run_dict, indent=2, sort_keys=True)
            (self.out_dir / "config.json").write_text(config + "\n")

    def _announce(self) -> None:
        """What runs: the replay buffer's memory, the model, the data and the batch."""
        cfg, mcfg, log = self.cfg, self.mcfg, self.log
        if self.replay is not None:
            e = mcfg.ebt
            row = (mcfg.context_length + 1) * 8 + mcfg.context_length * mcfg.vocab_size * 4
            log(f"replay buffer: {e.replay_buffer} rows x {row / 2**20:.1f} MiB = "
                f"{e.replay_buffer * row / 2**20:.0f} MiB per process (bounded; set with --replay-buffer)")
        unit = LOG_UNITS[mcfg.candidate][0]
        per_row = "" if unit == "images" else f" x {mcfg.context_length}"
        batch = f"{cfg.batch_size}{per_row} {unit}"
        log(f"model {mcfg.model} {mcfg.size} ({mcfg.n_layer} layers, d {mcfg.d_model}): "
            f"{self.n_params / 1e6:.2f}M params | {self.data.num_tokens:,} train {unit} | {self.world} "
            f"process(es) on {self.device} | global batch {batch}, {cfg.grad_accum} micro-step(s)")
        if cfg.warmup_steps >= cfg.steps:
            log(warmup_warning(cfg))

    def restart_clock(self) -> None:
        """Start a log interval: its time, tokens, summed loss and summed model metrics."""
        self.t0, self.tokens_at_t0 = time.perf_counter(), self.tokens_seen
        self.loss_sum, self.extras, self.steps_summed = torch.zeros((), device=self.device), {}, 0

    def step(self, step: int) -> None:
        """One optimizer step; its figures stay on the device (no host sync) until the interval's report."""
        cfg, mcfg = self.cfg, self.mcfg
        rows = self.data.train_batch(step, cfg.batch_size, cfg.seed, self.rank, self.world)
        step_loss, step_extras, self.gnorm = optimizer_step(self.model, self.own_step, self.fwd, rows,
                                                            self.optimizer, self.scheduler, cfg, self.device,
                                                            self.world)
        for k, v in step_extras.items():  # summed over the log interval
            self.extras[k] = self.extras.get(k, 0.0) + v
        finite = torch.isfinite(step_loss) & torch.isfinite(self.gnorm)
        for v in self.extras.values():
            finite &= torch.isfinite(v).all()
        bad = self.bad_step
        self.bad_step = torch.where((bad < 0) & ~finite, torch.full_like(bad, step), bad)
        self.tokens_seen += cfg.batch_size * (1 if mcfg.candidate == "image" else mcfg.context_length)
        self.loss_sum += step_loss
        self.steps_summed += 1

    def check_finite(self) -> None:
        """One host sync: a non-finite step stops the run before it is logged or saved."""
        if int(self.bad_step) >= 0:
            raise self.nonfinite(f"loss, energy or gradient became non-finite at step {int(self.bad_step)}")

    def report(self, done: int, bar) -> None:
        """Log the interval that ends after `done` steps (metrics file, progress bar or one plain line)."""
        cfg = self.cfg
        self.check_finite()  # one host sync per log interval, not per step
        n = max(self.steps_summed, 1)  # a run resumed mid-interval has summed fewer than log_every steps
        dt = time.perf_counter() - self.t0
        train_loss = float(self.loss_sum) / n
        rec = {"loss": train_loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(self.gnorm),
               "tokens_per_s": (self.tokens_seen - self.tokens_at_t0) / dt, "tokens_seen": self.tokens_seen,
               **{k: float(v) / n for k, v in self.extras.items()}}
        unit, rate, (first, last) = LOG_UNITS[self.mcfg.candidate]
        if unit != "tokens":  # the same figures under their own names; the token keys stay for old readers
            rec.update({f"{unit}_per_s": rec["tokens_per_s"], f"{unit}_seen": rec["tokens_seen"]})
        self.metrics.log("train", done, **rec)
        think = {first: f"{rec['ce_first']:.2f}", last: f"{rec['ce_last']:.2f}"} if "ce_last" in rec else {}
        bar.set_postfix({"loss": f"{train_loss:.3f}", rate.replace("/", "_"): f"{rec['tokens_per_s']:.0f}",
                         **think})
        if self.is_main and cfg.progress and not self.use_bar:
            self.log(f"step {done:6d} | loss {train_loss:.4f} | "
                     + "".join(f"{k} {v} | " for k, v in think.items()) + f"{rec['tokens_per_s']:.0f} {rate}")
        self.restart_clock()

    def nonfinite(self, what: str) -> TrainingError:
        """The error that stops a run gone non-finite: what to change and where to continue from."""
        hint = getattr(unwrap(self.model), "nonfinite_hint", "lower the learning rate (--lr), check the "
                       "data, or raise --warmup-steps")
        good = self.last_good
        where = (f"the last good checkpoint is {good[0]} (step {good[1]}): fix the setting, then continue it "
                 f"with --resume" if good else "no checkpoint was written (none holds finite weights)")
        return TrainingError(f"{what}: {hint}; {where}")

    def validate(self, step: int) -> dict:
        """Token-weighted validation, logged."""
        self.plan.pool.clear()  # the training step's reused (B, S, V) tensors would add to evaluation's own
        cfg = self.cfg
        res = evaluate_lm(self.model, self.val, cfg.eval_batch_size, cfg.eval_windows, self.device,
                          cfg.precision, plan=self.eval_plan)
        self.metrics.log("val", step, loss=res["loss"], ppl=res["ppl"], tokens=res["tokens"])
        if self.is_main:
            ppl = {"tokens": f" | val ppl {fmt_ppl(res['ppl'])}", "frames": " (Smooth L1 per frame)",
                   "image": " (per image: Smooth L1 for the EBT, the DDPM noise MSE for the DiT)"}
            self.log(f"step {step:6d} | val loss {res['loss']:.4f}{ppl[self.mcfg.candidate]}")
        return res

    def checkpoint(self, step: int) -> None:
        """Save after `step` steps: every rank's part staged, then published at once by rank 0."""
        cfg, world = self.cfg, self.world
        self.check_finite()  # one host sync per save: a non-finite step never reaches a checkpoint
        if cfg.fsdp:  # full tensors, gathered by every process
            from ebt.fsdp import full_state

            saved_model, saved_optimizer = full_state(self.model, self.optimizer)
        else:
            saved_model, saved_optimizer = self.model, self.optimizer
        if self.is_main:
            try:
                save_checkpoint(self.ckpt_dir, saved_model, self.run_dict, saved_optimizer, self.scheduler,
                                {"step": step, "tokens_seen": self.tokens_seen, "world_size": world,
                                 "data_position": {"step": step, "seed": cfg.seed}},
                                extra_dirs=self.extra, publish=False)
            except NonFiniteWeights as e:
                raise self.nonfinite(f"the weights held NaN or inf when saving after {step} steps") from e
        if world > 1:
            dist.barrier()
        if self.replay is not None:  # every rank writes its own buffer into the staged checkpoint
            save_staged(self.ckpt_dir, f"replay_rank{self.rank}.pt", self.replay.state_dict())
        if world > 1:
            dist.barrier()
        if self.is_main:
            publish_checkpoint(self.ckpt_dir)
        self.last_good = (self.ckpt_dir, step)
        if world > 1:
            dist.barrier()

    def finish(self, last: int) -> dict:
        """Save, evaluate (val, then every ood split) and close; a run stopped early only saves."""
        cfg = self.cfg
        if last < cfg.steps:  # a time-boxed piece of a longer run: save and leave the rest to --resume
            self.checkpoint(last)
            self.metrics.close()
            self.plan.pool.clear()
            return {"step": last, "tokens_seen": self.tokens_seen, "stopped_early": True,
                    "history": self.history}
        final = {"step": cfg.steps, "tokens_seen": self.tokens_seen, "params": self.n_params}
        if self.start_step < cfg.steps or not self.history:
            final["val"] = self.validate(cfg.steps)
            self.history.append({"step": cfg.steps, **final["val"]})
        self.checkpoint(cfg.steps)
        for split, split_data in self.ood.items():
            res = evaluate_lm(self.model, split_data, cfg.eval_batch_size, cfg.eval_windows, self.device,
                              cfg.precision, plan=self.eval_plan)
            self.metrics.log(split, cfg.steps, loss=res["loss"], ppl=res["ppl"], tokens=res["tokens"])
            final[split] = res
        final["history"] = self.history
        if self.is_main:
            (self.out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        self.metrics.close()
        self.plan.pool.clear()
        return final


def above_bar(log, tqdm):
    def write(*args, **kwargs):
        with tqdm.external_write_mode():
            log(*args, **kwargs)
    return write


def train(run: RunConfig, resume: bool = False, log=print, force: bool = False) -> dict:
    """Train `run.model` on `run.data` as `run.train` says. Returns the final evaluation.
    resume: continue from the run's checkpoint; force: start anew over an existing checkpoint."""
    cfg = run.train
    if cfg.wandb:
        check_wandb()
    t = Trainer(run, resume, force, log)
    if t.start_step == 0:
        t.history.append({"step": 0, **t.validate(0)})
    from tqdm.auto import tqdm

    # a live bar on a terminal; in logs (CI, cluster jobs) one plain line per log interval instead
    bar = tqdm(total=cfg.steps, initial=t.start_step, disable=not t.use_bar, dynamic_ncols=True,
               desc=f"train {run.model.model}")
    if t.use_bar:  # lines printed while the bar is live go above it instead of breaking it
        t.log = above_bar(t.log, tqdm)
    t.model.train()
    t.restart_clock()
    last = min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps
    for step in range(t.start_step, last):
        t.step(step)
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            t.report(done, bar)
        evaluated = bool(cfg.eval_every) and done % cfg.eval_every == 0 and done != cfg.steps
        if evaluated:
            t.history.append({"step": done, **t.validate(done)})
        if (cfg.save_every and done % cfg.save_every == 0) or (evaluated and not cfg.save_every):
            t.checkpoint(done)
    bar.close()
    return t.finish(last)
