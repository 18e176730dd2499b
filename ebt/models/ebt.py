"""Autoregressive Energy-Based Transformer for tokens (ebt-method.md section 2).

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

from ebt.config import EBTConfig, ModelConfig
from ebt.errors import ConfigError
from ebt.models.transformer import (check_window, compiled_token_loss_grad, compiled_token_nll, make_input_embedding,
                                   prediction_loss, token_loss_grad)
from ebt.energy_grad import context_kv, energy_grad
from ebt.nn import Backbone, KVCache, candidate_frame, init_weights, to_layout, vocab_in, vocab_out
from ebt.think import (GRAD_METHODS, RECYCLER, alpha_param_groups, auto_grad_method, autograd_loss_grad,
                       draw_steps, inference_steps, randn_, recipe_alpha, step_landscapes, stepwise_ok,
                       unroll, unroll_backward)


class ReplayBuffer:
    """FIFO of past training rows (window, final logits) for System 2 training (ebt-method.md 2.5).

    Preallocated on first use, so its memory is fixed: capacity x ((S+1) int64 + S x V logits).
    Kept per process (each DDP rank keeps its own) and saved with checkpoints.

    Sampling and pushing run on the buffer's device with no host read: the write position is a
    device tensor (`cursor`) and the rows are drawn as the first n of a random ordering (torch.randperm
    of a small n is drawn on the host), so a full buffer works inside a captured CUDA graph
    (ebt.train.CapturedStep). `paused` makes push a no-op (a graph's warm-up runs must not add rows).
    """

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
                    f"{state['next']}; this model needs {self.capacity} rows of context {S} and candidate size {C} "
                    f"(the file is corrupt or from another model)")
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
        self.fused_attention = False  # the second-order graph needs attention with double backward
        self.measure_final_energy = True  # training logs E(initial) - E(final): one extra no-grad forward
        self.grad_method = "auto"  # how train_step takes the second-order term (see train_step)
        # inference: dE/dp written out (ebt.energy_grad) or by autograd; None (auto): written out on CPU,
        # autograd on CUDA eager (the fastest measured, ebt.think.explicit_for)
        self.explicit_grad: bool | None = None
        # torch.compile the written-out gradient, the loss gradient, the context stream and each step's
        # (B, S, V) side: implies the written-out gradient for inference and for training under
        # grad_method "auto"; a thinking step becomes a few compiled functions
        self.compile_grad = False

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
        first_order: only first-order gradients will flow through it (the stepwise training paths), so
        fused attention kernels may be used."""
        ctx = self.tok_emb(tokens)
        prefix = 0
        if self.step_emb is not None:  # the landscape's step token goes first, at position 0
            k = self.landscape_key(landscape)
            ctx = torch.cat([self.step_emb.weight[k].expand(ctx.shape[0], 1, -1), ctx], dim=1)
            prefix = 1
        positions = torch.arange(ctx.shape[1], device=ctx.device)
        if first_order and self.compile_grad:  # written out and compiled, with its backward
            return context_kv(self, ctx, positions, compiled=True), prefix
        cache = KVCache(self.cfg.n_layer)
        self.backbone(ctx, positions, cache=cache, causal=True, fused=self.fused_attention or first_order)
        return cache, prefix

    def landscape_key(self, k: int) -> int:
        # steps beyond the trained landscapes reuse the last; without step tokens all steps share one
        return min(k, self.step_emb.num_embeddings - 1) if self.step_emb is not None else 0

    def candidate_input(self, z: torch.Tensor) -> torch.Tensor:
        # tokens: the update is taken with respect to the probabilities; frames: the features themselves
        return torch.softmax(z, dim=-1) if self.candidate_softmax else z

    def energy_from(self, ctx: tuple, p: torch.Tensor) -> torch.Tensor:
        """E (B, S) of candidate distributions p (B, S, V). ctx = (cache, prefix) from `context`, or
        (cache, prefix, offset) when p holds the candidates of positions offset.. only (generation)."""
        return self.energy_from_embedding(ctx, vocab_in(p, self.vocab_to_embed.weight))

    def energy_from_embedding(self, ctx: tuple, y: torch.Tensor) -> torch.Tensor:
        """E (B, S) of embedded candidates y = vocab_to_embed(p) (B, S, D). The fast training path
        (ebt.think.unroll_backward) handles the linear V -> D map itself and calls this."""
        cache, positions, allowed = candidate_frame(ctx, y.shape[1], y.device)
        h = self.backbone.candidates(y, positions, cache, allowed)
        return self.energy_head(h).squeeze(-1)

    def energy_grad(self, ctx: tuple, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, dE/dp) by plain tensor operations (ebt.energy_grad): the same numbers as autograd on
        energy_from, and a graph that an ordinary backward differentiates once more."""
        W = self.vocab_to_embed.weight  # (D, V): dE/dp = dE/dy W
        E, u = self.energy_grad_embedding(ctx, vocab_in(p, W))
        return E, vocab_out(u, W.t())

    def energy_grad_embedding(self, ctx: tuple, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, dE/dy) of embedded candidates y (B, S, D), by plain operations (compiled if compile_grad)."""
        return energy_grad(self, ctx, y, compiled=self.compile_grad)

    def energy(self, tokens: torch.Tensor, p: torch.Tensor, landscape: int) -> torch.Tensor:
        """E (B, S) of candidate distributions p (B, S, V) given context tokens (B, S) on a landscape."""
        return self.energy_from(self.context(tokens, landscape), p)

    def step_alpha(self, shape, stochastic: bool) -> torch.Tensor:
        return recipe_alpha(self.alpha, self.cfg.ebt, (*shape[:2], 1), stochastic)  # per (row, position)

    def init_candidate(self, tokens: torch.Tensor) -> torch.Tensor:
        """A random starting candidate ~ N(0, init_scale^2): logits (B, S, V) or features (B, S, F)."""
        shape = (*tokens.shape[:2], self.candidate_size)
        z = randn_(RECYCLER.take(shape, self.tok_emb.weight.dtype, tokens.device))
        return z.mul_(self.cfg.ebt.init_scale)  # in place: no second (B, S, V) tensor

    def inference_steps(self) -> int:
        """Thinking's default steps per landscape (official advanced inference: S2 2, S1 1); validation
        runs cfg.ebt.eval_steps in all (landscapes + R). See ebt.think.inference_schedule."""
        return inference_steps(self.cfg.ebt)

    def unroll(self, tokens, z, n_steps, stochastic: bool, build_graph: bool, noise: float | None = None):
        """Per-step candidates and energies of the training unroll (see ebt.think.unroll; noise None: the
        trained Langevin std, in every phase as the official forward)."""
        return unroll(self, tokens, z, n_steps, stochastic, build_graph, self.cfg.ebt, noise)

    def train_steps(self):
        """This forward's steps: a count, or in training with several landscapes a schedule (draw_steps)."""
        return draw_steps(self.cfg.ebt, self.training)

    def _batch(self, window, init):
        """Inputs, targets, starting candidates, with System 2's replayed rows appended in training."""
        check_window(window, self.cfg, extra=1)
        e = self.cfg.ebt
        tokens, targets = window[:, :-1], window[:, 1:]
        z = init if init is not None else self.init_candidate(tokens)
        if self.training and self.replay is not None and len(self.replay) > 0:
            n = min(len(self.replay), int(tokens.shape[0] * e.replay_fraction))
            if n > 0:
                w_old, z_old = self.replay.sample(n)
                tokens = torch.cat([tokens, w_old[:, :-1]])
                targets = torch.cat([targets, w_old[:, 1:]])
                window = torch.cat([window, w_old])
                z_all = RECYCLER.take((z.shape[0] + n, *z.shape[1:]), z.dtype, z.device)
                torch.cat([z, z_old.to(z.dtype)], out=z_all)
                if init is None:  # drawn above: no one else holds it
                    RECYCLER.give(z)
                z = z_all
        return window, tokens, targets, z

    def _finish(self, window, tokens, fresh, steps, loss, first, last, z_last, e_first) -> dict:
        """The metrics dict; the final energy is measured (on the last step's landscape) and System 2's
        replay buffer fed here. steps: each step's landscape."""
        e = self.cfg.ebt
        out = {"loss": loss, "nll_sum": last["nll_sum"], "n_tokens": last["n_tokens"],
               "ce_first": first["loss"].detach(), "ce_last": last["loss"].detach(),
               "alpha": self.alpha.detach().clamp(min=e.alpha_min), "steps": torch.tensor(float(len(steps)))}
        if self.training and self.measure_final_energy:
            with torch.no_grad():
                e_final = self.energy(tokens, self.candidate_input(z_last.detach()), steps[-1])
            out["energy_gap"] = (e_first - e_final).mean()
        if self.training and self.replay is not None:
            self.replay.push(window[:fresh], z_last[:fresh])
            out["replay_rows"] = torch.tensor(float(window.shape[0] - fresh))
        return out

    def _steps(self, n_steps) -> list[int]:
        """Each unroll step's landscape (ebt.think.step_landscapes): drawn by the recipe (first, before any
        other random number), or given as a count or a schedule (a captured CUDA graph replays one fixed
        draw: ebt.train.CapturedStep draws it on the host)."""
        if n_steps is None:
            n_steps = self.train_steps()
        L = self.cfg.ebt.landscapes
        if isinstance(n_steps, (tuple, list)):
            if not n_steps or any(not 0 <= int(k) < L for k in n_steps):
                raise ConfigError(f"n_steps={n_steps}: a schedule lists landscapes in 0..{L - 1}")
            return step_landscapes(n_steps)
        if int(n_steps) < 1:
            raise ConfigError(f"n_steps={n_steps}: an unroll takes at least one step")
        return step_landscapes(int(n_steps))

    def forward(self, window: torch.Tensor, init: torch.Tensor | None = None, n_steps=None,
                noise: float | None = None) -> dict:
        """window (B, S+1) token ids or (B, S+1, F) frame features -> loss (S1: the mean over steps; S2:
        the last step's) and training metrics. The whole unroll's graph is kept for loss.backward();
        `train_step` gives the same gradients one step's graph at a time.

        In training mode (model.train()) the recipe's randomness applies (step count, alpha, replay); in
        eval mode it does not and cfg.ebt.eval_steps steps run, as in the official validation phase. The
        Langevin noise (noise None: cfg.ebt.langevin; 0: none) is added in both, as the official forward
        adds it in every phase. n_steps, if given, replaces the drawn step count (a count or a schedule)."""
        steps = self._steps(n_steps)
        n_steps = len(steps)
        fresh = window.shape[0]
        window, tokens, targets, z = self._batch(window, init)
        logits, energies = self.unroll(tokens, z, steps, self.training, torch.is_grad_enabled(), noise)
        last = prediction_loss(logits[-1], targets, self.cfg)
        first = prediction_loss(logits[0], targets, self.cfg) if n_steps > 1 else last
        if self.cfg.ebt.loss_last_only:
            loss = last["loss"]
        else:  # S1: the mean over steps of each step's loss
            middle = [prediction_loss(z_k, targets, self.cfg) for z_k in logits[1:-1]]
            loss = torch.stack([c["loss"] for c in [first, *middle, last][: n_steps]]).mean()
        return self._finish(window, tokens, fresh, steps, loss, first, last, logits[-1], energies[0])

    def train_step(self, window: torch.Tensor, init: torch.Tensor | None = None, scale: float = 1.0,
                   method: str | None = None, n_steps: int | None = None) -> dict:
        """forward + backward of one (micro-)batch: adds scale * dloss/dtheta to the parameters' .grad
        and returns `forward`'s metrics with the loss detached.

        The fast path (ebt.think.unroll_backward) keeps one step's graph at a time and computes each
        context stream once per landscape; method "explicit" (the gradient written out, ebt.energy_grad;
        compiled when self.compile_grad), "double" (double backward) or "jvp" (forward mode) chooses how
        the second-order term is taken, and "auto" (the default) the fastest measured for the device
        (ebt.think.auto_grad_method, benchmarks/RESULTS.md). "full", or a recipe where stepping is not
        exact (no detach and no truncation), runs `forward` and one backward through the whole unroll."""
        method = method or self.grad_method
        if method == "auto":
            method = auto_grad_method(self.alpha.device, self.compile_grad)
        if method not in GRAD_METHODS:
            raise ConfigError(f"unknown gradient method {method!r}; choose one of {GRAD_METHODS}")
        e = self.cfg.ebt
        if method == "full" or not stepwise_ok(e):
            out = self(window, init, n_steps)
            (out["loss"] * scale).backward()
            return {**out, "loss": out["loss"].detach()}
        steps = self._steps(n_steps)
        n_steps = len(steps)
        fresh = window.shape[0]
        window, tokens, targets, z = self._batch(window, init)
        loss_steps = [n_steps - 1] if e.loss_last_only else list(range(n_steps))
        weight = 1.0 / len(loss_steps)  # S1: the mean over steps
        ce = {}  # each step's loss dict (cross-entropy or Smooth L1, with counts), kept for the metrics

        def loss_grad(k, z_k, s, grad_layout=None, out=None):  # the step's loss and its gradient at z_k
            # (closed form for tokens), the gradient in grad_layout (dtype, pad) if given, into out if given
            if self.cfg.candidate == "tokens":
                if out is not None:  # eager into recycled memory (CPU): a compiled one would allocate
                    ce[k], v = token_loss_grad(z_k, targets, self.cfg.pad_token_id, s * weight, out=out)
                    return ce[k]["loss"] * weight, v
                fn = compiled_token_loss_grad() if self.compile_grad else token_loss_grad
                ce[k], v = fn(z_k, targets, self.cfg.pad_token_id, s * weight, grad_layout)
                return ce[k]["loss"] * weight, v

            def loss(x):
                ce[k] = prediction_loss(x, targets, self.cfg)
                return ce[k]["loss"] * weight

            loss_k, v = autograd_loss_grad(loss, z_k, s)
            return loss_k, v if grad_layout is None else to_layout(v, *grad_layout)

        def on_step(k, z_k):  # the first step's loss is logged even when it is not trained on
            if k == 0 and k not in ce:
                with torch.no_grad():
                    if self.cfg.candidate == "tokens" and z_k.device.type == "cpu":  # no fresh (B, S, V)
                        # log-softmax: the closed-form loss into recycled memory (its gradient unused)
                        ce[0], g = token_loss_grad(z_k, targets, self.cfg.pad_token_id,
                                                   out=RECYCLER.take(z_k.shape, z_k.dtype, z_k.device))
                        RECYCLER.give(g)
                    elif self.cfg.candidate == "tokens" and self.compile_grad:  # one fused reduction
                        ce[0] = compiled_token_nll()(z_k, targets, self.cfg.pad_token_id)
                    else:
                        ce[0] = prediction_loss(z_k, targets, self.cfg)

        own_start = init is None  # drawn here (or concatenated with replayed rows): no caller holds it
        start = [z]  # handed over: nothing here keeps the (B, S, V) start alive through the unroll
        del z, init
        z_last, e_first, losses = unroll_backward(self, tokens, start, steps, self.training, e, loss_grad,
                                                  loss_steps, scale, method, on_step, recycle_start=own_start)
        last = {k: v.detach() for k, v in ce[n_steps - 1].items()}
        loss = torch.stack(losses).sum()
        out = self._finish(window, tokens, fresh, steps, loss, ce[0], last, z_last, e_first)
        RECYCLER.give(z_last)  # read by _finish only (the replay buffer copies it)
        return out
