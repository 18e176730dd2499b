"""Configs are plain dataclasses. The CLI maps flags onto them and every run saves them as JSON.

The size registry follows the paper (docs/method.md section 6): FFN hidden width = D, about 7 L D^2
non-embedding parameters, and a per-size default learning rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ebt.errors import ConfigError

# name: (layers, width D, heads, learning rate)
SIZES: dict[str, tuple[int, int, int, float]] = {
    "4xs": (2, 128, 2, 0.0024),
    "3xs": (4, 256, 4, 0.0018),
    "xxs": (6, 384, 6, 0.0012),
    "xs": (12, 384, 6, 0.0009),
    "small": (12, 768, 12, 0.0006),
    "medium": (24, 1024, 16, 0.0003),
    "large": (24, 1536, 16, 0.00025),
    "xl": (24, 2048, 32, 0.0002),
}

def resolve_size(size: str, n_layer: int | None, d_model: int | None,
                 n_head: int | None) -> tuple[int, int, int]:
    """(layers, width, heads) of a named size, each overridden where given."""
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; choose one of: {', '.join(SIZES)}")
    layers, width, heads, _ = SIZES[size]
    return (layers if n_layer is None else n_layer, width if d_model is None else d_model,
            heads if n_head is None else n_head)


MODEL_TYPES = ("transformer", "ebt", "dit")


@dataclass(frozen=True)
class Bound:
    """The values a numeric setting may take. One definition serves the config's check and the CLI:
    `type=Bound(int, 1)` parses a flag and refuses what is out of range at parse time."""

    kind: type  # int or float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self, got) -> str:
        """'must be >= 1 (an integer, got 0)'"""
        what = "an integer" if self.kind is int else "a finite number"
        lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
        hi = None if self.hi is None else f"{'<' if self.hi_open else '<='} {self.hi:g}"
        limits = " and ".join(x for x in (lo, hi) if x)
        return f"must be {limits} ({what}, got {got!r})" if limits else f"must be {what} (got {got!r})"

    def problem(self, value) -> str | None:
        """Why `value` is not allowed, or None."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (float(value).is_integer() if self.kind is int else math.isfinite(value))
        ok = ok and (self.lo is None or (value > self.lo if self.lo_open else value >= self.lo))
        ok = ok and (self.hi is None or (value < self.hi if self.hi_open else value <= self.hi))
        return None if ok else self.describe(value)

    def __call__(self, text: str):  # argparse type
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(self.describe(text)) from None
        if self.problem(value):
            raise argparse.ArgumentTypeError(self.describe(text))
        return value

    def __repr__(self):  # argparse names the type in "invalid <type> value" messages
        return "an integer" if self.kind is int else "a number"


