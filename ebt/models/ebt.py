"""Autoregressive Energy-Based Transformer for tokens (docs/method.md section 2).

The model scores (context, candidate) pairs: the candidate for position i is a row of logits z_i over
the vocabulary, turned into probabilities p_i = softmax(z_i), embedded by a bias-free V -> D map, and
read by the same Llama backbone as the Transformer++ with two-stream attention (context causal;
candidate i sees x_0..x_i and itself). The energy head gives one scalar E_i per candidate.
Predicting is optimisation: z_next = p - alpha * dE/dp (the official update, taken with respect to
the probabilities), repeated for a few steps; training puts cross-entropy on the optimised logits.
"""

from __future__ import annotations

import torch
from torch import nn

from ebt.config import ModelConfig
from ebt.errors import ConfigError
from ebt.fast import written_out
from ebt import objective
from ebt.models.transformer import make_input_embedding
from ebt.nn import Backbone, KVCache, candidate_frame, init_weights, vocab_in, vocab_out
from ebt.rand import randn_
from ebt.recipe import alpha_param_groups, inference_steps, recipe_alpha


class ReplayBuffer:
    """FIFO of past training rows (window, final logits) for System 2 training (docs/method.md 2.5).

    Preallocated on first use, so its memory is fixed: capacity x ((S+1) int64 + S x V logits).
    Kept per process (each DDP rank keeps its own) and saved with checkpoints.

    Sampling and pushing run on the buffer's device with no host read: the write position is a
    device tensor (`cursor`) and the rows are drawn as the first n of a random ordering (torch.randperm
    of a small n is drawn on the host), so a full buffer works inside a captured CUDA graph
    (ebt.fast.cuda_graph.CapturedStep). `paused` makes push a no-op (a graph's warm-up runs must not add
    rows)."""

    def __init__(self, capacity: int, context_length: int | None = None, candidate_size: int | None = None):
        self.capacity, self.size, self.paused = capacity, 0, False
        self.shapes = (context_length, candidate_size)  # what a loaded buffer's rows must fit
        self.windows: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.cursor: torch.Tensor | None = None  # the next row to write (0-d int64, the buffer's device)

    def __len__(self):
        return self.size

    @property
    def next(self) -> int:
        return 0 if self.cursor is None else int(self.cursor)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.windows, self.logits) if t is not None)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.rand(self.size, device=self.windows.device).argsort()[:n]  # n distinct rows, random order
        return self.windows[idx], self.logits[idx]

    def push(self, windows: torch.Tensor, logits: torch.Tensor) -> None:
        if self.paused:
            return
        if self.windows is None:
            self.windows = windows.new_zeros((self.capacity, *windows.shape[1:]))
            self.logits = logits.new_zeros((self.capacity, *logits.shape[1:]), dtype=logits.dtype)
            self.cursor = torch.zeros((), dtype=torch.long, device=windows.device)
        n = min(windows.shape[0], self.capacity)
        idx = (self.cursor + torch.arange(n, device=windows.device)) % self.capacity
        self.windows.index_copy_(0, idx, windows[-n:])
        self.logits.index_copy_(0, idx, logits[-n:].detach().to(self.logits.dtype))
        self.cursor.add_(n).remainder_(self.capacity)  # in place: a captured graph holds its address
        self.size = min(self.size + n, self.capacity)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "size": self.size, "next": self.next,
                "windows": self.windows, "logits": self.logits}

    def load_state_dict(self, state: dict) -> None:
        problem = self._problem(state)
        if problem:
            raise ConfigError(f"the saved replay buffer {problem}")
        self.size, self.windows, self.logits = state["size"], state["windows"], state["logits"]
        self.cursor = None if self.windows is None else torch.tensor(
            int(state["next"]), dtype=torch.long, device=self.windows.device)


    def _problem(self, state) -> str | None:
        """Why a saved buffer cannot be this one, or None."""
        ints = ("capacity", "size", "next")
        if not isinstance(state, dict) or any(type(state.get(k)) is not int for k in ints):
            return f"lacks {', '.join(ints)} (it is corrupt or not written by `ebt train`)"
        if state["capacity"] != self.capacity:
            return (f"holds {state['capacity']} rows, the model {self.capacity}: resume with the same "
                    f"--replay-buffer")
        w, z = state.get("windows"), state.get("logits")
        if w is None and z is None and state["size"] == 0:
            return None
        S, C = self.shapes
        if not (isinstance(w, torch.Tensor) and isinstance(z, torch.Tensor)):
            return "lacks its windows or candidates (it is corrupt)"
        fits = (w.dim() >= 2 and z.dim() == 3 and w.shape[0] == z.shape[0] == self.capacity
                and (S is None or (w.shape[1], z.shape[1]) == (S + 1, S)) and (C is None or z.shape[2] == C))
        if not fits or not 0 <= state["size"] <= self.capacity or not 0 <= state["next"] < self.capacity:
            return (f"has windows {tuple(w.shape)}, candidates {tuple(z.shape)}, size {state['size']}, next "
                    f"{state['next']}; this model needs {self.capacity} rows of context {S} and candidate "
                    f"size {C} (the file is corrupt or from another model)")
        return None


