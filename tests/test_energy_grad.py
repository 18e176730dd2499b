"""The written-out energy gradient (ebt.fast.written_out) is the energy's gradient, and its own gradient.

It must give autograd's dE/dy (first order) and autograd's d/dtheta <dE/dy, r> (the second-order term
training backpropagates), for both step-token variants, for the decoding contexts (offset, mask), for
both RoPE forms, compiled or not; thinking with it gives the same candidates; the training step frees
its starting candidate; autocast (bf16) keeps the update in float.
"""

import copy
import gc
import weakref

import pytest
import torch

import ebt.nn as ebt_nn
from ebt.fast.written_out import energy_grad
from ebt.errors import ConfigError
from ebt.fast.plan import resolve_plan
from ebt.fast.stepwise import Losses
from ebt.models.ebt import EBT
from ebt.nn import KVCache, Rope, vocab_in
from ebt.objective import train_step
from ebt.think import ThinkConfig, think

from test_speed_paths import grads_after, max_rel, tiny, window


def autograd_energy_grad(model, ctx, y):
    y = y.detach().requires_grad_()
    E = model.energy_from_embedding(ctx, y)
    (u,) = torch.autograd.grad(E.sum(), y, create_graph=True)
    return E, u


def embedded(model, B=3, S=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, S, model.cfg.vocab_size, dtype=torch.float64, generator=g)
    return vocab_in(torch.softmax(z, -1), model.vocab_to_embed.weight).detach()


def second_order(model, fn, ctx_fn, y, r):
    """d/dtheta <u, r> for every weight the energy reads."""
    weights = [p for p in model.parameters() if p.requires_grad and p is not model.alpha]
    _, u = fn(model, ctx_fn(), y)
    return torch.autograd.grad((u * r).sum(), weights, allow_unused=True)


@pytest.mark.parametrize("variant", ["time_embed", "default"])
def test_energy_and_gradient_equal_autograd(variant):
    model = tiny("s1", variant)
    x = window(model)[:, :-1]
    y = embedded(model)
    for k in range(2):  # both landscapes (different step tokens in time_embed)
        ctx = model.context(x, k)
        E_ref, u_ref = autograd_energy_grad(model, ctx, y)
        E, u = energy_grad(model, ctx, y)
        assert torch.allclose(E, E_ref, rtol=1e-12, atol=1e-12)
        assert torch.allclose(u, u_ref, rtol=1e-11, atol=1e-13)
    r = torch.randn_like(y)
    ref = second_order(model, autograd_energy_grad, lambda: model.context(x, 1), y, r)
    ours = second_order(model, lambda m, c, yy: energy_grad(m, c, yy), lambda: model.context(x, 1), y, r)
    for a, b in zip(ours, ref):
        assert (a is None) == (b is None)
        if b is not None:
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_real_rope_form_gives_the_same_gradient(monkeypatch):
    """Eager code rotates by complex multiplication, compiled code by cos/sin: both give one gradient."""
    model = tiny("s1")
    x = window(model)[:, :-1]
    ctx = model.context(x, 0)
    y = embedded(model)
    E, u = energy_grad(model, ctx, y)
    assert model.backbone.rope.tables(torch.arange(3), torch.float64).cis is not None  # complex so far
    tables = Rope.tables
    monkeypatch.setattr(Rope, "tables", lambda self, pos, dtype, real=None: tables(self, pos, dtype, real=True))
    E2, u2 = energy_grad(model, ctx, y)
    assert torch.allclose(E, E2, rtol=1e-12) and torch.allclose(u, u2, rtol=1e-11, atol=1e-13)


