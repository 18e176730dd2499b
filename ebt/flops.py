"""Analytic training FLOPs per token for the Transformer++ and the text EBT, and a check against
`torch.utils.flop_counter`.

Conventions (those of the scaling literature, and what `FlopCounterMode` counts):
- only matrix products count, 2 FLOPs per multiply-add; norms, softmax, RoPE, SwiGLU gating and the
  embedding lookup are free;
- attention scores are counted for the full query x key matrix (what explicit attention computes before
  masking), not half of it for causality;
- training = the forward pass plus every backward pass the optimizer step needs, per predicted token.

Notation: L layers, width D, context S tokens, vocabulary V, and per layer 7 D^2 weight multiply-adds per
token (4 attention maps + the 3 SwiGLU maps, hidden width D). One transformer pass over T tokens that
attend over T keys costs  P(T) = T * L * (7 D^2 + 2 T D)  multiply-adds.

Transformer++:  forward = P(S) + S D V (the vocabulary head); backward = 2 x forward (input and weight
gradients of every product), so per token  6 * (L (7 D^2 + 2 S D) + D V).

EBT (docs/method.md 2.2-2.6; C = S + 1 context tokens with the step token, S without it). Per landscape
the context stream runs once, P(C). One optimisation step on the candidate stream:
  F_cand = S * (V D + L (7 D^2 + 2 C D) + D)      forward: the V -> D projection of p, the blocks
           (candidate queries against the C context keys and values) and the energy head D -> 1;
  B1     = F_cand                                 dE/dp: one input-gradient product per forward product;
  a step that builds the second-order graph is then differentiated again by the loss's backward:
           2 x B1 (each product of B1 gives two) + 2 x F_cand (input and weight gradients), minus the
           energy head's unused terms (E itself is not in the loss: its forward product gets no gradient,
           and dE = 1 is a constant in B1): 6 F_cand - 3 S D in all;
  a step without it (S2's earlier steps): F_cand + B1.
The context stream's backward reaches every product but the last layer's query, output and FFN maps and
its attention (only that layer's keys and values feed the candidates):
  2 * C * ((L-1)(7 D^2 + 2 C D) + 2 D^2).
Each candidate also scores its own key and mixes its own value (2 S D multiply-adds per layer and pass:
elementwise products, which the counter skips); `ebt_train_flops` reports them apart as "self".
The no-grad forward that logs `energy_gap` during training is bookkeeping and is not counted.
This is the cost of one backward through the whole unroll (`--ebt-grad full`); the stepwise `double` and
`jvp` paths (ebt.think) compute the same gradients with fewer products and are not what this counts.
"""

from __future__ import annotations

from ebt.config import ModelConfig
from ebt.errors import ConfigError


def transformer_train_flops(cfg: ModelConfig) -> float:
    """Training FLOPs per predicted token of the Transformer++ (forward + backward, explicit attention)."""
    L, D, S, V = cfg.n_layer, cfg.d_model, cfg.context_length, cfg.vocab_size
    return 6.0 * (L * (7 * D * D + 2 * S * D) + D * V)


def _pass(T: int, keys: int, L: int, D: int) -> int:
    """Multiply-adds of the blocks over T query tokens attending over `keys` keys."""
    return T * L * (7 * D * D + 2 * keys * D)


def ebt_step_plan(cfg: ModelConfig, n_steps: int | None = None) -> list[tuple[int, bool]]:
    """(landscape key, builds the second-order graph) per training step, as ebt.think.unroll runs them."""
    e = cfg.ebt
    n = n_steps if n_steps is not None else e.eval_steps
    key = (lambda k: min(k, e.landscapes - 1)) if e.variant == "time_embed" else (lambda k: 0)
    return [(key(k), not e.truncate or k == n - 1) for k in range(n)]


