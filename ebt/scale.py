"""Scaling studies: sweep one axis for the EBT and the Transformer++, fit, plot, summarise.

A study (`StudyConfig`, from a TOML file or flags) varies one axis (model size, depth, width, training
tokens or batch size) with everything else fixed, for each model and seed. Each run is an ordinary
`ebt.train` run in out_dir/<model>/<axis>=<value>/seed<N> (checkpoint, metrics.jsonl, final_metrics.json),
so finished runs are skipped and interrupted ones resumed when the study is run again. Runs execute one
after another in this process, or each as a `torchrun` job (several processes or nodes), and `shard`
splits the run list between independent jobs that share the output directory.

The fit is least squares of log(validation perplexity) (or log loss) against log(resource) per model:
the resource is the axis's own (parameters for size and width, layers, tokens, batch size) and training
FLOPs (ebt.flops). The paper's scaling rate is |slope_EBT| / |slope_T++| - 1 (positive: the EBT improves
faster). With several seeds, slopes and rates get 95% Student-t intervals over seeds; with one seed,
slopes get the regression's interval and the rate a delta-method one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ebt.config import SIZES, DataConfig, ModelConfig, RunConfig, TrainConfig, recipe, to_dict
from ebt.errors import ConfigError, DataError
from ebt.flops import non_embedding_params, train_flops_per_token

# axis -> the resource it varies (besides training FLOPs, which every axis is also fitted against)
AXES = {"size": "params", "width": "params", "depth": "layers", "tokens": "tokens", "batch": "batch"}
MODELS = ("transformer", "ebt")
LABELS = {"transformer": "Transformer++", "ebt": "EBT"}
RESOURCE_LABELS = {"params": "non-embedding parameters", "layers": "layers", "tokens": "training tokens",
                   "batch": "batch size (sequences)", "flops": "training FLOPs"}


@dataclass
class StudyConfig:
    axis: str = "size"  # size | depth | width | tokens | batch
    values: list = field(default_factory=lambda: ["2x32x2", "2x64x2", "2x96x2", "4xs"])  # see `run_config`
    models: list[str] = field(default_factory=lambda: list(MODELS))
    seeds: list[int] = field(default_factory=lambda: [0])
    out_dir: str = "runs/scale"
    data_dir: str = "data/default"
    # everything the axis does not vary
    size: str = "4xs"  # the base size (a SIZES name); n_layer / d_model / n_head override it
    n_layer: int | None = None
    d_model: int | None = None
    n_head: int | None = None
    recipe: str = "s1"  # the EBT's recipe
    context_length: int = 64
    steps: int = 300
    batch_size: int = 16
    lr: float | None = None  # None: each size's registry rate (sizes given as LxDxH: the base size's)
    warmup_steps: int = 30  # capped at a fifth of a run's steps (the tokens axis makes short runs)
    eval_windows: int = 128  # validation windows, spread over the split (0: all)
    eval_batch_size: int = 32
    metric: str = "ppl"  # fit log(ppl) or log(loss)
    device: str = "auto"
    precision: str = "auto"
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) under torchrun
    # how runs execute
    launcher: str = "local"  # local: in this process, one after another; torchrun: one torchrun job per run
    nproc_per_node: int = 1
    # e.g. ["--nnodes", "2", "--rdzv-endpoint", "h:29500"]
    torchrun_args: list[str] = field(default_factory=list)
    shard: str = "0/1"  # k/n: this job runs runs k, k+n, k+2n, ... (independent jobs, one output directory)

    def __post_init__(self):
        if self.axis not in AXES:
            raise ConfigError(f"unknown scaling axis {self.axis!r}; choose one of: {', '.join(AXES)}")
        if len(self.values) < 2:
            raise ConfigError(f"a study needs at least 2 values along {self.axis!r} to fit a slope "
                              f"(3+ for an interval); got {self.values}")
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models:
            raise ConfigError(f"unknown model(s) {bad}: a study compares {' and '.join(MODELS)}")
        if self.metric not in ("ppl", "loss"):
            raise ConfigError(f"metric must be 'ppl' or 'loss' (got {self.metric!r})")
        if self.launcher not in ("local", "torchrun"):
            raise ConfigError(f"launcher must be 'local' or 'torchrun' (got {self.launcher!r})")
        if self.fsdp and self.launcher != "torchrun":
            raise ConfigError("fsdp shards a model over the processes of a torchrun job: "
                              "use launcher='torchrun' (--launcher torchrun --nproc-per-node N)")
        if self.size not in SIZES:
            raise ConfigError(f"unknown base size {self.size!r}; choose one of: {', '.join(SIZES)}")
        shard_index, shard_count = self.shard_parts
        if not 0 <= shard_index < shard_count:
            raise ConfigError(f"shard must be k/n with 0 <= k < n (got {self.shard!r})")
        if min(self.steps, self.batch_size, self.context_length, self.nproc_per_node) < 1:
            raise ConfigError("steps, batch_size, context_length and nproc_per_node must be >= 1")
        self.values = [str(v) for v in self.values]
        self.seeds = [int(s) for s in self.seeds]

    @property
    def shard_parts(self) -> tuple[int, int]:
        try:
            k, n = (int(x) for x in str(self.shard).split("/"))
        except ValueError:
            raise ConfigError(f"shard must look like k/n, e.g. 0/4 (got {self.shard!r})") from None
        return k, n


# Fields that change what a run computes: a study directory refuses to continue under other values.
EXECUTION_FIELDS = ("values", "models", "seeds", "out_dir", "device", "launcher", "nproc_per_node",
                    "torchrun_args", "shard")


def load_study(path: str | Path, **overrides) -> StudyConfig:
    """A StudyConfig from a TOML file (top-level keys = StudyConfig fields), flags overriding it."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("reading a TOML study needs Python 3.11+ or `pip install tomli`") from None
    try:
        values = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the study file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    return study_from_dict({**values, **overrides})


