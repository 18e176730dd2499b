"""Transformer++ baseline (docs/method.md 2.1): token embedding -> Llama blocks -> norm -> untied head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ebt.config import ModelConfig
from ebt.errors import ConfigError
from ebt.nn import Backbone, compiled, init_weights, to_layout, vocab_out


def check_window(tokens: torch.Tensor, cfg: ModelConfig, extra: int = 0) -> None:
    """Refuse inputs the model was not built for, with the fix in the message (shapes only: no sync)."""
    if cfg.candidate == "frames":
        if tokens.dim() != 3 or tokens.shape[-1] != cfg.feature_dim:
            raise ConfigError(f"expected frame features of shape (batch, length, {cfg.feature_dim}), got "
                              f"{tuple(tokens.shape)}: the data's feature size must match the model's "
                              f"feature_dim")
    elif tokens.dim() != 2:
        raise ConfigError(f"expected token ids of shape (batch, length), got {tuple(tokens.shape)}")
    if tokens.shape[1] - extra > cfg.context_length:
        raise ConfigError(
            f"sequence of {tokens.shape[1] - extra} tokens is longer than the model's context_length "
            f"{cfg.context_length}: truncate the input or build the model with a larger context_length"
        )


def token_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int | None) -> dict:
    """Mean cross-entropy over non-pad targets, plus the sum and the count for token-weighted averages."""
    flat = logits.flatten(0, 1)
    nll = F.cross_entropy(
        flat.float() if logits.dtype in (torch.bfloat16, torch.float16) else flat,
        targets.flatten(),
        ignore_index=-100 if pad_id is None else pad_id,
        reduction="sum",
    )
    n = targets.numel() if pad_id is None else (targets != pad_id).sum()
    return {"loss": nll / n, "nll_sum": nll.detach(), "n_tokens": _count(n, targets.device)}


def _count(n, device) -> torch.Tensor:
    """A token count as a tensor on `device`: a Python int is filled in on the device (a kernel a CUDA
    graph can capture), not copied from the host."""
    return n if torch.is_tensor(n) else torch.full((), n, dtype=torch.long, device=device)


def token_loss_grad(logits: torch.Tensor, targets: torch.Tensor, pad_id: int | None, scale: float = 1.0,
                    grad_layout: tuple[torch.dtype, int] | None = None, out: torch.Tensor | None = None):
    """`token_loss` and its gradient d(scale * loss)/dlogits in closed form (softmax - one-hot, over the
    non-pad count), without autograd: one softmax pass over the (B, S, V) logits and two max reductions
    instead of autograd's log-softmax, its backward and a zero-filled gradient. Returns (loss dict,
    gradient). grad_layout: (dtype, pad) to return the gradient in (ebt.nn.to_layout), as matrix products
    read it; compiled, the cast and the padding cost no extra pass. out: a tensor of the logits' shape
    to write the gradient into when its dtype is the one computed in (CPU: reused memory,
    `ebt.fast.memory.Recycler`)."""
    lf = logits if logits.dtype not in (torch.bfloat16, torch.float16) else logits.float()
    t = targets.unsqueeze(-1)
    # the fused softmax kernel: a bare exp is slow on CPUs for the large negative values of optimised
    # EBT logits (denormals), and it is a single pass on GPUs too
    grad = torch.softmax(lf, -1) if out is None or out.dtype != lf.dtype else torch.softmax(lf, -1, out=out)
    # -log p_t without a log-softmax pass: logsumexp = max z - log(max p), as softmax's largest entry
    # is exp(0) / sum (>= 1/V, never underflows); then nll = logsumexp - z_t
    lse = lf.amax(-1) - torch.log(grad.amax(-1))
    res, keep, n = _nll_result(lse - lf.gather(-1, t).squeeze(-1), targets, pad_id)
    grad.scatter_add_(-1, t, torch.full_like(t, -1, dtype=grad.dtype))
    grad.mul_((keep * (scale / n)).unsqueeze(-1))
    return res, grad.to(logits.dtype) if grad_layout is None else to_layout(grad, *grad_layout)


def token_loss_grad_pointwise(logits: torch.Tensor, targets: torch.Tensor, pad_id: int | None,
                              scale: float = 1.0, grad_layout: tuple[torch.dtype, int] | None = None):
    """`token_loss_grad` written for a compiler: the one-hot is a comparison with the column index, not a
    scatter, so under torch.compile the softmax, the subtraction, the weights and the layout's cast and
    padding are one pass that writes the gradient once (a scatter leaves a float gradient written, then
    read back by a second pass). The same numbers to rounding."""
    lf = logits if logits.dtype not in (torch.bfloat16, torch.float16) else logits.float()
    t = targets.unsqueeze(-1)
    m = lf.amax(-1, keepdim=True)  # amax, x - max, exp, sum: what inductor makes one online-softmax pass
    e = (lf - m).exp()
    s = e.sum(-1, keepdim=True)
    res, keep, n = _nll_result((m + s.log()).squeeze(-1) - lf.gather(-1, t).squeeze(-1), targets, pad_id)
    hit = torch.arange(lf.shape[-1], device=lf.device) == t
    grad = (e / s - hit.to(lf.dtype)) * (keep * (scale / n)).unsqueeze(-1)
    return res, grad.to(logits.dtype) if grad_layout is None else to_layout(grad, *grad_layout)


def _nll_result(nll, targets, pad_id) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """token_loss's dict from per-position negative log-likelihoods (pad targets left out), the 0/1
    weights that left them out, and their sum."""
    real = None if pad_id is None else targets != pad_id
    keep = torch.ones_like(nll) if real is None else real.to(nll.dtype)
    n, nll_sum = keep.sum(), (nll * keep).sum()
    count = targets.numel() if real is None else real.sum()
    return {"loss": nll_sum / n, "nll_sum": nll_sum, "n_tokens": _count(count, targets.device)}, keep, n


def token_nll(logits: torch.Tensor, targets: torch.Tensor, pad_id: int | None) -> dict:
    """`token_loss`'s values (no gradient) as log-sum-exp minus the target's logit. Compiled
    (`compiled_token_nll`) it is one fused reduction over the logits that writes nothing of their size,
    where cross-entropy writes the (B, S, V) log-probabilities and reads them back: System 2 logs its
    first step's loss this way on CUDA."""
    lf = logits if logits.dtype not in (torch.bfloat16, torch.float16) else logits.float()
    nll = torch.logsumexp(lf, -1) - lf.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return _nll_result(nll, targets, pad_id)[0]