class EBT(nn.Module):
    nonfinite_hint = ("an EBT usually diverges because alpha is too large (candidate logits explode) or "
                      "too small (energy gradients must grow huge to move the candidate): change --alpha or "
                      "--alpha-lr-mult, or lower --lr")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, e = cfg, cfg.ebt
        d = cfg.d_model
        self.tok_emb = make_input_embedding(cfg)  # tokens: a table; frames: a linear map F -> D
        # the candidate's own map to the width (not tok_emb): probabilities V -> D, or features F -> D
        self.vocab_to_embed = nn.Linear(self.candidate_size, d, bias=False)
        self.step_emb = nn.Embedding(e.landscapes, d) if e.variant == "time_embed" else None
        self.backbone = Backbone(cfg)
        self.energy_head = nn.Linear(d, 1, bias=False)
        init_weights(self)
        self.alpha = nn.Parameter(torch.tensor(float(e.alpha)), requires_grad=e.alpha_learnable)
        self.replay = (ReplayBuffer(e.replay_buffer, cfg.context_length, self.candidate_size)
                       if e.replay_buffer else None)

    @property
    def candidate_softmax(self) -> bool:
        """Whether candidate_input is the softmax (tokens) rather than the identity (frames)."""
        return self.cfg.candidate == "tokens"

    @property
    def candidate_size(self) -> int:
        return self.cfg.vocab_size if self.cfg.candidate == "tokens" else self.cfg.feature_dim

    def extra_param_groups(self) -> list[dict]:
        return alpha_param_groups(self.alpha, self.cfg.ebt)

    # ------------------------------------------------------------------------------------- the energy
    # The hooks ebt.think uses: context / landscape_key / candidate_input / energy_from / step_alpha.

    def context(self, tokens: torch.Tensor, landscape: int, first_order: bool = False) -> tuple[KVCache, int]:
        """The context stream for a landscape: each layer's keys and values of [step_k, x_0..x_{S-1}].
        It never depends on a candidate, so one context serves every step on its landscape.
        first_order: only first-order gradients will flow through it (thinking, the stepwise training
        paths), so fused attention kernels may be used."""
        h, positions, prefix = self.context_input(tokens, landscape)
        cache = KVCache(self.cfg.n_layer)
        self.backbone(h, positions, cache=cache, causal=True, fused=first_order)
        return cache, prefix

    def context_input(self, tokens: torch.Tensor, landscape: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(the context stream's input embeddings (B, T, D), their RoPE positions, the prefix length):
        the landscape's step token first, at position 0, then x_0..x_{S-1}."""
        h = self.tok_emb(tokens)
        prefix = 0
        if self.step_emb is not None:
            k = self.landscape_key(landscape)
            h = torch.cat([self.step_emb.weight[k].expand(h.shape[0], 1, -1), h], dim=1)
            prefix = 1
        return h, torch.arange(h.shape[1], device=h.device), prefix

    def landscape_key(self, k: int) -> int:
        # steps beyond the trained landscapes reuse the last; without step tokens all steps share one
        return min(k, self.step_emb.num_embeddings - 1) if self.step_emb is not None else 0

    def candidate_input(self, z: torch.Tensor) -> torch.Tensor:
        # tokens: the update is taken with respect to the probabilities; frames: the features themselves
        return torch.softmax(z, dim=-1) if self.candidate_softmax else z

    def energy_from(self, ctx: tuple, p: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
        """E (B, S) of candidate distributions p (B, S, V). ctx = (cache, prefix) from `context`, or
        (cache, prefix, offset) when p holds the candidates of positions offset.. only (generation).
        pad: the V-sized product's layout (ebt.nn.pads_vocab; None: the device's)."""
        return self.energy_from_embedding(ctx, vocab_in(p, self.vocab_to_embed.weight, pad))

    def energy_from_embedding(self, ctx: tuple, y: torch.Tensor) -> torch.Tensor:
        """E (B, S) of embedded candidates y = vocab_to_embed(p) (B, S, D). The fast paths
        (ebt.fast.vocab_side) handle the linear V -> D map themselves and call this."""
        cache, positions, allowed = candidate_frame(ctx, y.shape[1], y.device)
        h = self.backbone.candidates(y, positions, cache, allowed)
        return self.energy_head(h).squeeze(-1)

    def energy_grad(self, ctx: tuple, p: torch.Tensor, compiled: bool = False,
                    pad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, dE/dp) by plain tensor operations (ebt.fast.written_out): the same numbers as autograd on
        energy_from, and a graph that an ordinary backward differentiates once more. compiled: through
        torch.compile; pad: as in energy_from."""
        W = self.vocab_to_embed.weight  # (D, V): dE/dp = dE/dy W
        E, u = self.energy_grad_embedding(ctx, vocab_in(p, W, pad), compiled=compiled, pad=pad)
        return E, vocab_out(u, W.t(), pad)

    def energy_grad_embedding(self, ctx: tuple, y: torch.Tensor, compiled: bool = False,
                              pad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, dE/dy) of embedded candidates y (B, S, D), by plain operations."""
        return written_out.energy_grad(self, ctx, y, compiled=compiled, pad_vocab=pad)

    def energy(self, tokens: torch.Tensor, p: torch.Tensor, landscape: int) -> torch.Tensor:
        """E (B, S) of candidate distributions p (B, S, V) given context tokens (B, S) on a landscape."""
        return self.energy_from(self.context(tokens, landscape), p)

    def step_alpha(self, shape, stochastic: bool) -> torch.Tensor:
        return recipe_alpha(self.alpha, self.cfg.ebt, (*shape[:2], 1), stochastic)  # per (row, position)

    def init_candidate(self, tokens: torch.Tensor, take=None) -> torch.Tensor:
        """A random starting candidate ~ N(0, init_scale^2): logits (B, S, V) or features (B, S, F).
        take(shape, dtype, device): where to draw it (fast paths: recycled memory; None: torch.empty)."""
        shape, dtype = (*tokens.shape[:2], self.candidate_size), self.tok_emb.weight.dtype
        z = randn_(torch.empty(shape, dtype=dtype, device=tokens.device) if take is None
                   else take(shape, dtype, tokens.device))
        return z.mul_(self.cfg.ebt.init_scale)  # in place: no second (B, S, V) tensor

    def inference_steps(self) -> int:
        """Thinking's default steps per landscape (official advanced inference: S2 2, S1 1); validation
        runs cfg.ebt.eval_steps in all (landscapes + R). See ebt.recipe.inference_schedule."""
        return inference_steps(self.cfg.ebt)

    def forward(self, window: torch.Tensor, init: torch.Tensor | None = None, n_steps=None,
                noise: float | None = None, plan=None) -> dict:
        """The training objective on a batch (ebt.objective.forward): window (B, S+1) -> loss and
        metrics, the whole unroll's graph kept for loss.backward()."""
        return objective.forward(self, window, init, n_steps, noise, plan)
