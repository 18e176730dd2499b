"""Import weights named as in the official EBT implementation, and check our models against the
reference tensors it produced (tests/data/official, format in its README.md).

Only names and facts carry over from the official code; the mapping below is ours.
"""

from __future__ import annotations

import json
import pickle
import re
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from ebt.config import EBTConfig, ModelConfig
from ebt.errors import CheckpointError, first_line
from ebt.fast.plan import resolve_plan
from ebt.think import unroll

# official name pattern -> our name (shared by the Transformer++ and the EBT backbone)
_RULES = [
    (r"^embeddings\.weight$", "tok_emb.weight"),
    (r"^output\.weight$", "head.weight"),
    (r"^transformer\.norm\.weight$", "backbone.norm.weight"),
    (r"^transformer\.layers\.(\d+)\.attention\.(w[qkvo])\.weight$", r"backbone.blocks.\1.attn.\2.weight"),
    (r"^transformer\.layers\.(\d+)\.attention_norm\.weight$", r"backbone.blocks.\1.attn_norm.weight"),
    (r"^transformer\.layers\.(\d+)\.feed_forward\.(w[123])\.weight$", r"backbone.blocks.\1.ffn.\2.weight"),
    (r"^transformer\.layers\.(\d+)\.ffn_norm\.weight$", r"backbone.blocks.\1.ffn_norm.weight"),
    (r"^vocab_to_embed\.weight$", "vocab_to_embed.weight"),
    (r"^transformer\.final_layer\.weight$", "energy_head.weight"),
    (r"^transformer\.time_embeddings\.weight$", "step_emb.weight"),
    (r"^alpha$", "alpha"),
]
# official tensors that are settings here, not weights (the noise std is EBTConfig.langevin)
_SETTINGS = {"langevin_dynamics_noise_std"}

# official EBT hyperparameters whose other values change the model in ways this library does not implement
# (the Transformer++ reads none of them; initialisation settings do not matter to trained weights)
_SUPPORTED = {
    "absolute_clamp": 0.0, "clamp_futures_grad": False, "clamp_max_after_warm_up": 0.0,
    "contrastive_loss": False, "ebt_act_func": "silu", "ebt_norm": "rms",
    "langevin_dynamics_noise_learnable": False, "normalize_initial_condition": True,
    "normalize_initial_condition_only_first_step": False, "num_modality_processing_mlp_layers": 1,
    "randomize_mcmc_num_steps_final_landscape": False, "sharpen_predicted_distribution": 0.0,
    "soften_target_prob_dist": 0.0, "vocab_to_embed_uses_prob_dist": False,
    "denoising_initial_condition": "random_noise",
}


def _unsupported(hp: dict, model: str) -> dict:
    """The official settings of a checkpoint this library cannot reproduce, with their values."""
    bad = {k: hp[k] for k, v in _SUPPORTED.items() if model == "ebt" and k in hp and hp[k] != v}
    mult, width = hp.get("ffn_dim_multiplier"), hp["embedding_dim"]
    # official: None means a feed-forward width equal to D, as ours
    if mult is not None and int(width * mult) != width:
        bad["ffn_dim_multiplier"] = mult
    return bad


def official_to_ours(name: str) -> str:
    for pattern, repl in _RULES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise CheckpointError(f"no mapping for official parameter {name!r}: "
                          f"is this an official EBT/Transformer++ checkpoint?")


def convert_state_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {official_to_ours(k): v for k, v in official.items() if k not in _SETTINGS}


def config_from_hparams(hp: dict, model: str, vocab_size: int, pad_token_id: int | None = 0) -> ModelConfig:
    """Our ModelConfig for a model described by the official hyperparameters."""
    unsupported = _unsupported(hp, model)
    if unsupported:
        raise CheckpointError(f"official settings not implemented here: {unsupported} (supported: "
                              f"{ {k: _SUPPORTED.get(k, 'None or 1') for k in unsupported} })")
    ebt = None
    if model == "ebt":
        rand = hp["randomize_mcmc_num_steps"]
        ebt = EBTConfig(
            variant=hp["ebt_type"], landscapes=hp["mcmc_num_steps"], alpha=hp["mcmc_step_size"],
            alpha_learnable=hp["mcmc_step_size_learnable"], alpha_lr_mult=hp["mcmc_step_size_lr_multiplier"],
            # official: a minimum of 0 draws from 1 (and means nothing without random steps)
            rand_steps=rand, rand_steps_min=max(hp["randomize_mcmc_num_steps_min"], 1) if rand else 0,
            detach=not hp["no_mcmc_detach"], truncate=hp["truncate_mcmc"], loss_last_only=hp["truncate_mcmc"],
            alpha_rand_scale=hp["randomize_mcmc_step_size_scale"], langevin=hp["langevin_dynamics_noise"],
            init_scale=hp["gaussian_random_noise_scaling"],
            replay_buffer=hp.get("mcmc_replay_buffer_size", 192) if hp.get("mcmc_replay_buffer") else 0,
            replay_fraction=hp.get("mcmc_replay_buffer_sample_bs_percent", 0.5),
        )
    elif model != "transformer":
        raise CheckpointError(f"official model type {model!r} is not supported (use 'ebt' or 'transformer')")
    return ModelConfig(
        model=model,
        size="4xs",  # placeholder name: the explicit sizes below define the model
        n_layer=hp["num_transformer_blocks"],
        d_model=hp["embedding_dim"],
        n_head=hp["multiheaded_attention_heads"],
        vocab_size=vocab_size,
        context_length=hp["context_length"],
        pad_token_id=pad_token_id,
        ebt=ebt,
    )