def compiled_token_nll():
    return compiled(token_nll)


def compiled_token_loss_grad():
    """token_loss_grad through torch.compile: its softmax, reductions, gather and scatter fuse into a couple
    of passes over the (B, S, V) logits instead of six, with no (B, S, V) temporaries."""
    return compiled(token_loss_grad)


def frame_loss(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """Smooth L1 (beta 1) to the next frame's features: the mean over frames of each frame's mean over
    features, plus the sum and the count of frames for frame-weighted averages."""
    per_frame = F.smooth_l1_loss(pred.float(), target.float(), beta=1.0, reduction="none").mean(-1)
    n = per_frame.numel()
    return {"loss": per_frame.mean(), "nll_sum": per_frame.detach().sum(),
            "n_tokens": _count(n, target.device)}


def prediction_loss(pred: torch.Tensor, target: torch.Tensor, cfg: ModelConfig) -> dict:
    """Cross-entropy for tokens, Smooth L1 for frames: the one place the candidate type decides the loss."""
    if cfg.candidate == "tokens":
        return token_loss(pred, target, cfg.pad_token_id)
    return frame_loss(pred, target)


def make_input_embedding(cfg: ModelConfig) -> nn.Module:
    """Context inputs to width D: a token table, or a linear map from frame features."""
    if cfg.candidate == "tokens":
        return nn.Embedding(cfg.vocab_size, cfg.d_model)
    return nn.Linear(cfg.feature_dim, cfg.d_model, bias=False)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = make_input_embedding(cfg)  # for frames: a linear map F -> D
        self.backbone = Backbone(cfg)
        out = cfg.vocab_size if cfg.candidate == "tokens" else cfg.feature_dim
        self.head = nn.Linear(cfg.d_model, out, bias=False)
        init_weights(self)

    def logits(self, tokens: torch.Tensor, fused: bool = True) -> torch.Tensor:
        """tokens (B, S) -> next-token logits (B, S, V); frames (B, S, F) -> next-frame features (B, S, F).
        fused: SDPA kernels; False writes the score matrix (double-backward capable, counted by FLOP
        counters)."""
        check_window(tokens, self.cfg)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.backbone(self.tok_emb(tokens), positions, causal=True, fused=fused)
        return vocab_out(h, self.head.weight) if self.cfg.candidate == "tokens" else self.head(h)

    def forward(self, window: torch.Tensor, fused: bool = True) -> dict:
        """window (B, S+1): reads window[:, :-1], predicts window[:, 1:]. Returns loss and counts."""
        check_window(window, self.cfg, extra=1)
        return prediction_loss(self.logits(window[:, :-1], fused), window[:, 1:], self.cfg)
