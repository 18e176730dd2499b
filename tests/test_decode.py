"""Static decoding's token step as one function (ebt.fast.decode) against the reference thinking loop, in
float64: the same tokens and logits for S1 and S2, with noise, other step sizes and schedules, a padded
vocabulary layout; its weights laid out once and refreshed in place; the fallback where it does not serve."""

import pytest
import torch

from ebt.config import ModelConfig, recipe
from ebt.fast.plan import resolve_plan
from ebt.generate import _STATIC, Decoder, GenerateConfig, generate, release_static_decoder
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
    map at fixed addresses: a new call copies the weights' new values into them."""
    model = tiny("s2")
    plan = resolve_plan(model, cuda_graph=True, pad_vocab=True)
    dec = Decoder(model, 2, 24, None, plan)
    tw = dec.token_weights
    ptrs = [tw.map.data_ptr()] + [t.data_ptr() for b in tw.blocks for t in (b.qkv[0], b.w13[0])]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    dec.reset()
    assert [tw.map.data_ptr()] + [t.data_ptr() for b in tw.blocks for t in (b.qkv[0], b.w13[0])] == ptrs
    W = model.vocab_to_embed.weight
    assert torch.equal(tw.map[:, :97], W) and not tw.map[:, 97:].any()
    a = model.backbone.blocks[0].attn
    assert torch.equal(tw.blocks[0].qkv[0], torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]))
