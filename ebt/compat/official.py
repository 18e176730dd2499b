"""Import weights named as in the official EBT implementation, and check our models against the
reference tensors it produced (../shared/reference, format in its README.md).

Only names and facts carry over from the official code; the mapping below is ours.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ebt.config import EBTConfig, ModelConfig
from ebt.errors import CheckpointError

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

# official hyperparameters whose other values change the model in ways this library does not implement
_SUPPORTED = {
    "absolute_clamp": 0.0, "clamp_futures_grad": False, "clamp_max_after_warm_up": 0.0, "contrastive_loss": False,
    "ebt_act_func": "silu", "ebt_norm": "rms", "ffn_dim_multiplier": 1, "langevin_dynamics_noise_learnable": False,
    "normalize_initial_condition": True, "normalize_initial_condition_only_first_step": False,
    "num_modality_processing_mlp_layers": 1, "randomize_mcmc_num_steps_final_landscape": False,
    "sharpen_predicted_distribution": 0.0, "soften_target_prob_dist": 0.0, "vocab_to_embed_uses_prob_dist": False,
    "weight_initialization_method": "xavier", "denoising_initial_condition": "random_noise",
}


def official_to_ours(name: str) -> str:
    for pattern, repl in _RULES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise CheckpointError(f"no mapping for official parameter {name!r}: is this an official EBT/Transformer++ checkpoint?")


def convert_state_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {official_to_ours(k): v for k, v in official.items() if k not in _SETTINGS}


def config_from_hparams(hp: dict, model: str, vocab_size: int, pad_token_id: int | None = 0) -> ModelConfig:
    """Our ModelConfig for a model described by the official hyperparameters."""
    unsupported = {k: hp[k] for k, v in _SUPPORTED.items() if k in hp and hp[k] != v}
    if unsupported:
        raise CheckpointError(f"official settings not implemented here: {unsupported} (supported: "
                              f"{ {k: _SUPPORTED[k] for k in unsupported} })")
    ebt = None
    if model == "ebt":
        ebt = EBTConfig(
            variant=hp["ebt_type"], landscapes=hp["mcmc_num_steps"], alpha=hp["mcmc_step_size"],
            alpha_learnable=hp["mcmc_step_size_learnable"], alpha_lr_mult=hp["mcmc_step_size_lr_multiplier"],
            rand_steps=hp["randomize_mcmc_num_steps"], rand_steps_min=hp["randomize_mcmc_num_steps_min"],
            detach=not hp["no_mcmc_detach"], truncate=hp["truncate_mcmc"], loss_last_only=hp["truncate_mcmc"],
            alpha_rand_scale=hp["randomize_mcmc_step_size_scale"], langevin=hp["langevin_dynamics_noise"],
            init_scale=hp["gaussian_random_noise_scaling"],
            replay_buffer=192 if hp.get("mcmc_replay_buffer") else 0,
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
    """max |ours - ref| / max |ref|, the measure of ../shared/reference/README.md."""
    ours, ref = ours.detach().to(torch.float64).reshape(ref.shape), ref.to(torch.float64)
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def check_reference(path: str | Path, methods=("full", "double", "jvp", "explicit", "official")) -> list[tuple[str, float]]:
    """Rebuild a reference case with our code in float64: same weights, same window, same starting
    candidate, the official validation settings with the training graph. Returns (tensor, relative
    error) rows for the logits (per step for an EBT), energies, losses and every parameter gradient.

    For an EBT the loss and every gradient are checked for each training path in `methods`
    (EBT.train_step: "full" keeps the whole unroll's graph, "double", "jvp" and "explicit" one step at a
    time;
    "official": the official algorithm, ebt.compat.official_algorithm); rows other than "full" carry
    the method in brackets, e.g. "grad.alpha [jvp]"."""
    from ebt.compat.official_algorithm import OfficialAlgorithmEBT
    from ebt.models import build_model

    meta, t = load_reference(path)
    cfg = config_from_meta(meta)
    model = build_model(cfg).double()
    official = {k[len("param."):]: v for k, v in t.items() if k.startswith("param.")}
    model.load_state_dict(convert_state_dict(official), strict=True)
    model.eval()  # the official validation phase: no random steps/alpha, no noise, no replay
    window = t["input.tokens"]
    rows = []
    if cfg.model == "transformer":
        rows.append(("logits", rel_err(model.logits(window[:, :-1]), t["logits"])))
        out = model(window)
        out["loss"].backward()
        return rows + _loss_and_grads(model, out, t, "")
    init = t["input.init_logits"]
    logits, energies = model.unroll(window[:, :-1], init, cfg.ebt.eval_steps, stochastic=False, build_graph=False)
    n_ref = sum(1 for k in t if k.endswith(".logits") and k.startswith("step"))
    if n_ref != len(logits):
        raise CheckpointError(f"reference has {n_ref} steps, our model ran {len(logits)}")
    for k, (z, e) in enumerate(zip(logits, energies)):
        rows.append((f"step{k}.logits", rel_err(z, t[f"step{k}.logits"])))
        rows.append((f"step{k}.energy", rel_err(e, t[f"step{k}.energy"])))
    for method in methods:
        model.zero_grad(set_to_none=True)
        m = OfficialAlgorithmEBT.from_model(model) if method == "official" else model
        out = m.train_step(window, init=init, method="full" if method == "official" else method)
        tag = "" if method == "full" else f" [{method}]"
        if method == "full":
            rows.append(("initial_loss", rel_err(out["ce_first"], t["initial_loss"])))
            rows.append(("final_step_loss", rel_err(out["ce_last"], t["final_step_loss"])))
        rows += _loss_and_grads(m, out, t, tag)
    return rows


def _loss_and_grads(model, out, t, tag: str) -> list[tuple[str, float]]:
    rows = [("loss" + tag, rel_err(out["loss"], t["loss"]))]
    params = dict(model.named_parameters())
    for k in sorted(t):
        if k.startswith("grad."):
            ours = params[official_to_ours(k[len("grad."):])].grad
            rows.append((k + tag, rel_err(ours, t[k]) if ours is not None else float("inf")))
    missing = [n for n, p in params.items() if p.requires_grad and f"grad.{n}" not in
               {f"grad.{official_to_ours(k[5:])}" for k in t if k.startswith("grad.")}]
    if missing:
        raise CheckpointError(f"reference lacks gradients for our parameters {missing}")
    return rows


def convert_official(ckpt_path: str | Path, out_dir: str | Path, pad_token_id: int | None = 0) -> Path:
    """Turn a checkpoint saved by the official code (a PyTorch Lightning .ckpt with `state_dict` and
    `hyper_parameters`) into our checkpoint directory (config.json + model.safetensors).

    The .ckpt is unpickled (Lightning stores hyperparameters as Python objects): convert only files
    you trust."""
    from ebt.checkpoint import save_checkpoint
    from ebt.config import to_dict
    from ebt.models import build_model

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise CheckpointError(f"{ckpt_path} does not exist")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{ckpt_path} is not a readable PyTorch checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{ckpt_path} has no 'state_dict' and 'hyper_parameters': not a Lightning checkpoint "
                              f"of the official code")
    hp = ckpt["hyper_parameters"]
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
        raise CheckpointError(f"{ckpt_path} has no embeddings.weight: not an official EBT/Transformer++ text model")
    needed = ["num_transformer_blocks", "embedding_dim", "multiheaded_attention_heads", "context_length"]
    if model_type == "ebt":
        needed += ["ebt_type", "mcmc_num_steps", "mcmc_step_size", "mcmc_step_size_learnable",
                   "mcmc_step_size_lr_multiplier", "randomize_mcmc_num_steps", "randomize_mcmc_num_steps_min",
                   "no_mcmc_detach", "truncate_mcmc", "randomize_mcmc_step_size_scale", "langevin_dynamics_noise",
                   "gaussian_random_noise_scaling"]
    missing = [k for k in needed if k not in hp]
    if missing:
        raise CheckpointError(f"{ckpt_path} lacks the hyperparameters {missing}")
    cfg = config_from_hparams(hp, model_type, state["embeddings.weight"].shape[0], pad_token_id)
    model = build_model(cfg)
    from ebt.checkpoint import load_weights

    load_weights(model, {k: v.float() for k, v in convert_state_dict(state).items()}, source=str(ckpt_path))
    return save_checkpoint(out_dir, model, {"model": to_dict(cfg), "converted_from": str(ckpt_path)})
