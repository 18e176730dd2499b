"""Text generation for the Transformer++ and the EBT, with a static KV cache (gpt-fast style).

The prefix is processed once; each new token costs one position through the model. For an EBT the
context stream never depends on candidates, so it is cached per landscape (one cache for "default",
one per learned step token for "time_embed"), and each new token thinks only about the last position:
its candidate attends to the cached context keys/values and to itself.

Prompts of different lengths share positions: every row's tokens sit at 0, 1, 2, ... with no padding.
The batch is prefilled up to the shortest prompt; after that, rows still inside their prompt are fed
their own next prompt token ("forced") while the others take the model's choice.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ebt.fast.written_out import context_decode_step
from ebt.config import bounded, check_bounds
from ebt.errors import ConfigError
from ebt.fast.cuda_graph import capture_cuda_graph
from ebt.fast.decode import TokenWeights, token_step, token_step_ok
from ebt.fast.plan import Plan, resolve_plan
from ebt.nn import KVCache
from ebt.think import ThinkConfig, think


@dataclass
class GenerateConfig:
    max_new_tokens: int = bounded(64, int, 1)
    temperature: float = bounded(0.0, float, 0)  # 0: greedy
    top_p: float = bounded(1.0, float, 0, 1, lo_open=True)
    seed: int = bounded(0, int, 0)
    eos_id: int | None = None  # a row stops (its output is cut) at this token
    cuda_graph: bool = False  # EBT: decode with static shapes, the one-token step captured as a CUDA graph
    # (on CUDA; elsewhere the same static-shape step runs eagerly)
    # EBT thinking per token (None: the official inference default, `inference_steps` per landscape with the
    # trained Langevin std, final pass not scored)
    think: ThinkConfig | None = None
    compile: bool = False  # EBT: think through the written-out energy gradient under torch.compile
    # (ebt/fast/written_out.py); with cuda_graph every decode step has one shape, so it compiles once

    def __post_init__(self):
        check_bounds(self)


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class _Contexts:
    """Per-landscape static context caches of an EBT, viewed up to the current length."""

    def __init__(self, model, caches: dict, prefix: int):
        self.model, self.caches, self.prefix, self.length = model, caches, prefix, 0

    def get_ctx(self, k, graph):
        cache = self.caches[self.model.landscape_key(k)]
        return cache.view(self.prefix + self.length), self.prefix, self.length - 1


class _StaticContexts:
    """The same caches for static-shape decoding: whole buffers, the new token's index as a tensor,
    and the mask of written positions (nothing depends on Python integers that change per token)."""

    def __init__(self, model, caches: dict, prefix: int, offset: torch.Tensor, allowed: torch.Tensor):
        self.model, self.caches, self.prefix = model, caches, prefix
        self.offset, self.allowed = offset, allowed

    def get_ctx(self, k, graph):
        return self.caches[self.model.landscape_key(k)], self.prefix, self.offset, self.allowed


class Decoder:
    """One decoding state: feed tokens one position at a time, get next-token logits for the last one.

    cuda_graph (EBT): after the prefill, each one-token step (context keys/values written at a position
    tensor, attention over the whole cache under a mask, the thinking steps) has static shapes; on CUDA
    it is captured once as a CUDA graph and replayed, which removes the per-kernel launch cost that
    dominates small-batch decoding."""

    def __init__(self, model, batch: int, max_len: int, think_cfg: ThinkConfig | None, plan: Plan):
        self.model, self.is_ebt, self.plan = model, hasattr(model, "energy_from"), plan
        self.static = Decoder.is_static(model, plan.cuda_graph)
        self.graph = None
        w = model.tok_emb.weight
        cfg = model.cfg
        self.think_cfg = think_cfg or ThinkConfig(score_final=False)
        self.step = plan.think_step(model, self.think_cfg) if self.is_ebt else None
        # static decoding with the written-out gradient: each token one function (ebt.fast.decode)
        one = self.static and plan.explicit and plan.token_fn and token_step_ok(model, self.think_cfg)
        self.token_weights = TokenWeights(model, plan.pad_vocab) if one else None
        shape = dict(batch=batch, n_head=cfg.n_head, head_dim=cfg.head_dim, device=w.device, dtype=w.dtype)
        if self.is_ebt:
            self.prefix = 1 if model.step_emb is not None else 0
            keys = sorted({model.landscape_key(k) for k in range(cfg.ebt.landscapes)})
            # room for a multiple of 8 positions: the static step attends over the whole buffer (under
            # a mask), whose length then needs no padding for aligned products (ebt.fast.written_out). Static
            # decoding takes the whole context, so one decoder (and its graph) serves every later call
            max_len = cfg.context_length if self.static else max_len
            length = -(-(max_len + self.prefix) // 8) * 8
            caches = {k: KVCache(cfg.n_layer, length, **shape) for k in keys}
            self.ctx = _Contexts(model, caches, self.prefix)
        else:
            self.cache = KVCache(cfg.n_layer, max_len, **shape)
        self.reset()

    @staticmethod
    def is_static(model, cuda_graph: bool) -> bool:
        """Whether decoding runs the static-shape step (an EBT asked for a CUDA graph)."""
        return bool(cuda_graph) and hasattr(model, "energy_from")

    def attach(self, model) -> None:
        """Point a kept decoder at its model again (`detach` drops the reference between calls, so the
        model can be freed while the module-level store keeps its decoder only weakly keyed)."""
        self.model = self.ctx.model = model
        self.step = self.plan.think_step(model, self.think_cfg)

    def detach(self) -> None:
        self.model = self.ctx.model = self.step = None

    def reset(self) -> None:
        """Start a new sequence: nothing written yet. What earlier sequences left in the caches is never
        read (the views and the static step's mask cover written positions only); the step tokens'
        keys and values are written anew, as the weights may have changed since."""
        self.length = 0
        if self.is_ebt:
            self.ctx.length = 0
            m = self.model
            if self.token_weights is not None:
                self.token_weights.refresh(m)
            for k, cache in (self.ctx.caches.items() if self.prefix else ()):  # position 0 of each stream
                h = m.step_emb.weight[k].expand(cache.k[0].shape[0], 1, -1)
                m.backbone(h, torch.zeros(1, dtype=torch.long, device=h.device), cache=cache, pos=0)

    def _static_step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token (B, 1) at index `pos` (a (1,) tensor): static shapes only, no host synchronisation."""
        m = self.model
        if self.token_weights is not None:
            caches = self.ctx.caches
            return token_step(m, self.token_weights, list(caches.values()), list(caches), self.prefix, tok,
                              pos, self.think_cfg, self.plan.compiled)
        cache = next(iter(self.ctx.caches.values()))
        cpos = pos + self.prefix
        valid = torch.arange(cache.k[0].shape[2], device=tok.device) <= cpos  # written context positions
        for c in self.ctx.caches.values():
            if self.plan.compiled:  # written out and compiled: a few kernels instead of hundreds
                context_decode_step(m, c, m.tok_emb(tok), cpos, valid, compiled=True)
            else:
                m.backbone(m.tok_emb(tok), cpos, cache=c, pos=cpos, mask=valid.view(1, 1, 1, -1),
                           causal=False)
        ctx = _StaticContexts(m, self.ctx.caches, self.prefix, pos, valid.view(1, -1))
        return think(m, tok, self.think_cfg, contexts=ctx, step=self.step).z[:, -1]

    def _feed_static(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.device.type != "cuda":
            out = self._static_step(tokens, torch.tensor([self.length], device=tokens.device))
        else:
            if self.graph is None:
                self._capture(tokens)
            self.static_tok.copy_(tokens)
            self.static_pos.fill_(self.length)
            self.graph.replay()
            out = self.static_out.clone()
        self.length += 1
        self.ctx.length = self.length
        return out

    def _capture(self, tokens: torch.Tensor) -> None:
        self.static_tok = tokens.clone()
        self.static_pos = torch.tensor([self.length], device=tokens.device)
        # the warm-up calls write this token's keys/values at this position, as the replay will
        self.graph, self.static_out = capture_cuda_graph(
            lambda: self._static_step(self.static_tok, self.static_pos))

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens (B, T) at positions length..length+T-1; return logits (B, V) for the last one."""
        m, T = self.model, tokens.shape[1]
        dev = tokens.device
        if self.static and T == 1 and self.length > 0:
            return self._feed_static(tokens)
        if not self.is_ebt:
            pos = torch.arange(self.length, self.length + T, device=dev)
            h = m.backbone(m.tok_emb(tokens), pos, cache=self.cache, pos=self.length)
            self.length += T
            return m.head(h[:, -1])
        pos = torch.arange(self.length, self.length + T, device=dev) + self.prefix
        for cache in self.ctx.caches.values():  # each landscape's stream differs through its step token
            m.backbone(m.tok_emb(tokens), pos, cache=cache, pos=self.length + self.prefix)
        self.length += T
        self.ctx.length = self.length
        out = think(m, tokens[:, -1:], self.think_cfg, contexts=self.ctx, step=self.step)
        return out.z[:, -1]


def _prepare(model, prompts: list[list[int]], cfg: GenerateConfig):
    """Check the request; lay prompts out at positions 0, 1, 2, ... (no padding)."""
    if not prompts:
        raise ConfigError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("an empty prompt: give every prompt at least one token (for example a newline)")
    lens = [len(p) for p in prompts]
    total = max(lens) + cfg.max_new_tokens
    if total > model.cfg.context_length:
        raise ConfigError(f"prompt ({max(lens)} tokens) + max_new_tokens ({cfg.max_new_tokens}) = {total} "
                          f"exceeds the model's context_length {model.cfg.context_length}: shorten the "
                          f"prompt or ask for fewer tokens")
    dev = model.tok_emb.weight.device
    seq = torch.zeros(len(prompts), total, dtype=torch.long, device=dev)
    is_prompt = torch.zeros(len(prompts), total, dtype=torch.bool, device=dev)
    for b, p in enumerate(prompts):
        seq[b, :len(p)] = torch.tensor(p, device=dev)
        is_prompt[b, :len(p)] = True
    return seq, is_prompt, lens


def _decode(model, prompts, cfg: GenerateConfig, next_logits, return_logits: bool):
    """The decoding loop shared by the cached and the uncached path: next_logits(seq, t) gives the
    logits (B, V) for position t given seq[:, :t]. Random starts and sampling are seeded by cfg.seed
    without touching the caller's random stream."""
    from ebt.runtime import seeded

    seq, is_prompt, lens = _prepare(model, prompts, cfg)
    dev = seq.device
    was_training = model.training
    model.eval()
    kept = []
    with seeded(cfg.seed, dev):
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        for t in range(min(lens), seq.shape[1]):
            logits = next_logits(seq, t)
            choice = sample(logits, cfg.temperature, cfg.top_p, gen)
            seq[:, t] = torch.where(is_prompt[:, t], seq[:, t], choice)
            if return_logits:
                kept.append(logits)
    model.train(was_training)
    out = []
    for b, n in enumerate(lens):
        new = seq[b, n:n + cfg.max_new_tokens].tolist()
        if cfg.eos_id is not None and cfg.eos_id in new:
            new = new[:new.index(cfg.eos_id) + 1]
        out.append(new)
    return (out, torch.stack(kept, 1)) if return_logits else out


@torch.no_grad()
def generate(model, prompts: list[list[int]], cfg: GenerateConfig | None = None, return_logits: bool = False,
             plan: Plan | None = None):
    """Continue each prompt (a list of token ids) by up to cfg.max_new_tokens tokens, with the KV cache.

    Returns a list of new-token lists (and, with return_logits, the (B, steps, V) logits used). plan:
    how an EBT thinks (ebt.fast.plan; None: resolved from cfg.compile and cfg.cuda_graph)."""
    cfg = cfg or GenerateConfig()
    plan = plan or resolve_plan(model, compile=cfg.compile, cuda_graph=cfg.cuda_graph)
    state = {}

    def next_logits(seq, t):
        if "dec" not in state:  # prefill: the common part of the prompts at once
            state["dec"] = _decoder(model, seq.shape[0], seq.shape[1], cfg, plan)
            return state["dec"].feed(seq[:, :t])
        return state["dec"].feed(seq[:, t - 1:t])

    try:
        return _decode(model, prompts, cfg, next_logits, return_logits)
    finally:
        if state.get("dec") is not None and state["dec"].static:
            state["dec"].detach()  # kept in _STATIC, weakly keyed by the model: no reference back to it


_STATIC = weakref.WeakKeyDictionary()  # model -> (what its static decoder was built for, the decoder)


def _decoder(model, batch: int, max_len: int, cfg: GenerateConfig, plan: Plan) -> Decoder:
    """A decoder for one generate call. A static one (cuda_graph, EBT) is kept with the model and reset
    for the next call with the same batch, thinking, precision and weights' storage, so its CUDA graph
    is captured once, not per call (as torch.compile compiles once). One is kept per model; it holds
    the KV caches and the graph's memory (small next to the weights; `release_static_decoder` frees it)."""
    if not Decoder.is_static(model, plan.cuda_graph):
        return Decoder(model, batch, max_len, cfg.think, plan)
    dev = model.tok_emb.weight.device
    key = (batch, repr(cfg.think), plan, torch.is_autocast_enabled(dev.type),
           torch.get_autocast_dtype(dev.type),
           tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters()))
    kept = _STATIC.get(model)
    if kept is not None and kept[0] == key:
        dec = kept[1]
        dec.attach(model)
        dec.reset()
        return dec
    _STATIC.pop(model, None)  # the old graph's memory goes before the new one is captured
    dec = Decoder(model, batch, max_len, cfg.think, plan)
    _STATIC[model] = (key, dec)
    return dec


def release_static_decoder(model) -> None:
    """Free the static decoder (KV caches, CUDA graph) kept with `model` by generate(cuda_graph=True)."""
    _STATIC.pop(model, None)


@torch.no_grad()
def generate_uncached(model, prompts: list[list[int]], cfg: GenerateConfig | None = None,
                      return_logits: bool = False):
    """The same decoding, re-running the whole prefix for every token (what the official code does).
    For tests and benchmarks: it must choose the same greedy tokens as `generate` without Langevin noise
    (noise=0); with noise the two draw it in other shapes, so other numbers."""
    cfg = cfg or GenerateConfig()
    is_ebt = hasattr(model, "energy_from")
    think_cfg = cfg.think or ThinkConfig(score_final=False)
    step = resolve_plan(model).think_step(model, think_cfg) if is_ebt else None

    def next_logits(seq, t):
        ctx = seq[:, :t]
        if not is_ebt:
            return model.logits(ctx)[:, -1]
        # the last position's start is drawn exactly as the cached decoder draws it; the other
        # positions' candidates cannot influence it (no leakage), so any start does for them
        z_last = model.init_candidate(ctx[:, -1:])
        init = torch.cat([z_last.new_zeros(ctx.shape[0], t - 1, z_last.shape[-1]), z_last], 1)
        return think(model, ctx, think_cfg, init=init, step=step).z[:, -1]

    return _decode(model, prompts, cfg, next_logits, return_logits)
