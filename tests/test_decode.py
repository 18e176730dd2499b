"""Static decoding's token step as one function (ebt.fast.decode) against the reference thinking loop, in
float64: the same tokens and logits for S1 and S2, with noise, other step sizes and schedules, a padded
vocabulary layout; its weights laid out once and refreshed in place; the fallback where it does not serve."""

import pytest
import torch

from ebt.config import ModelConfig, recipe
from ebt.fast.plan import resolve_plan
from ebt.generate import _STATIC, GenerateConfig, generate, release_static_decoder
from ebt.models import build_model
from ebt.think import ThinkConfig

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8]]


def tiny(rec, vocab=97, S=24):
    torch.manual_seed(0)
    cfg = ModelConfig(model="ebt", size="4xs", n_layer=2, d_model=32, n_head=4, vocab_size=vocab,
                      context_length=S, ebt=recipe(rec))
    return build_model(cfg).double().eval()


def reference_and_token_fn(model, think_cfg, new=8, **plan_options):
    """(tokens, logits) of decoding with a growing cache and the reference step (dE/dp by autograd), and
    of static decoding through the token function; the decoder that served the second."""
    cfg = dict(max_new_tokens=new, think=think_cfg)
    ref = generate(model, PROMPTS, GenerateConfig(**cfg), return_logits=True,
                   plan=resolve_plan(model, explicit=False))
    plan = resolve_plan(model, cuda_graph=True, **plan_options)
    out = generate(model, PROMPTS, GenerateConfig(**cfg, cuda_graph=True), return_logits=True, plan=plan)
    dec = _STATIC[model][1]
    release_static_decoder(model)
    return ref, out, dec


@pytest.mark.parametrize("rec,think_cfg", [
    ("s1", None),  # the official default: one step per landscape, two landscapes
    ("s1", ThinkConfig(steps=2, final_landscape=True, alpha_factor=0.5)),
    ("s2", None),  # two steps with the trained Langevin noise
    ("s2", ThinkConfig(steps=3, alpha=2.0, noise=0.5, score_final=True)),
])
@pytest.mark.parametrize("pad", [False, True])
def test_token_function_matches_the_reference_loop(rec, think_cfg, pad):
    model = tiny(rec)
    (a, la), (b, lb), dec = reference_and_token_fn(model, think_cfg, pad_vocab=pad)
    assert dec.token_weights is not None  # the token function served
    assert dec.token_weights.width == (31 if pad else 0)  # 97 padded to 128 when asked
    assert a == b
    assert torch.allclose(la, lb, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("think_cfg", [ThinkConfig(candidates=2), ThinkConfig(tol=1e-3, steps=3),
                                       ThinkConfig(accept_lower=True)])
def test_thinking_the_token_function_does_not_serve_falls_back(think_cfg):
    model = tiny("s2")
    (a, la), (b, lb), dec = reference_and_token_fn(model, think_cfg)
    assert dec.token_weights is None
    assert a == b and torch.allclose(la, lb, rtol=1e-9, atol=1e-9)


def test_plan_can_turn_the_token_function_off():
    model = tiny("s2")
    (a, la), (b, lb), dec = reference_and_token_fn(model, None, token_fn=False)
    assert dec.token_weights is None
    assert a == b and torch.allclose(la, lb, rtol=1e-9, atol=1e-9)


def test_token_weights_are_laid_out_once_and_refreshed_in_place():
    """A kept decoder (and on CUDA its captured graph) reads the stacked maps and the laid-out candidate
    map at fixed addresses: a new call copies the weights' new values into them, and decodes as the
    reference loop does with the new weights."""
    model = tiny("s2")
    plan = resolve_plan(model, cuda_graph=True, pad_vocab=True)
    cfg = dict(max_new_tokens=6, think=ThinkConfig(steps=2, noise=0.0))
    generate(model, PROMPTS, GenerateConfig(**cfg, cuda_graph=True), plan=plan)
    dec = _STATIC[model][1]
    tw = dec.token_weights

    def ptrs():
        return [tw.map.data_ptr()] + [t.data_ptr() for b in tw.blocks for t in (b.qkv[0], b.w13[0])]

    before = ptrs()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    b, lb = generate(model, PROMPTS, GenerateConfig(**cfg, cuda_graph=True), return_logits=True, plan=plan)
    assert _STATIC[model][1] is dec and ptrs() == before  # the same decoder, the same tensors
    W = model.vocab_to_embed.weight
    assert torch.equal(tw.map[:, :97], W) and not tw.map[:, 97:].any()
    for blk, w in zip(model.backbone.blocks, tw.blocks):
        a, f = blk.attn, blk.ffn
        assert torch.equal(w.qkv[0], torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]))
        assert torch.equal(w.w13[0], torch.cat([f.w1.weight, f.w3.weight]))
    a, la = generate(model, PROMPTS, GenerateConfig(**cfg), return_logits=True,
                     plan=resolve_plan(model, explicit=False))
    assert a == b and torch.allclose(la, lb, rtol=1e-9, atol=1e-9)
    release_static_decoder(model)


def test_token_function_under_autocast_matches_the_per_step_path():
    """Under bf16 autocast the candidate map is a bf16 copy, padded here: the token function decodes as
    the per-step path does (the same products in the same dtypes). After a weight change (outside the
    autocast region: autocast keeps its casts of the parameters until the region ends) the kept decoder
    copies the new weights into that bf16 map and decodes as a decoder built afresh."""
    model = tiny("s2").float()
    cfg = GenerateConfig(max_new_tokens=6, think=ThinkConfig(steps=2, noise=0.0, alpha=0.3), cuda_graph=True)
    plans = {t: resolve_plan(model, cuda_graph=True, pad_vocab=True, token_fn=t) for t in (False, True)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, la = generate(model, PROMPTS, cfg, return_logits=True, plan=plans[False])
        b, lb = generate(model, PROMPTS, cfg, return_logits=True, plan=plans[True])
    assert a == b and torch.allclose(la.float(), lb.float(), rtol=1e-5, atol=1e-5)
    dec = _STATIC[model][1]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = generate(model, PROMPTS, cfg, return_logits=True, plan=plans[True])
    tw = _STATIC[model][1].token_weights
    assert _STATIC[model][1] is dec and tw.map.dtype == torch.bfloat16 and tw.width == 31
    assert torch.equal(tw.map[:, :97], model.vocab_to_embed.weight.to(torch.bfloat16))
    release_static_decoder(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = generate(model, PROMPTS, cfg, return_logits=True, plan=plans[True])
    assert kept[0] == fresh[0] and torch.equal(kept[1], fresh[1])
    release_static_decoder(model)