def config_from_meta(meta: dict) -> ModelConfig:
    """Our ModelConfig for the model of a reference file (its metadata holds the official hparams)."""
    return config_from_hparams(meta["hparams"], meta["model"], meta["vocab_size"], meta["pad_token_id"])


def load_reference(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"reference file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path} is not a readable reference file ({e})") from e
    return meta, tensors


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, the measure of tests/data/official/README.md."""
    ours, ref = ours.detach().to(torch.float64).reshape(ref.shape), ref.to(torch.float64)
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def check_reference(path: str | Path,
                    methods=("full", "double", "jvp", "explicit", "official")) -> list[tuple[str, float]]:
    """Rebuild a reference case with our code in float64: same weights, same window, same starting
    candidate, the official validation settings with the training graph. Returns (tensor, relative
    error) rows for the logits (per step for an EBT), energies, losses and every parameter gradient.

    For an EBT the loss and every gradient are checked for each training path in `methods`
    (ebt.objective.train_step: "full" keeps the whole unroll's graph, "double", "jvp" and "explicit" one
    step at a time; "official": the official algorithm, ebt.compat.official_algorithm); rows other than
    "full" carry the method in brackets, e.g. "grad.alpha [jvp]"."""
    from ebt.compat.official_algorithm import OfficialAlgorithmEBT
    from ebt.models import build_model
    from ebt.objective import train_step

    meta, ref = load_reference(path)
    if meta.get("kind") == "trajectory":
        return check_trajectory(meta, ref)
    cfg = config_from_meta(meta)
    model = build_model(cfg).double()
    official = {k[len("param."):]: v for k, v in ref.items() if k.startswith("param.")}
    model.load_state_dict(convert_state_dict(official), strict=True)
    model.eval()  # the official validation phase: no random steps/alpha, no noise, no replay
    window = ref["input.tokens"]
    rows = []
    if cfg.model == "transformer":
        rows.append(("logits", rel_err(model.logits(window[:, :-1]), ref["logits"])))
        out = model(window)
        out["loss"].backward()
        return rows + _loss_and_grads(model, out, ref, "")
    init = ref["input.init_logits"]
    logits, energies = unroll(model, window[:, :-1], init, cfg.ebt.eval_steps, stochastic=False,
                              build_graph=False, step=resolve_plan(model).think_step(model))
    n_ref = sum(1 for k in ref if k.endswith(".logits") and k.startswith("step"))
    if n_ref != len(logits):
        raise CheckpointError(f"reference has {n_ref} steps, our model ran {len(logits)}")
    for k, (z, e) in enumerate(zip(logits, energies)):
        rows.append((f"step{k}.logits", rel_err(z, ref[f"step{k}.logits"])))
        rows.append((f"step{k}.energy", rel_err(e, ref[f"step{k}.energy"])))
    for method in methods:
        model.zero_grad(set_to_none=True)
        m = OfficialAlgorithmEBT.from_model(model) if method == "official" else model
        plan = resolve_plan(m, grad="full" if method == "official" else method)
        out = train_step(m, window, init=init, plan=plan)
        tag = "" if method == "full" else f" [{method}]"
        if method == "full":
            rows.append(("initial_loss", rel_err(out["ce_first"], ref["initial_loss"])))
            rows.append(("final_step_loss", rel_err(out["ce_last"], ref["final_step_loss"])))
        rows += _loss_and_grads(m, out, ref, tag)
    return rows


def _loss_and_grads(model, out, ref, tag: str) -> list[tuple[str, float]]:
    rows = [("loss" + tag, rel_err(out["loss"], ref["loss"]))]
    params = dict(model.named_parameters())
    for k in sorted(ref):
        if k.startswith("grad."):
            ours = params[official_to_ours(k[len("grad."):])].grad
            rows.append((k + tag, rel_err(ours, ref[k]) if ours is not None else float("inf")))
    missing = [n for n, p in params.items() if p.requires_grad and f"grad.{n}" not in
               {f"grad.{official_to_ours(k[5:])}" for k in ref if k.startswith("grad.")}]
    if missing:
        raise CheckpointError(f"reference lacks gradients for our parameters {missing}")
    return rows


def trainer_config(meta: dict):
    """Our TrainConfig for the official trainer settings in a trajectory file's hparams (float64, CPU)."""
    from ebt.config import TrainConfig

    hp = meta["hparams"]
    total = hp["max_scheduling_steps"]
    if total <= 0:  # official: -1 means max_steps
        total = hp.get("max_steps", meta["steps"])
    return TrainConfig(
        steps=total, batch_size=meta["batch"], lr=hp["peak_learning_rate"],
        min_lr_ratio=1 / hp["min_lr_scale"], warmup_steps=hp["warm_up_steps"],
        warmup_base_lr_divider=hp["warm_up_base_lr_divider"], weight_decay=hp["weight_decay"],
        beta1=hp["beta1"], beta2=hp["beta2"],
        grad_clip=max(0.0, hp.get("gradient_clip_val") or 0.0),  # official: <= 0 or None, no clipping
        device="cpu", precision="fp64")