def bounded(default, kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """A dataclass field whose values `check_bounds` and the CLI flag mapped onto it both check."""
    return field(default=default, metadata={"bound": Bound(kind, lo, hi, lo_open, hi_open)})


def bound_of(cls, name: str) -> Bound:
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["bound"]


def check_bounds(cfg) -> None:
    """Refuse a config (from flags, a --config file or Python) holding a value out of its field's range."""
    for f in dataclasses.fields(cfg):
        bound, value = f.metadata.get("bound"), getattr(cfg, f.name)
        if bound is not None and value is not None and bound.problem(value):
            raise ConfigError(f"{type(cfg).__name__}.{f.name} {bound.problem(value)}")


@dataclass
class EBTConfig:
    """How an EBT optimises its candidate, in training and by default at inference (docs/method.md 2.4-2.5).

    Official hyperparameter names in brackets. `RECIPES` below holds the paper's presets; every field
    can be overridden on top of a preset.
    """

    # [ebt_type] "time_embed": a learned step token per landscape; "default": none
    variant: str = "time_embed"
    # [mcmc_num_steps] learned landscapes; steps beyond them reuse the last one
    landscapes: int = bounded(2, int, 1)
    # [mcmc_step_size] step size of z_next = p - alpha * dE/dp
    alpha: float = bounded(500.0, float, 0, lo_open=True)
    alpha_learnable: bool = True  # [mcmc_step_size_learnable]; clamped at >= alpha_min in use
    alpha_min: float = bounded(1e-4, float, 0, lo_open=True)
    # [mcmc_step_size_lr_multiplier] alpha's own optimizer group, no decay
    alpha_lr_mult: float = bounded(1500.0, float, 0)
    # [randomize_mcmc_num_steps] R: training repeats each landscape randint(rand_steps_min, R + 2) times
    # (a draw per landscape); validation repeats the last one R + 1 times
    rand_steps: int = bounded(0, int, 0)
    # [randomize_mcmc_num_steps_min]; also inference's steps per landscape
    rand_steps_min: int = bounded(0, int, 0)
    detach: bool = True  # [not no_mcmc_detach] each step starts from the previous candidate, detached
    truncate: bool = False  # [truncate_mcmc] only the last step builds the second-order graph
    loss_last_only: bool = False  # loss on the last step only (S2) instead of the mean over steps (S1)
    # [randomize_mcmc_step_size_scale] training alpha ~ U[alpha/s, alpha*s] per (row, pos)
    alpha_rand_scale: float = bounded(1.0, float, 1)
    # [langevin_dynamics_noise] std of noise added to the logits before each softmax (training)
    langevin: float = bounded(0.0, float, 0)
    # [gaussian_random_noise_scaling] initial candidate z ~ N(0, init_scale^2)
    init_scale: float = bounded(1.0, float, 0)
    # [mcmc_replay_buffer] sequences kept (FIFO) to restart from their final logits
    replay_buffer: int = bounded(0, int, 0)
    # replayed rows appended per batch, as a fraction of the batch
    replay_fraction: float = bounded(0.5, float, 0, 1)

    def __post_init__(self):
        check_bounds(self)
        if self.variant not in ("time_embed", "default"):
            raise ConfigError(f"unknown EBT variant {self.variant!r}: use 'time_embed' or 'default'")
        if self.landscapes < 1 or self.rand_steps < 0 or self.replay_buffer < 0:
            raise ConfigError(f"landscapes must be >= 1 and rand_steps, replay_buffer >= 0: {self}")
        if not self.alpha > 0 or not self.alpha_rand_scale >= 1:
            raise ConfigError(f"alpha must be > 0 and alpha_rand_scale >= 1 "
                              f"(got {self.alpha}, {self.alpha_rand_scale})")
        # official randint(min, R + 2)
        if self.rand_steps and not 1 <= self.rand_steps_min <= self.rand_steps + 1:
            raise ConfigError(f"rand_steps_min={self.rand_steps_min} must be at least 1 and at most "
                              f"rand_steps + 1 = {self.rand_steps + 1}: training repeats each landscape "
                              f"randint(min, R + 2) times")

    @property
    def eval_steps(self) -> int:
        return self.landscapes + self.rand_steps


# The paper's recipes (docs/method.md 2.4 and 2.5), for text.
RECIPES: dict[str, dict] = {
    "s1": dict(variant="time_embed", landscapes=2, alpha=500.0, alpha_learnable=True, alpha_lr_mult=1500.0,
               rand_steps=0, rand_steps_min=0, detach=True, truncate=False, loss_last_only=False,
               alpha_rand_scale=1.0, langevin=0.0, replay_buffer=0),
    "s2": dict(variant="time_embed", landscapes=1, alpha=5.0, alpha_learnable=False, rand_steps=2,
               rand_steps_min=2, detach=False, truncate=True, loss_last_only=True, alpha_rand_scale=2.0,
               langevin=3.0, replay_buffer=192, replay_fraction=0.5),
    # the image denoiser (docs/method.md 4): one step from the noisy image, alpha learnable
    "s1_image": dict(variant="default", landscapes=1, alpha=3000.0, alpha_learnable=True,
                     alpha_lr_mult=9000.0, rand_steps=0, rand_steps_min=0, detach=True, truncate=False,
                     loss_last_only=False, alpha_rand_scale=1.0, langevin=0.0, replay_buffer=0),
}


def recipe(name: str, **overrides) -> EBTConfig:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return EBTConfig(**{**RECIPES[name], **overrides})


@dataclass
class ModelConfig:
    model: str = "transformer"  # which family (models/__init__.py maps it to a class)
    size: str = "xxs"  # a name from SIZES; n_layer/d_model/n_head below override it
    n_layer: int | None = bounded(None, int, 1)
    d_model: int | None = bounded(None, int, 1)
    n_head: int | None = bounded(None, int, 1)
    vocab_size: int = bounded(50277, int, 1)  # GPT-NeoX-20B, as in the paper
    context_length: int = bounded(256, int, 1)  # S: the model reads S tokens and predicts S targets
    pad_token_id: int | None = 0  # targets equal to this id are ignored by the loss (None: none)
    rope_theta: float = bounded(10000.0, float, 0, lo_open=True)
    norm_eps: float = bounded(1e-5, float, 0, lo_open=True)
    candidate: str = "tokens"  # "tokens": vocabulary logits; "frames": a feature vector per step (video);
    # "image": a whole image (the bidirectional denoisers: model "ebt" or "dit")
    feature_dim: int | None = bounded(None, int, 1)  # frames only: size F of a frame's feature vector
    image_size: int = bounded(32, int, 1)  # image only
    channels: int = bounded(1, int, 1, 3)
    patch: int = bounded(4, int, 1)
    # image only: the training noise level (sets the official schedule, ebt.models.dit.level_schedule)
    noise_level: float = bounded(0.1, float, 0, 1, lo_open=True)
    ebt: EBTConfig | None = None  # model="ebt" only; None there means recipe("s1")

    def __post_init__(self):
        check_bounds(self)
        if self.model not in MODEL_TYPES:
            raise ConfigError(f"unknown model {self.model!r}; choose one of: {', '.join(MODEL_TYPES)}")
        if self.model == "ebt" and self.ebt is None:
            self.ebt = recipe("s1_image" if self.candidate == "image" else "s1")
        if isinstance(self.ebt, dict):
            self.ebt = EBTConfig(**self.ebt)
        self.n_layer, self.d_model, self.n_head = resolve_size(self.size, self.n_layer, self.d_model,
                                                               self.n_head)
        if min(self.n_layer, self.d_model, self.n_head, self.vocab_size, self.context_length) < 1:
            raise ConfigError(f"model sizes must be positive: {self}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ConfigError(f"d_model={self.d_model} must split into n_head={self.n_head} heads of even "
                              f"width (RoPE rotates pairs)")
        if self.candidate not in ("tokens", "frames", "image"):
            raise ConfigError(f"unknown candidate type {self.candidate!r}: "
                              f"use 'tokens', 'frames' or 'image'")
        if self.model == "dit" and self.candidate != "image":
            raise ConfigError("the DiT is an image denoiser: use candidate='image'")
        if self.candidate == "frames" and not (self.feature_dim or 0) >= 1:
            raise ConfigError("a model over frames needs feature_dim (the size of a frame's feature vector)")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"pad_token_id={self.pad_token_id} is outside the vocabulary "
                              f"(size {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def default_lr(self) -> float:
        return SIZES[self.size][3]


@dataclass
class DataConfig:
    data_dir: str = "data/default"  # made by `ebt data prepare`
    train_split: str = "train"
    val_split: str = "val"
    ood_splits: list[str] = field(default_factory=lambda: ["ood"])
    verify: bool = False  # check every shard's sha256 at start (slow on big data)
    # token windows: "packed" cuts the document stream into S+1 tokens; "document" is the official rule, one
    # window per document (its first S+1 tokens, right-padded with eos, which the loss then ignores)
    windows: str = "packed"
    # video data (a directory made by `ebt data video`): the fixed frame encoder fitted on training frames
    features: str = "pca"  # "pca" or "pixels" (area-downsampled to grid x grid)
    feature_dim: int = bounded(64, int, 1)  # pca components (pixels: grid * grid)
    grid: int = bounded(16, int, 1)
    # images (data_dir "images:fashion_mnist", "images:mnist" or "images:/a/folder")
    image_cache: str = "data/downloads"  # where the image packages are fetched and unpacked
    image_size: int = bounded(32, int, 1)
    channels: int = bounded(1, int, 1, 3)

    def __post_init__(self):
        check_bounds(self)
        if self.windows not in WINDOWS:
            raise ConfigError(f"unknown windows {self.windows!r}: use 'packed' or 'document'")


WINDOWS = ("packed", "document")

# The paper's text pretraining, read from the official job scripts (alexiglad/EBT at 0ad3628,
# job_scripts/nlp/pretrain/baseline_transformer.sh, ebt_s1.sh and ebt_s2.sh: all three pass these values;
# the EBT's own settings are the recipes above, s1 from ebt_s1.sh, s2 from ebt_s2.sh). Keys are config
# fields.
PRESETS: dict[str, dict] = {
    "paper": {
        "tokenizer": "neox",  # --tokenizer "EleutherAI/gpt-neox-20b": a requirement on the data, not a field
        "windows": "document",  # data/nlp/collator.py: each document alone, first S+1 tokens, eos-padded
        "context_length": 256,  # --context_length 256
        "size": "xxs",  # RUN_NAME "...-xxs-..."; lr: the size's, 0.0012 for xxs = the scripts' lr=(0.0012)
        "batch_size": 256,  # --batch_size_per_device 32 x 4 GPUs (SBATCH) x --accumulate_grad_batches 2
        "device_batch": 32,  # --batch_size_per_device: the rows each loss averages over (sets grad_accum)
        "steps": 1_000_000,  # --max_steps 1000000 (--max_scheduling_steps the same)
        "warmup_steps": 10_000,  # --warm_up_steps 10000
        "warmup_base_lr_divider": -1.0,  # train_model.py default: linear warm-up from 0
        "weight_decay": 0.01,  # --weight_decay 0.01
        "min_lr_ratio": 0.1,  # --min_lr_scale 10
        "grad_clip": 1.0,  # --gradient_clip_val 1.0
        "beta1": 0.9,  # train_model.py default (the scripts pass none)
        "beta2": 0.999,  # train_model.py default
        # left to flags: precision (official: float 32-true, --set_matmul_precision "medium", no equivalent
        # here) and validation (official: 0.05% of documents every --val_check_interval 15000 batches)
    },
}


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = bounded(1000, int, 1)  # optimizer steps
    # global batch in sequences per optimizer step (all ranks, all micro-steps)
    batch_size: int = bounded(32, int, 1)
    grad_accum: int = bounded(1, int, 1)  # micro-steps per optimizer step
    lr: float | None = bounded(None, float, 0, lo_open=True)  # None: the size's learning rate
    min_lr_ratio: float = bounded(0.1, float, 0, 1)  # [1 / min_lr_scale] cosine floor lr * this, all groups
    warmup_steps: int = bounded(100, int, 0)
    # [warm_up_base_lr_divider] -1: linear warm-up from 0 (official default); d > 0: from lr / d
    warmup_base_lr_divider: float = bounded(-1.0, float, -1)
    weight_decay: float = bounded(0.01, float, 0)  # official: on every parameter but an EBT's alpha
    decay_matrices_only: bool = False  # opt-in, not official: no decay on norms and other 1-d weights
    beta1: float = bounded(0.9, float, 0, 1, hi_open=True)
    beta2: float = bounded(0.999, float, 0, 1, hi_open=True)
    grad_clip: float = bounded(1.0, float, 0)  # global grad-norm clip; 0 disables
    seed: int = bounded(0, int, 0)
    eval_every: int = bounded(100, int, 0)
    # validation windows per evaluation (None: the whole split)
    eval_windows: int | None = bounded(256, int, 1)
    eval_batch_size: int = bounded(32, int, 1)
    log_every: int = bounded(10, int, 1)
    save_every: int = bounded(0, int, 0)  # 0: save at evaluations and at the end
    # >0: stop (and save) at this step although the schedule spans `steps`; --resume continues
    stop_at: int = bounded(0, int, 0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp64
    compile: bool = False
    cuda_graph: bool = False  # EBT on CUDA: capture the training step once as a CUDA graph, then replay it
    # EBT weight gradients: auto (explicit on CPU or with compile, else double)
    # | explicit | double | jvp | full
    ebt_grad: str = "auto"
    # under torchrun: shard parameters, gradients and optimizer state with FSDP2 instead of DDP
    fsdp: bool = False
    tensorboard: bool = False
    wandb: bool = False  # credentials come only from the environment (WANDB_API_KEY)
    wandb_project: str = "ebt"
    progress: bool = True

    def __post_init__(self):
        check_bounds(self)
        if self.warmup_base_lr_divider != -1 and not self.warmup_base_lr_divider > 0:
            raise ConfigError(f"TrainConfig.warmup_base_lr_divider must be -1 (warm up from 0) or > 0 (from "
                              f"lr / it), got {self.warmup_base_lr_divider!r}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Build a (nested) config dataclass from a dict, refusing keys it does not know."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        sub = {"ModelConfig": ModelConfig, "DataConfig": DataConfig, "TrainConfig": TrainConfig,
               "EBTConfig": EBTConfig}.get(str(names[k].type).strip("'\"").replace(" | None", ""))
        kwargs[k] = from_dict(sub, v) if sub is not None and isinstance(v, dict) else v
    return cls(**kwargs)


def save_json(obj: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