def study_from_dict(values: dict) -> StudyConfig:
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown study keys {sorted(unknown)}; known: {sorted(known)}")
    return StudyConfig(**values)


# ---------------------------------------------------------------------------------------------- runs

def parse_size(value: str, base: StudyConfig) -> tuple[str, int | None, int | None, int | None]:
    """(registry size, n_layer, d_model, n_head) for a size value: a SIZES name or LxDxH (e.g. 2x64x2)."""
    if value in SIZES:
        return value, None, None, None
    try:
        layers, width, heads = (int(x) for x in value.lower().split("x"))
    except ValueError:
        raise ConfigError(f"size {value!r} is neither a named size ({', '.join(SIZES)}) nor "
                          f"LAYERSxWIDTHxHEADS such as 2x64x2") from None
    return base.size, layers, width, heads


@dataclass
class StudyRun:
    model: str
    value: str
    seed: int
    run: RunConfig

    @property
    def out_dir(self) -> Path:
        return Path(self.run.train.out_dir)


def _int_value(axis: str, v: str) -> int:
    try:
        x = int(float(v))
    except ValueError:
        raise ConfigError(f"{axis} values must be integers (got {v!r})") from None
    if x < 1:
        raise ConfigError(f"{axis} values must be >= 1 (got {v!r})")
    return x