def check_trajectory(meta: dict, ref: dict[str, torch.Tensor]) -> list[tuple[str, float]]:
    """Replay a trajectory file (meta kind "trajectory": N optimizer steps of the official trainer) through
    what `ebt train` runs: the model built from the hparams in float64, `make_optimizer` on a TrainConfig
    of the trainer's settings (`trainer_config`) and `optimizer_step` per step, with the file's batches and
    starting candidates. Rows: per step the loss, the learning rates (the largest relative error over the
    groups, the EBT's in the order [alpha, the rest]), the gradient norm before clipping and an EBT's
    last-step cross-entropy; then every final weight."""
    from ebt.models import build_model
    from ebt.objective import train_step, trains_itself
    from ebt.train import make_optimizer, optimizer_step

    cfg, tcfg = config_from_meta(meta), trainer_config(meta)
    model = build_model(cfg).double()
    official = {k[len("param."):]: v for k, v in ref.items() if k.startswith("param.")}
    model.load_state_dict(convert_state_dict(official), strict=True)
    model.eval()  # as the one-step cases: no random step count, step size or noise, no replay
    device = torch.device("cpu")
    optimizer, scheduler = make_optimizer(model, tcfg, tcfg.lr, device)
    plan = resolve_plan(model)
    model_train_step = partial(train_step, model, plan=plan) if trains_itself(model) else None
    rows = []
    for k in range(meta["steps"]):
        groups = sorted(optimizer.param_groups, key=lambda g: g.get("name") != "alpha")  # stable: alpha first
        lrs = torch.tensor([g["lr"] for g in groups], dtype=torch.float64)
        loss, extras, gnorm = optimizer_step(model, model_train_step, model, ref[f"step{k}.tokens"],
                                             optimizer, scheduler, tcfg, device,
                                             init=ref.get(f"step{k}.init_logits"))
        rows += [(f"step{k}.loss", rel_err(loss, ref[f"step{k}.loss"])),
                 (f"step{k}.lr", _entrywise_err(lrs, ref[f"step{k}.lr"])),
                 (f"step{k}.grad_norm", rel_err(gnorm, ref[f"step{k}.grad_norm"]))]
        last = f"step{k}.final_step_loss"
        if last in ref:
            rows.append((last, rel_err(extras["ce_last"], ref[last])))
    params = dict(model.named_parameters())
    for name in sorted(k for k in ref if k.startswith("final.") and k[len("final."):] not in _SETTINGS):
        rows.append((name, rel_err(params[official_to_ours(name[len("final."):])], ref[name])))
    return rows


