"""Model families and loading by name: `build_model(cfg)`, `from_pretrained(path)`."""

from __future__ import annotations

from torch import nn

from ebt.checkpoint import load_state, load_weights, read_model_config, resolve
from ebt.config import ModelConfig
from ebt.models.ebt import EBT
from ebt.models.ebt_image import DiTDenoiser, EBTDenoiser
from ebt.models.transformer import Transformer

MODELS: dict[str, type[nn.Module]] = {"transformer": Transformer, "ebt": EBT, "dit": DiTDenoiser}


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.model == "ebt" and cfg.candidate == "image":
        return EBTDenoiser(cfg)  # the bidirectional image EBT (same thinking loop, no context stream)
    return MODELS[cfg.model](cfg)


def load_model(path, device="cpu") -> nn.Module:
    """Load a model saved by `ebt train` (a directory with config.json + model.safetensors, or a run
    directory holding checkpoint/)."""
    path = resolve(path)
    model = build_model(read_model_config(path))
    load_weights(model, load_state(path), source=str(path))
    return model.to(device)


from_pretrained = load_model

__all__ = ["EBT", "DiTDenoiser", "EBTDenoiser", "MODELS", "Transformer", "build_model", "from_pretrained",
           "load_model"]