def test_decoding_context_with_offset_and_mask():
    """Generation scores the candidate of one position against a static KV cache (offset, mask)."""
    model = tiny("s2").eval()
    x = window(model)[:, :-1]
    prefix = 1
    full, _ = model.context(x, 0)
    C = full.k[0].shape[-2]
    pos = 5  # the candidate after x_0..x_5
    cache = KVCache(len(full.k))
    cache.k, cache.v = full.k, full.v
    allowed = torch.zeros(1, C, dtype=torch.bool)
    allowed[0, : prefix + pos + 1] = True
    ctx = (cache, prefix, pos, allowed)
    y = embedded(model, S=1)
    E_ref, u_ref = autograd_energy_grad(model, ctx, y)
    E, u = energy_grad(model, ctx, y)
    assert torch.allclose(E, E_ref, rtol=1e-12) and torch.allclose(u, u_ref, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("rec", ["s1", "s2"])
def test_thinking_with_the_written_out_gradient(rec):
    model = tiny(rec).eval()
    x = window(model)[:, :-1]
    z0 = model.init_candidate(x)
    # noise=0 explicit: S2's default is now its trained Langevin std (issue 19), drawn afresh by each run
    cfg = ThinkConfig(steps=3, candidates=1, accept_lower=True, trace=True, noise=0.0)
    a = think(model, x, cfg, init=z0, step=resolve_plan(model, explicit=False).think_step(model, cfg))
    b = think(model, x, cfg, init=z0, step=resolve_plan(model, explicit=True).think_step(model, cfg))
    assert torch.allclose(a.z, b.z, rtol=1e-10, atol=1e-12)
    assert torch.allclose(a.trace, b.trace, rtol=1e-10, atol=1e-12)


def test_explicit_needs_a_model_with_a_written_out_gradient(monkeypatch):
    model = tiny("s1")
    monkeypatch.delattr(EBT, "energy_grad")
    with pytest.raises(ConfigError, match="no written-out energy gradient"):
        train_step(model, window(model), plan=resolve_plan(model, grad="explicit"))


@pytest.mark.parametrize("method", ["double", "explicit", "jvp"])
def test_training_step_frees_its_starting_candidate(method):
    """The (B, S, V) start is not kept alive through the unroll (1.65 GB at the paper's xxs)."""
    model = tiny("s1")
    x = window(model)[:, :-1]
    z0 = model.init_candidate(x)
    ref = weakref.ref(z0.untyped_storage())  # the memory itself, not one tensor object over it
    seen = []

    def on_step(k, z):
        gc.collect()
        seen.append(ref() is None)

    def loss_grad(k, z, s, out=None):
        return z.sum() * 0, torch.zeros_like(z)

    stepwise = resolve_plan(model, grad=method).train_step(model, z0)
    start = [z0]
    del z0
    stepwise(model, x, start, 2, Losses(loss_grad, [0, 1]), on_step=on_step)
    assert start == [] and seen == [True, True]


def test_explicit_under_autocast_is_as_accurate_as_double_backward():
    """bf16 autocast (CPU here, CUDA in use): the candidate update stays in float32, and the weight
    gradients are as close to the float32 ones as double backward's are (bf16 rounding alone)."""
    model = tiny("s1").float()
    x = window(model)

    def grads(method, bf16):
        m = copy.deepcopy(model).train()
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = train_step(m, x, plan=resolve_plan(m, grad=method))
        assert out["ce_last"].dtype == torch.float32
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    ref = grads("double", False)
    err_double, err_explicit = max_rel(grads("double", True), ref), max_rel(grads("explicit", True), ref)
    assert max_rel(grads("explicit", False), ref) < 1e-4  # float32: the same gradients
    assert err_explicit < 1.3 * err_double, (err_explicit, err_double)


def test_written_out_context_stream_matches_the_backbone(monkeypatch):
    """context_kv (what a compiled plan's context is) gives the keys and values of EBT.context."""
    import ebt.fast.written_out as written_out
    from ebt.fast.written_out import context_kv

    model = tiny("s1")
    x = window(model)[:, :-1]
    for k in range(2):
        ref, prefix = model.context(x, k, first_order=True)
        h = torch.cat([model.step_emb.weight[k].expand(x.shape[0], 1, -1), model.tok_emb(x)], 1)
        out = context_kv(model, h, torch.arange(h.shape[1]))
        for a, b in zip(ref.k + ref.v, out.k + out.v):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    step = resolve_plan(model, compile=True).think_step(model)  # a compiled plan's contexts take it
    calls = []
    monkeypatch.setattr(written_out, "context_kv", lambda *a, **kw: calls.append(kw) or context_kv(*a))
    step.context(x, 0, first_order=True)
    step.context(x, 0)  # a graph for double backward: the module path
    assert calls == [{"compiled": True}]


def test_written_out_decoding_step_matches_the_backbone():
    """context_decode_step (a compiled model's static decoding step) writes the keys and values that
    Backbone.forward's decoding step writes, at a position tensor, attending under the valid mask."""
    from ebt.fast.written_out import context_decode_step
    from ebt.nn import KVCache

    model = tiny("s2", S=24)
    cfg = model.cfg
    shape = dict(batch=2, n_head=cfg.n_head, head_dim=cfg.head_dim, dtype=torch.float64)
    ref, out = KVCache(cfg.n_layer, 32, **shape), KVCache(cfg.n_layer, 32, **shape)
    h = torch.randn(2, 6, cfg.d_model, dtype=torch.float64)
    for cache in (ref, out):  # a prefill of 5 positions, then one decoding step at position 5
        model.backbone(h[:, :5], torch.arange(5), cache=cache, pos=0)
    pos = torch.tensor([5])
    valid = torch.arange(32) <= pos
    model.backbone(h[:, 5:], pos, cache=ref, pos=pos, mask=valid.view(1, 1, 1, -1), causal=False)
    context_decode_step(model, out, h[:, 5:], pos, valid)
    for a, b in zip(ref.k + ref.v, out.k + out.v):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


class CompileCalls:
    """The functions run through ebt.nn.compiled since made (or `clear`ed), by name (ebt.nn.COMPILE_CALLS)."""

    def __init__(self):
        self.clear()

    def clear(self):
        self.base = dict(ebt_nn.COMPILE_CALLS)

    def count(self, name: str) -> int:
        return ebt_nn.COMPILE_CALLS.get(name, 0) - self.base.get(name, 0)

    def __iter__(self):
        return iter([n for n in ebt_nn.COMPILE_CALLS if self.count(n) > 0])

    def __bool__(self):
        return any(True for _ in self)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_step_matches_eager(bf16):
    """torch.compile (inductor on CPU) of the written-out gradient, the loss gradient, the context
    stream and the (B, S, V) side of each step: the same weight gradients (float64; under bf16 autocast, as close to the
    eager step as the eager step is to float32). S2 runs first-order steps without a graph, the last
    step with one, and two batch shapes (the second call appends replayed rows)."""
    calls = CompileCalls()
    model = tiny("s2", replay_buffer=8)
    x = window(model)
    if bf16:
        model = model.float()
        ref, _ = grads_after(copy.deepcopy(model), x, "explicit")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        eager, out = grads_after(copy.deepcopy(model), x, "explicit")
        assert not calls
        compiled, out_c = grads_after(model, x, "explicit", compile=True)
    assert {"_energy_grad", "_context"} <= set(calls)
    # the (B, S, V) side is fused where the products read another layout (here: bf16); in float64 on CPU
    # it runs eagerly into recycled memory (ebt.fast.memory.Recycler), the loss gradient too
    # (the update and the loss gradient compiled as one function, ebt.objective.update_and_token_grad)
    assert ({"_probs_in", "update_and_token_grad"} <= set(calls)) == bf16
    assert "token_loss_grad" not in calls  # the loss gradient is not compiled on its own
    if bf16:
        assert max_rel(compiled, ref) < 1.5 * max_rel(eager, ref), (max_rel(compiled, ref), max_rel(eager, ref))
    else:
        assert max_rel(compiled, eager) < 1e-10
        assert float(out_c["loss"]) == pytest.approx(float(out["loss"]), rel=1e-10)


@pytest.mark.slow
def test_compiled_step_with_padded_layouts_matches():
    """What CUDA does, here: the compiled step's (B, S, V) tensors padded to an aligned width and the
    context's keys to a multiple of 8 (masked); the same gradients and loss as without (float64)."""
    calls = CompileCalls()
    model = tiny("s2", replay_buffer=8)  # V 97, context 1 + 12 keys: both get padded
    x = window(model)
    plain, out = grads_after(model, x, "explicit", compile=True, pad_vocab=False)
    padded, out_p = grads_after(model, x, "explicit", compile=True, pad_vocab=True)
    assert {"_probs_in", "update_and_token_grad"} <= set(calls)
    assert max_rel(padded, plain) < 1e-10
    assert float(out_p["loss"]) == pytest.approx(float(out["loss"]), rel=1e-10)


@pytest.mark.slow
def test_compiled_thinking_with_padded_layouts_matches():
    """Thinking through the compiled, fused step (padded layouts forced, as on CUDA) gives the eager
    thinking's candidates and energies: with and without a final score, several candidates, noise."""
    from ebt.generate import GenerateConfig, generate

    calls = CompileCalls()
    model = tiny("s2", replay_buffer=8).eval()  # the compiled training tests' shapes: fewer compilations
    x = window(model)[:, :-1]
    for cfg in (ThinkConfig(steps=3, score_final=False), ThinkConfig(steps=2, candidates=2, noise=0.1)):
        outs = []
        for compiled in (False, True):
            step = resolve_plan(model, compile=compiled, pad_vocab=True).think_step(model, cfg)
            torch.manual_seed(0)
            outs.append(think(model, x, cfg, step=step))
        ref, out = outs
        assert torch.allclose(out.z, ref.z, rtol=1e-9, atol=1e-9)
        assert torch.allclose(out.energy, ref.energy, rtol=1e-9, atol=1e-12)
        assert torch.allclose(out.initial_energy, ref.initial_energy, rtol=1e-9, atol=1e-12)
        assert out.passes == ref.passes and torch.equal(out.steps_used, ref.steps_used)
    assert {"_probs_in", "mapped_update", "_context"} <= set(calls)
    calls.clear()
    prompts, gen = [[1, 2, 3], [4, 5, 6, 7, 8]], dict(max_new_tokens=5, think=ThinkConfig(steps=2, score_final=False))
    a = generate(model, prompts, GenerateConfig(**gen), plan=resolve_plan(model, pad_vocab=True))
    plan = resolve_plan(model, compile=True, cuda_graph=True, pad_vocab=True)
    assert generate(model, prompts, GenerateConfig(**gen, cuda_graph=True, compile=True), plan=plan) == a
    assert calls.count("_token") >= 5  # the static step: each token one compiled function (ebt.fast.decode)


@pytest.mark.slow
def test_compiled_generation_chooses_the_same_tokens():
    """GenerateConfig(compile=True): decoding thinks through the compiled written-out gradient, with
    static shapes (cuda_graph; eager here on CPU) and with a growing cache; same greedy tokens."""
    from ebt.generate import GenerateConfig, generate

    calls = CompileCalls()
    model = tiny("s2", replay_buffer=8).eval()  # the shapes of the tests above: fewer compilations
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    cfg = dict(max_new_tokens=6, think=ThinkConfig(steps=2, score_final=False))
    a, la = generate(model, prompts, GenerateConfig(**cfg), return_logits=True)
    assert not calls
    for static in (True, False):
        b, lb = generate(model, prompts, GenerateConfig(**cfg, cuda_graph=static, compile=True), return_logits=True)
        assert a == b and torch.allclose(la, lb, rtol=1e-9, atol=1e-9), static
        if static:  # every token one compiled function (ebt.fast.decode), its thinking steps inside
            assert calls.count("_token") >= 6
        else:  # every token's thinking steps went through it
            assert calls.count("_energy_grad") >= 6 * 2
        calls.clear()
    assert not {"compile_grad", "explicit_grad"} & set(vars(model))  # the model carries no path flags


def test_inference_default_is_written_out_on_cpu_and_autograd_on_cuda():
    """explicit None (auto): the written-out gradient on CPU (the faster there) or when compiled,
    autograd on CUDA eager; the official algorithm always takes autograd."""
    from ebt.compat.official_algorithm import OfficialAlgorithmEBT
    from ebt.fast.plan import explicit_for
    from ebt.think import ContextCache

    model = tiny("s2").eval()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert explicit_for(model, cpu) and not explicit_for(model, cuda)
    assert explicit_for(model, cuda, compiled=True)
    assert not explicit_for(OfficialAlgorithmEBT.from_model(model), cpu)
    assert not resolve_plan(OfficialAlgorithmEBT.from_model(model), cpu, compile=True).explicit
    x = window(model)[:, :-1]
    calls, real = [], model.energy_grad
    model.energy_grad = lambda ctx, p, **kw: calls.append(1) or real(ctx, p, **kw)
    step = resolve_plan(model).think_step(model)  # the plan's default, on this (CPU) device
    step.grad(ContextCache(model, x).get_ctx(0, False), model.init_candidate(x))
    assert calls == [1]  # on CPU the default took the written-out gradient


@pytest.mark.parametrize("rec", ["s1", "s2"])
def test_each_training_method_takes_the_gradient_it_names(rec):
    """Only "explicit" uses the written-out gradient; "double", "jvp" and "full" stay with autograd,
    whatever the inference default on this device."""
    model = tiny(rec, replay_buffer=8 if rec == "s2" else 0).train()
    x = window(model)
    calls = []
    real, real_y = model.energy_grad, model.energy_grad_embedding
    model.energy_grad = lambda ctx, p, **kw: calls.append(1) or real(ctx, p, **kw)
    model.energy_grad_embedding = lambda ctx, y, **kw: calls.append(1) or real_y(ctx, y, **kw)
    for method in ("double", "jvp", "full", "explicit"):
        calls.clear()
        # no logging pass (the energy gap): it is inference (the device default)
        train_step(model, x, plan=resolve_plan(model, grad=method, energy_gap=False))
        assert bool(calls) == (method == "explicit"), method
