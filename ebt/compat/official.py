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

from ebt.config import ModelConfig
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
]


def official_to_ours(name: str) -> str:
    for pattern, repl in _RULES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise CheckpointError(f"no mapping for official parameter {name!r}: is this an official EBT/Transformer++ checkpoint?")


def convert_state_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {official_to_ours(k): v for k, v in official.items()}


def config_from_meta(meta: dict) -> ModelConfig:
    """Our ModelConfig for the model described by a reference file's metadata (official hparams)."""
    hp = meta["hparams"]
    if meta["model"] != "transformer":
        raise CheckpointError(f"reference model {meta['model']!r} is not supported yet (only 'transformer')")
    return ModelConfig(
        model="transformer",
        size="4xs",  # placeholder name: the explicit sizes below define the model
        n_layer=hp["num_transformer_blocks"],
        d_model=hp["embedding_dim"],
        n_head=hp["multiheaded_attention_heads"],
        vocab_size=meta["vocab_size"],
        context_length=meta["context_length"],
        pad_token_id=meta["pad_token_id"],
    )


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


def check_reference(path: str | Path) -> list[tuple[str, float]]:
    """Rebuild the reference case with our code in float64; return (tensor name, relative error) rows."""
    from ebt.models import build_model

    meta, t = load_reference(path)
    cfg = config_from_meta(meta)
    model = build_model(cfg).double()
    official = {k[len("param."):]: v for k, v in t.items() if k.startswith("param.")}
    model.load_state_dict(convert_state_dict(official), strict=True)
    window = t["input.tokens"]
    rows = []
    logits = model.logits(window[:, :-1])
    rows.append(("logits", rel_err(logits, t["logits"])))
    loss = model(window)["loss"]
    rows.append(("loss", rel_err(loss, t["loss"])))
    loss.backward()
    params = dict(model.named_parameters())
    for k in sorted(t):
        if k.startswith("grad."):
            ours = params[official_to_ours(k[len("grad."):])].grad
            rows.append((k, rel_err(ours, t[k]) if ours is not None else float("inf")))
    return rows
