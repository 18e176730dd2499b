"""Static-shape decoding's token step as one function: the new position written into every landscape's
context cache, then the whole think of that position (noise, softmax, the candidate map, the energy
gradient written out over the cached context, the update), step after step.

Why: decoding one position is bound by its number of kernels, not its arithmetic. The reference path
(ebt.think with a fast step) runs each piece as its own call and lays the vocabulary map and the stacked
block weights out again on every step; here they are laid out once per decoder (`TokenWeights`) and
the token is one function, which torch.compile fuses across the steps and the context write. Random
draws (the start, the Langevin noise) are made outside it by `draws`, in the reference loop's order, so
the numbers are those of ebt.think to rounding (tested in float64). Chosen once, by `token_step_ok`
(ebt.generate's static decoder); the layout of the candidate map follows ebt.nn.vocab_layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ebt.fast.plan import has_linear_map
from ebt.fast.written_out import _context, _energy_grad, _weights
from ebt.nn import compiled as compile_fn
from ebt.nn import compute_dtype, stacked, to_layout, vocab_layout
from ebt.rand import randn_
from ebt.recipe import inference_schedule


def token_step_ok(model, think_cfg) -> bool:
    """Whether `token_step` serves: one candidate that takes every step (no acceptance, no adaptive
    stop; the decoder reads only the final candidate, so scoring and traces change nothing), and a
    candidate that enters through a bias-free linear map (the vocabulary side in closed form)."""
    return think_cfg.candidates == 1 and not think_cfg.masked and has_linear_map(model)


class TokenWeights:
    """The weights a token step reads, laid out once: each block's maps stacked, the candidate map in
    the products' layout (ebt.nn.vocab_layout: autocast's dtype, an aligned width). `refresh` copies
    new values into the same tensors (a captured graph holds their addresses). The cost: a copy of each
    block's query/key/value and feed-forward input maps (and of the candidate map where its layout
    differs) lives as long as the decoder (ebt.generate.release_static_decoder frees it). Laid out at
    the first `refresh` (the decoder's first reset)."""

    def __init__(self, model, pad=None):
        w = model.vocab_to_embed.weight
        self.dtype, self.width = vocab_layout(torch.empty(0, w.shape[1], dtype=w.dtype, device=w.device), pad)
        self.blocks, self.norm, self.head, self.map = None, None, None, None

    @torch.no_grad()
    def refresh(self, model) -> None:
        blocks, norm, head = _weights(model)
        W = model.vocab_to_embed.weight.detach()
        if self.map is None:
            self.blocks, self.norm, self.head = [stacked(b) for b in blocks], norm, head
            self.map = to_layout(W, self.dtype, self.width)  # W itself where the layout is its own
            return
        for old, new in zip(self.blocks, blocks):  # into the same tensors, no temporaries
            torch.cat(new.qkv, out=old.qkv[0])
            torch.cat(new.w13, out=old.w13[0])
        if self.map.data_ptr() != W.data_ptr():  # a copy in another layout (else W itself)
            self.map[:, : W.shape[1]].copy_(W)  # the padding columns stay zero


def draws(model, tok: torch.Tensor, n_steps: int, noise: float) -> tuple[torch.Tensor, list]:
    """(the start, the noise before each step): drawn as ebt.think draws them (the start first, then one
    N(0, 1) tensor per step when noise > 0)."""
    z = model.init_candidate(tok)
    return z, [randn_(torch.empty_like(z)) for _ in range(n_steps)] if noise > 0 else []


@torch.no_grad()
def token_step(model, tw: TokenWeights, caches: list, keys: list, prefix: int, tok, pos, think_cfg,
               compiled: bool = False) -> torch.Tensor:
    """Next-token logits (B, V) for tokens tok (B, 1) at index pos (a (1,) tensor): their keys and values
    written into `caches` (one KVCache per landscape key, `keys` in the same order) at pos + prefix, then
    think_cfg's thinking (ebt.think's official schedule, step size and noise) on that position alone.
    The caches' length must be a multiple of 8 (the decoder allocates them so)."""
    cfg, e = model.cfg, model.cfg.ebt
    schedule = inference_schedule(e, think_cfg.steps, think_cfg.final_landscape)
    noise = e.langevin if think_cfg.noise is None else think_cfg.noise
    h = model.tok_emb(tok)
    dt = compute_dtype(h.dtype)
    if think_cfg.alpha is None:
        alpha = model.step_alpha((1,), False) * think_cfg.alpha_factor
    else:  # a fill, as ebt.think.update's: no host-to-device copy (a captured graph allows none)
        alpha = torch.full((), think_cfg.alpha * think_cfg.alpha_factor, dtype=dt, device=tok.device)
    cpos = pos + prefix
    valid = torch.arange(caches[0].k[0].shape[2], device=tok.device) <= cpos  # written context positions
    rope = model.backbone.rope.tables
    ropes = (rope(cpos, dt, real=compiled), rope(cpos + 1, dt, real=compiled))
    z, noises = draws(model, tok, len(schedule), noise)
    order = tuple(keys.index(model.landscape_key(k)) for k in schedule)
    fn = compile_fn(_token) if compiled else _token
    return fn(tw.blocks, tw.norm, tw.head, tw.map, tw.dtype, tw.width, cfg.n_head, cfg.norm_eps, h,
              [(c.k, c.v) for c in caches], cpos, valid, ropes, z, noises, noise, alpha, order,
              model.candidate_softmax)


def _token(blocks, norm, head, W, dt, width, n_head, eps, h, caches, pos, valid, ropes, z, noises, noise,
           alpha, order, softmax: bool):
    """The token step's maths (see `token_step`); order: each step's cache index."""
    for ks, vs in caches:
        _context(blocks, n_head, eps, h, ropes[0], (ks, vs, pos, valid.view(1, 1, 1, -1)))
    allowed = valid.view(1, -1)
    for k, c in enumerate(order):
        if noises:  # Langevin noise before every step
            z = torch.add(z, noises[k], alpha=noise)
        p = torch.softmax(z, -1) if softmax else z
        y = F.linear(to_layout(p, dt, width), W)
        _, u = _energy_grad(blocks, norm, head, n_head, eps, y, ropes[1], caches[c][0], caches[c][1], allowed)
        z = p - alpha * F.linear(u, W.t())[..., : z.shape[-1]].to(p.dtype)
    return z[:, -1]
