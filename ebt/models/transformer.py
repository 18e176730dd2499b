"""Transformer++ baseline (ebt-method.md 2.1): token embedding -> Llama blocks -> norm -> untied head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ebt.config import ModelConfig
from ebt.errors import ConfigError
from ebt.nn import Backbone, init_weights


def check_window(tokens: torch.Tensor, cfg: ModelConfig, extra: int = 0) -> None:
    """Refuse inputs the model was not built for, with the fix in the message (shapes only: no sync)."""
    if tokens.dim() != 2:
        raise ConfigError(f"expected token ids of shape (batch, length), got {tuple(tokens.shape)}")
    if tokens.shape[1] - extra > cfg.context_length:
        raise ConfigError(
            f"sequence of {tokens.shape[1] - extra} tokens is longer than the model's context_length "
            f"{cfg.context_length}: truncate the input or build the model with a larger context_length"
        )


def token_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int | None) -> dict:
    """Mean cross-entropy over non-pad targets, plus the sum and the count for token-weighted averages."""
    nll = F.cross_entropy(
        logits.flatten(0, 1).float() if logits.dtype in (torch.bfloat16, torch.float16) else logits.flatten(0, 1),
        targets.flatten(),
        ignore_index=-100 if pad_id is None else pad_id,
        reduction="sum",
    )
    n = targets.numel() if pad_id is None else (targets != pad_id).sum()
    return {"loss": nll / n, "nll_sum": nll.detach(), "n_tokens": torch.as_tensor(n, device=targets.device)}


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.backbone = Backbone(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.fused_attention = True  # SDPA kernels; False writes the score matrix (double-backward capable)
        init_weights(self)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, S) -> next-token logits (B, S, V)."""
        check_window(tokens, self.cfg)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.backbone(self.tok_emb(tokens), positions, causal=True, fused=self.fused_attention))

    def forward(self, window: torch.Tensor) -> dict:
        """window (B, S+1): reads window[:, :-1], predicts window[:, 1:]. Returns loss and counts."""
        check_window(window, self.cfg, extra=1)
        out = token_loss(self.logits(window[:, :-1]), window[:, 1:], self.cfg.pad_token_id)
        return out