def ebt_train_flops(cfg: ModelConfig, n_steps: int | None = None) -> dict:
    """Training FLOPs per predicted token of the text EBT, by part (see the module docstring).

    n_steps: optimisation steps of the unroll (default: the recipe's evaluation count, i.e. S1's 2).
    Returns {"context", "candidate", "matmul" (= the two: what FlopCounterMode counts), "self" (the
    elementwise self-attention terms), "total" (matmul + self)}. Replay rows (S2) add work per fresh token
    in proportion to replay_fraction and are not included."""
    if cfg.model != "ebt" or cfg.candidate != "tokens":
        raise ConfigError("ebt_train_flops is for the text EBT (model='ebt', candidate='tokens')")
    L, D, S, V = cfg.n_layer, cfg.d_model, cfg.context_length, cfg.vocab_size
    C = S + (1 if cfg.ebt.variant == "time_embed" else 0)
    plan = ebt_step_plan(cfg, n_steps)
    f_cand = S * V * D + _pass(S, C, L, D) + S * D
    ctx_fwd = _pass(C, C, L, D)
    ctx_bwd = 2 * (_pass(C, C, L - 1, D) + C * 2 * D * D)
    contexts = {(k, g) for k, g in plan}  # one context per (landscape, graph or not), as ContextCache keeps
    context = sum(ctx_fwd + (ctx_bwd if g else 0) for _, g in contexts)
    candidate = sum(6 * f_cand - 3 * S * D if g else 2 * f_cand for _, g in plan)
    self_terms = sum((6 if g else 2) * 2 * S * D * L for _, g in plan)
    per_token = lambda macs: 2.0 * macs / S  # noqa: E731  (2 FLOPs per multiply-add)
    out = {"context": per_token(context), "candidate": per_token(candidate), "self": per_token(self_terms)}
    out["matmul"] = out["context"] + out["candidate"]
    out["total"] = out["matmul"] + out["self"]
    return out


def train_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per predicted token (EBT: all terms, the recipe's step count)."""
    if cfg.model == "transformer" and cfg.candidate == "tokens":
        return transformer_train_flops(cfg)
    if cfg.model == "ebt":
        return ebt_train_flops(cfg)["total"]
    raise ConfigError(f"FLOP accounting covers the text models (transformer, ebt), "
                      f"not {cfg.model}/{cfg.candidate}")


def non_embedding_params(cfg: ModelConfig) -> int:
    """Block parameters, 7 L D^2 plus the norms (the 'parameters' of scaling laws)."""
    return cfg.n_layer * (7 * cfg.d_model ** 2 + 2 * cfg.d_model) + cfg.d_model


# ------------------------------------------------------------------------------------------ measured

def count_train_flops(model, window, n_steps: int | None = None) -> float:
    """FLOPs per predicted token of one training forward + backward, counted by FlopCounterMode.

    The model runs with explicit attention everywhere (the counter does not see inside fused kernels
    consistently; the formula counts the full score matrix) and, for an EBT, with a fixed step count and
    without the logging forward. FlopCounterMode fails inside autograd.grad when the candidate p is a
    leaf, so p is made a non-leaf here (softmax of a fresh leaf): the same products run."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    saved = {k: model.__dict__.get(k) for k in ("candidate_input", "context")}
    kind = getattr(getattr(model, "cfg", None), "model", None)
    kw = {"fused": False} if kind == "transformer" else {}  # explicit attention
    if kind == "ebt":
        from ebt.fast.plan import resolve_plan

        kw = {"n_steps": n_steps, "plan": resolve_plan(model, energy_gap=False)}  # no logging forward
        context = model.context  # contexts without a graph may pick fused kernels: count explicit attention
        model.context = lambda tokens, landscape, **kw: context(tokens, landscape)
        model.candidate_input = lambda z: torch.softmax(z.detach().requires_grad_(), dim=-1)
    try:
        with FlopCounterMode(display=False) as counter:
            model(window, **kw)["loss"].backward()
    finally:
        for k, v in saved.items():
            if v is None:
                model.__dict__.pop(k, None)
            else:
                model.__dict__[k] = v
    predicted = window.shape[0] * (window.shape[1] - 1)
    return counter.get_total_flops() / predicted