def run_config(study: StudyConfig, model: str, value: str, seed: int, vocab_size: int, pad_id) -> RunConfig:
    """The training run for one (model, axis value, seed): the study's base with the axis set to value."""
    size, n_layer, d_model, n_head = study.size, study.n_layer, study.d_model, study.n_head
    steps, batch = study.steps, study.batch_size
    lr = study.lr
    if study.axis == "size":
        size, n_layer, d_model, n_head = parse_size(value, study)
        if lr is None and value in SIZES:
            lr = SIZES[value][3]
    elif study.axis == "depth":
        n_layer = _int_value("depth", value)
    elif study.axis == "width":
        d_model = _int_value("width", value)
    elif study.axis == "batch":
        batch = _int_value("batch", value)
    elif study.axis == "tokens":
        tokens = _int_value("tokens", value)
        steps = tokens // (batch * study.context_length)
        if steps < 1:
            raise ConfigError(f"{tokens} training tokens is less than one step of {batch} x "
                              f"{study.context_length} tokens: raise the values or lower batch_size / "
                              f"context_length")
    mcfg = ModelConfig(model=model, size=size, n_layer=n_layer, d_model=d_model, n_head=n_head,
                       vocab_size=vocab_size, pad_token_id=pad_id, context_length=study.context_length,
                       ebt=recipe(study.recipe) if model == "ebt" else None)
    out = Path(study.out_dir) / model / f"{study.axis}={value}" / f"seed{seed}"
    train = TrainConfig(out_dir=str(out), steps=steps, batch_size=batch, lr=lr,
                        warmup_steps=min(study.warmup_steps, max(1, steps // 5)), seed=seed, eval_every=0,
                        eval_windows=study.eval_windows or None, eval_batch_size=study.eval_batch_size,
                        log_every=max(1, min(50, steps // 4)), device=study.device, precision=study.precision,
                        fsdp=study.fsdp)
    return RunConfig(model=mcfg, data=DataConfig(data_dir=study.data_dir), train=train)


def plan(study: StudyConfig) -> list[StudyRun]:
    """Every run of the study, in a fixed order (all shards agree on it)."""
    from ebt.data.loader import TokenData

    if not (Path(study.data_dir) / "manifest.json").is_file():
        raise DataError(f"{study.data_dir} is not a prepared dataset (no manifest.json): run "
                        f"`ebt data prepare --out {study.data_dir}` first, or point data_dir / --data at one")
    probe = TokenData(study.data_dir, "train", 1)
    return [StudyRun(m, v, s, run_config(study, m, v, s, probe.vocab_size, probe.pad_id))
            for v in study.values for m in study.models for s in study.seeds]


def read_json(path: Path) -> dict:
    """A JSON file the study wrote earlier; a damaged one is named, not a traceback."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable or corrupt ({e}); delete it (a run's file: retrain that "
                        f"run) and run the study again") from e
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a JSON object; delete it and run the study again")
    return data


def is_finished(study_run: StudyRun) -> bool:
    path = study_run.out_dir / "final_metrics.json"
    if not path.is_file():
        return False
    final = read_json(path)
    return final.get("step") == study_run.run.train.steps and "val" in final


def resources(study_run: StudyRun, final: dict) -> dict:
    mcfg = study_run.run.model
    tcfg = study_run.run.train
    tokens = final.get("tokens_seen", tcfg.steps * tcfg.batch_size * mcfg.context_length)
    flops_per_token = train_flops_per_token(mcfg)
    return {"params": non_embedding_params(mcfg), "params_total": final.get("params"), "layers": mcfg.n_layer,
            "width": mcfg.d_model, "tokens": tokens, "batch": tcfg.batch_size,
            "flops_per_token": flops_per_token, "flops": flops_per_token * tokens}


def check_study_dir(study: StudyConfig) -> None:
    """A study directory keeps its settings: refuse to mix runs made under different fixed settings."""
    path = Path(study.out_dir) / "study.json"
    current = {k: v for k, v in to_dict(study).items() if k not in EXECUTION_FIELDS}
    if path.is_file():
        old = {k: v for k, v in read_json(path).items() if k not in EXECUTION_FIELDS}
        diff = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
        if diff:
            changed = ", ".join(f"{k}: {old.get(k)!r}" for k in diff)
            raise ConfigError(f"{study.out_dir} holds a study with other settings ({changed}); use another "
                              f"--out, or the same settings (values, models and seeds may change)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(study), indent=2, sort_keys=True) + "\n")


def _torchrun(study: StudyConfig, study_run: StudyRun, resume: bool, log) -> None:
    study_run.out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = study_run.out_dir / "run_config.json"
    cfg_path.write_text(json.dumps(to_dict(study_run.run), indent=2, sort_keys=True) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(study.nproc_per_node),
           *study.torchrun_args, "-m", "ebt.cli", "train", "--config", str(cfg_path), "--no-progress",
           *(["--resume"] if resume else [])]
    log("  $ " + " ".join(cmd))
    res = subprocess.run(cmd)
    if res.returncode != 0:
        raise ConfigError(f"torchrun job for {study_run.out_dir} failed with exit status {res.returncode} "
                          f"(see its output above); fix the cause and run the study again: finished runs "
                          f"are kept")


def run_study(study: StudyConfig, log=print) -> dict:
    """Train every missing run of this shard, then fit and report over all finished runs."""
    runs = plan(study)
    check_study_dir(study)
    k, n = study.shard_parts
    from ebt.checkpoint import find_checkpoint

    shard_runs = [study_run for i, study_run in enumerate(runs) if i % n == k]
    log(f"study: {study.axis} = {study.values}, models {study.models}, seeds {study.seeds}: "
        f"{len(runs)} runs, {len(shard_runs)} in shard {study.shard}")
    for i, study_run in enumerate(shard_runs, 1):
        tag = (f"[{i}/{len(shard_runs)}] {LABELS[study_run.model]} {study.axis}={study_run.value} "
               f"seed {study_run.seed}")
        if is_finished(study_run):
            log(f"{tag}: finished, skipped ({study_run.out_dir})")
            continue
        resume = find_checkpoint(study_run.out_dir) is not None
        log(f"{tag}: {'resuming' if resume else 'training'} -> {study_run.out_dir}")
        t0 = time.perf_counter()
        if study.launcher == "torchrun":
            _torchrun(study, study_run, resume, log)
        else:
            from ebt.train import train

            study_run.run.train.progress = False
            train(study_run.run, resume=resume, log=lambda *a: None)
        seconds = time.perf_counter() - t0
        timing = study_run.out_dir / "scale_timing.json"
        prev = read_json(timing).get("seconds", 0.0) if timing.is_file() else 0.0
        timing.write_text(json.dumps({"seconds": prev + seconds}) + "\n")
        final = read_json(study_run.out_dir / "final_metrics.json")
        log(f"{tag}: val loss {final['val']['loss']:.4f}, ppl {final['val']['ppl']:.2f} ({seconds:.0f} s)")
    return report(study, runs, log)


# ----------------------------------------------------------------------------------------------- fits

# two-sided 95% Student-t quantiles by degrees of freedom (beyond 30: the normal 1.96)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t95(dof: int) -> float:
    if dof < 1:
        return float("nan")
    return T95.get(dof) or next((T95[d] for d in sorted(T95) if d >= dof), 1.96)


def fit_loglog(x, y) -> dict:
    """Least squares of log(y) = intercept + slope * log(x). Returns slope, intercept, the slope's
    standard error and 95% interval (n-2 degrees of freedom; nan with 2 points) and r^2."""
    if len(x) != len(y) or len(x) < 2:
        raise ConfigError(f"a fit needs at least 2 points with matching x and y (got {len(x)} and {len(y)})")
    if min(x) <= 0 or min(y) <= 0:
        raise ConfigError("log-log fits need positive resources and metrics")
    if len(set(x)) < 2:
        raise ConfigError("a fit needs at least 2 distinct resource values")
    lx, ly = [math.log(v) for v in x], [math.log(v) for v in y]
    n = len(lx)
    mx, my = sum(lx) / n, sum(ly) / n
    sxx = sum((a - mx) ** 2 for a in lx)
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx
    intercept = my - slope * mx
    resid = [b - (intercept + slope * a) for a, b in zip(lx, ly)]
    sse, syy = sum(r * r for r in resid), sum((b - my) ** 2 for b in ly)
    se = math.sqrt(sse / (n - 2) / sxx) if n > 2 else float("nan")
    half = t95(n - 2) * se
    return {"slope": slope, "intercept": intercept, "stderr": se, "ci95": [slope - half, slope + half],
            "r2": 1 - sse / syy if syy > 0 else 1.0, "n": n}


def says_something(fit: dict) -> bool:
    """Whether a fit's slope is known to have a sign: its 95% interval is defined and excludes 0."""
    lo, hi = fit["ci95"]
    return not (math.isnan(lo) or math.isnan(hi)) and (lo > 0 or hi < 0)


def mean_ci(values: list[float]) -> dict:
    """Mean and 95% Student-t interval over independent repeats (seeds)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": [float("nan"), float("nan")], "n": n}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t95(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def scaling_rate(slope_ebt: float, slope_tpp: float) -> float:
    """The paper's 'X% faster': |slope_EBT| / |slope_T++| - 1."""
    return abs(slope_ebt) / abs(slope_tpp) - 1


def rate_with_ci(fits_ebt: dict, fits_tpp: dict) -> dict:
    """The scaling rate from per-seed fits {seed: fit} of both models. Several seeds: a t interval over
    the per-seed rates (paired by seed); one seed: a delta-method interval from the slopes' errors."""
    seeds = sorted(set(fits_ebt) & set(fits_tpp))
    if not seeds:
        return {}
    if len(seeds) > 1:
        per_seed = [scaling_rate(fits_ebt[s]["slope"], fits_tpp[s]["slope"]) for s in seeds]
        return {**mean_ci(per_seed), "per_seed": dict(zip(seeds, per_seed)), "interval": "t over seeds"}
    ebt_fit, tpp_fit = fits_ebt[seeds[0]], fits_tpp[seeds[0]]
    rate = scaling_rate(ebt_fit["slope"], tpp_fit["slope"])
    se = math.sqrt((ebt_fit["stderr"] / tpp_fit["slope"]) ** 2
                   + (ebt_fit["slope"] * tpp_fit["stderr"] / tpp_fit["slope"] ** 2) ** 2)
    dof = min(ebt_fit["n"], tpp_fit["n"]) - 2
    half = t95(dof) * se
    return {"mean": rate, "ci95": [rate - half, rate + half], "n": 1,
            "interval": "delta method from the fits (one seed)"}


# -------------------------------------------------------------------------------------------- report

def collect(runs: list[StudyRun], metric: str) -> list[dict]:
    rows = []
    for study_run in runs:
        if not is_finished(study_run):
            continue
        final = read_json(study_run.out_dir / "final_metrics.json")
        timing = study_run.out_dir / "scale_timing.json"
        rows.append({"model": study_run.model, "value": study_run.value, "seed": study_run.seed,
                     "out_dir": str(study_run.out_dir),
                     "val_loss": final["val"]["loss"], "val_ppl": final["val"]["ppl"],
                     "metric": final["val"][metric], **resources(study_run, final),
                     "seconds": read_json(timing).get("seconds", 0.0) if timing.is_file() else None})
    return rows


def fit_study(rows: list[dict], axis: str, models) -> dict:
    """Per resource (the axis's and flops) and model: the pooled fit over all seeds' points, per-seed fits,
    the slope over seeds, and the EBT-vs-T++ scaling rate."""
    out = {}
    for res in (AXES[axis], "flops"):
        fits, rates = {}, {}
        per_seed_all = {}
        for model in models:
            points = [row for row in rows if row["model"] == model]
            if len({row[res] for row in points}) < 2:
                continue
            pooled = fit_loglog([row[res] for row in points], [row["metric"] for row in points])
            per_seed = {}
            for s in sorted({row["seed"] for row in points}):
                seed_points = [row for row in points if row["seed"] == s]
                if len({row[res] for row in seed_points}) >= 2:
                    per_seed[s] = fit_loglog([row[res] for row in seed_points],
                                             [row["metric"] for row in seed_points])
            per_seed_all[model] = per_seed
            fits[model] = {**pooled, "per_seed_slopes": {s: fit["slope"] for s, fit in per_seed.items()}}
            if len(per_seed) > 1:
                fits[model]["slope_over_seeds"] = mean_ci([fit["slope"] for fit in per_seed.values()])
        if "ebt" in per_seed_all and "transformer" in per_seed_all:
            rates = rate_with_ci(per_seed_all["ebt"], per_seed_all["transformer"])
            rising = [LABELS[model] for model in ("ebt", "transformer") if fits[model]["slope"] >= 0]
            # |slope| hides the sign: a rate between a falling and a rising curve means little
            if rates and rising:
                rates["warning"] = (f"{' and '.join(rising)}: the fitted slope is >= 0 (the metric does not "
                                    f"fall with the resource), so the ratio of |slopes| is not a scaling "
                                    f"rate")
        out[res] = {"fits": fits, "scaling_rate": rates}
    return out


def plot_study(rows: list[dict], fits: dict, study: StudyConfig, path: Path) -> Path:
    from ebt.plots import pyplot, save_figure

    plt = pyplot()
    resource_names = list(fits)
    fig, axes = plt.subplots(1, len(resource_names), figsize=(5.5 * len(resource_names), 4.2),
                             squeeze=False)
    colors = {"transformer": "tab:blue", "ebt": "tab:red"}
    ylabel = "validation perplexity" if study.metric == "ppl" else "validation loss (nats)"
    for ax, res in zip(axes[0], resource_names):
        for model in study.models:
            points = [row for row in rows if row["model"] == model]
            if not points:
                continue
            ax.scatter([row[res] for row in points], [row["metric"] for row in points], color=colors[model],
                       s=22, alpha=0.8)
            fit = fits[res]["fits"].get(model)
            if fit:
                xs = sorted({row[res] for row in points})
                lo, hi = math.log(xs[0]), math.log(xs[-1])
                grid = [lo + (hi - lo) * i / 50 for i in range(51)]  # log resource
                # the line in log space: exp(intercept) alone overflows for an extreme fit
                line = [math.exp(min(fit["intercept"] + fit["slope"] * g, 700.0)) for g in grid]
                ax.plot([math.exp(g) for g in grid], line, color=colors[model],
                        label=f"{LABELS[model]}: slope {fit['slope']:.3f}" + ("" if says_something(fit) else
                                                                         " (says nothing)"))
        rate = fits[res]["scaling_rate"]
        title = f"vs {RESOURCE_LABELS[res]}"
        if rate:
            title += f"\nscaling rate {100 * rate['mean']:+.1f}%"
        ax.set(xscale="log", yscale="log", xlabel=RESOURCE_LABELS[res], ylabel=ylabel, title=title)
        from matplotlib.ticker import LogLocator, NullFormatter

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # labels at 1, 2, 5 x 10^k only
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"scaling along {study.axis}: {', '.join(study.values)}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _fmt_ci(ci) -> str:
    return "-" if any(math.isnan(c) for c in ci) else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def summary_markdown(rows: list[dict], fits: dict, study: StudyConfig) -> str:
    lines = [f"# Scaling study: {study.axis} ({', '.join(study.values)})", "",
             f"Fixed: base size {study.size}, recipe {study.recipe}, context {study.context_length}, "
             f"{study.steps} steps x batch {study.batch_size} (unless the axis varies them), "
             f"data {study.data_dir}. "
             f"Fitted: log(val {study.metric}) = a + slope * log(resource).", "",
             "| model | value | seed | non-emb. params | tokens | train FLOPs | val loss | val ppl | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda row: (row["model"], row["params"], row["tokens"], row["batch"],
                                             row["seed"])):
        secs = f"{row['seconds']:.0f}" if row["seconds"] is not None else "-"
        lines.append(f"| {LABELS[row['model']]} | {row['value']} | {row['seed']} | {row['params']:,} | "
                     f"{row['tokens']:,} | {row['flops']:.3g} | {row['val_loss']:.4f} | "
                     f"{row['val_ppl']:.2f} | {secs} |")
    for res, block in fits.items():
        lines += ["", f"## vs {RESOURCE_LABELS[res]}", "", "| model | slope | 95% interval | r^2 | points |",
                  "|---|---|---|---|---|"]
        for model, fit in block["fits"].items():
            over = fit.get("slope_over_seeds")
            slope_ci = over["ci95"] if over else fit["ci95"]
            lines.append(f"| {LABELS[model]} | {fit['slope']:.4f} | {_fmt_ci(slope_ci)} | {fit['r2']:.3f} "
                         f"| {fit['n']} |")
        silent = [LABELS[model] for model, fit in block["fits"].items() if not says_something(fit)]
        if silent:
            lines += ["", f"The fit says nothing for {', '.join(silent)}: the slope's 95% interval is "
                          f"undefined (2 points) or includes 0, so not even its sign is known."]
        rate = block["scaling_rate"]
        if rate:
            ci = rate["ci95"]
            interval = ("-" if any(math.isnan(c) for c in ci)
                        else f"[{100 * ci[0]:+.1f}%, {100 * ci[1]:+.1f}%]")
            lines += ["", f"Scaling rate |slope_EBT| / |slope_T++| - 1 = {100 * rate['mean']:+.1f}% "
                          f"(95% interval {interval}, {rate['interval']})."]
            if "warning" in rate:
                lines += ["", f"**Caution**: {rate['warning']}."]
    lines += ["", "Intervals over seeds use Student t; with one seed they come from the regression residuals "
              "and say nothing about seed-to-seed variation."]
    return "\n".join(lines) + "\n"


def report(study: StudyConfig, runs: list[StudyRun] | None = None, log=print) -> dict:
    """Fit, plot and summarise the finished runs (out_dir/scaling.png, summary.json, summary.md)."""
    runs = runs if runs is not None else plan(study)
    rows = collect(runs, study.metric)
    missing = len(runs) - len(rows)
    out = Path(study.out_dir)
    if missing:
        log(f"{missing} of {len(runs)} runs are not finished yet (other shards?): "
            f"fitting the {len(rows)} that are")
    if not rows:
        return {"runs": [], "fits": {}}
    fits = fit_study(rows, study.axis, study.models)
    summary = {"study": to_dict(study), "runs": rows, "fits": fits, "missing_runs": missing}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = summary_markdown(rows, fits, study)
    (out / "summary.md").write_text(md)
    if any(block["fits"] for block in fits.values()):
        summary["figure"] = str(plot_study(rows, fits, study, out / "scaling.png"))
    log(md)
    figure = f", {summary['figure']}" if "figure" in summary else ""
    log(f"wrote {out / 'summary.json'}, {out / 'summary.md'}{figure}")
    return summary