def _entrywise_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest relative error of any entry (each learning rate on its own scale); inf if counts differ."""
    if ours.numel() != ref.numel():
        return float("inf")
    ref = ref.to(torch.float64).reshape(-1)
    return float(((ours - ref).abs() / ref.abs().clamp_min(1e-300)).max())


def convert_official(ckpt_path: str | Path, out_dir: str | Path, pad_token_id: int | None = 0,
                     trust_pickle: bool = False) -> Path:
    """Turn a checkpoint saved by the official code (a PyTorch Lightning .ckpt with `state_dict` and
    `hyper_parameters`) into our checkpoint directory (config.json + model.safetensors).

    The .ckpt is read with weights_only=True (tensors and plain values). One whose hyperparameters are
    pickled Python objects is refused unless trust_pickle, since unpickling can run code."""
    from ebt.checkpoint import save_checkpoint
    from ebt.config import to_dict

    cfg, model = read_official(ckpt_path, pad_token_id, trust_pickle)
    return save_checkpoint(out_dir, model, {"model": to_dict(cfg), "converted_from": str(ckpt_path)})


def read_official(ckpt_path: str | Path, pad_token_id: int | None = 0, trust_pickle: bool = False):
    """(our ModelConfig, our model with the checkpoint's weights) for an official Lightning .ckpt."""
    from ebt.checkpoint import load_weights
    from ebt.models import build_model

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise CheckpointError(f"{ckpt_path} does not exist")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{ckpt_path} holds pickled Python objects besides tensors and plain values, "
                              f"and unpickling can run code: refused. If you trust the file, pass "
                              f"--trust-pickle") from e
    except Exception as e:
        raise CheckpointError(f"{ckpt_path} is not a readable PyTorch checkpoint ({first_line(e)})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{ckpt_path} has no 'state_dict' and 'hyper_parameters': not a Lightning "
                              f"checkpoint of the official code")
    hp = ckpt["hyper_parameters"]
    if not isinstance(hp, dict) and not hasattr(hp, "__dict__"):
        raise CheckpointError(f"{ckpt_path}: 'hyper_parameters' is a {type(hp).__name__}, not the official "
                              f"trainer's settings")
    hp = dict(vars(hp) if not isinstance(hp, dict) else hp)
    state = {}
    for key, value in ckpt["state_dict"].items():
        parts = key.split(".")
        for cut in range(len(parts)):  # Lightning prefixes the module name ("model.")
            name = ".".join(parts[cut:])
            if name in _SETTINGS or any(re.match(p, name) for p, _ in _RULES):
                state[name] = value
                break
    model_type = "ebt" if "vocab_to_embed.weight" in state else "transformer"
    if "embeddings.weight" not in state:
        raise CheckpointError(f"{ckpt_path} has no embeddings.weight: "
                              f"not an official EBT/Transformer++ text model")
    needed = ["num_transformer_blocks", "embedding_dim", "multiheaded_attention_heads", "context_length"]
    if model_type == "ebt":
        needed += ["ebt_type", "mcmc_num_steps", "mcmc_step_size", "mcmc_step_size_learnable",
                   "mcmc_step_size_lr_multiplier", "randomize_mcmc_num_steps", "randomize_mcmc_num_steps_min",
                   "no_mcmc_detach", "truncate_mcmc", "randomize_mcmc_step_size_scale",
                   "langevin_dynamics_noise", "gaussian_random_noise_scaling"]
    missing = [k for k in needed if k not in hp]
    if missing:
        raise CheckpointError(f"{ckpt_path} lacks the hyperparameters {missing}")
    cfg = config_from_hparams(hp, model_type, state["embeddings.weight"].shape[0], pad_token_id)
    model = build_model(cfg)
    load_weights(model, {k: v.float() for k, v in convert_state_dict(state).items()}, source=str(ckpt_path))
    return cfg, model


def expected_outputs(ckpt_path: str | Path) -> Path:
    """Where a checkpoint's expected outputs lie: NAME.expected.safetensors beside NAME.ckpt."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(ckpt_path.name[: -len(ckpt_path.suffix)] + ".expected.safetensors")


def check_checkpoint(ckpt_path: str | Path) -> list[tuple[str, float]]:
    """Convert an official checkpoint as `ebt convert-official` does and compare, in float32, what the
    model computes for the window in NAME.expected.safetensors with what the official model computed:
    per step the candidate and the energy fed into the step (official validation, no Langevin noise)
    for an EBT, the logits for a Transformer++. Rows as `check_reference`."""
    from safetensors.torch import load_file

    exp = expected_outputs(ckpt_path)
    if not exp.is_file():
        raise CheckpointError(f"{exp} not found: checking {ckpt_path} needs the official outputs beside it")
    cfg, model = read_official(ckpt_path)
    expected = load_file(str(exp))
    model.eval()
    tokens = expected["input.tokens"][:, :-1]
    if cfg.model == "transformer":
        with torch.no_grad():
            return [("logits", rel_err(model.logits(tokens), expected["logits"]))]
    n_ref = sum(1 for k in expected if k.startswith("step") and k.endswith(".logits"))
    if n_ref != cfg.ebt.eval_steps:
        raise CheckpointError(f"{exp} has {n_ref} steps; the official validation of this model runs "
                              f"{cfg.ebt.eval_steps}")
    # its outputs were computed with the Langevin noise off, although its hparams train with std 3
    logits, energies = unroll(model, tokens, expected["input.init_logits"], n_ref, stochastic=False,
                              build_graph=False, noise=0.0, step=resolve_plan(model).think_step(model))
    rows = []
    for k, (z, e) in enumerate(zip(logits, energies)):
        rows += [(f"step{k}.logits", rel_err(z, expected[f"step{k}.logits"])),
                 (f"step{k}.energy", rel_err(e, expected[f"step{k}.energy"]))]
    return rows
