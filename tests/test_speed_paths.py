"""The fast paths compute exactly what the straightforward ones do (float64), and keep memory bounded.

- ebt.objective.train_step with "double", "jvp" and "explicit" (one unroll step's graph at a time) against "full" (the whole
  unroll's graph), for S1, S1 "default", S2 (random steps, alpha, Langevin noise, replay), and frames;
- the official algorithm (ebt.compat.official_algorithm: doubled sequence, explicit mask) against ours;
- closed-form cross-entropy gradient, vocabulary padding, static-shape decoding, autocast caching.
"""

import copy
import gc
import weakref
from functools import partial

import pytest
import torch

import ebt.nn as ebt_nn
from ebt.compat.official import check_reference
from ebt.compat.official_algorithm import OfficialAlgorithmEBT, doubled_mask
from ebt.config import ModelConfig, recipe
from ebt.errors import ConfigError
from ebt.fast.cuda_graph import CapturedStep
from ebt.fast.memory import Recycler
from ebt.fast.plan import resolve_plan
from ebt.models import build_model
from ebt.models.transformer import token_loss, token_loss_grad, token_loss_grad_pointwise
from ebt.objective import train_step
from ebt.rand import randn_
from ebt.think import ContextCache, ThinkConfig, energy_and_grad, think


def tiny(rec="s1", variant=None, candidate="tokens", vocab=97, S=12, **ebt_kw):
    torch.manual_seed(0)
    e = recipe(rec, **ebt_kw)
    if variant:
        e.variant = variant
    kw = dict(feature_dim=6) if candidate == "frames" else {}
    cfg = ModelConfig(model="ebt", size="4xs", n_layer=2, d_model=32, n_head=4, vocab_size=vocab, context_length=S,
                      candidate=candidate, ebt=e, **kw)
    return build_model(cfg).double()


def window(model, B=3):
    cfg = model.cfg
    if cfg.candidate == "frames":
        return torch.randn(B, cfg.context_length + 1, cfg.feature_dim, dtype=torch.float64)
    return torch.randint(0, cfg.vocab_size, (B, cfg.context_length + 1))


def grads_after(model, x, method, calls=2, official=False, **plan_options):
    """Gradients of the last of `calls` training steps (the second one replays rows in S2), each taken
    with `method` (a plan's grad; plan_options: its other fields, ebt.fast.plan.resolve_plan)."""
    m = OfficialAlgorithmEBT.from_model(model) if official else copy.deepcopy(model)
    m.train()
    plan = resolve_plan(m, grad=method, **plan_options)
    for c in range(calls):
        torch.manual_seed(10 + c)  # the same random draws (steps, alpha, noise, replay) for every method
        m.zero_grad(set_to_none=True)
        out = train_step(m, x, plan=plan)
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, out


def max_rel(a, b):
    """The largest relative difference over named tensors; NaN anywhere counts as infinite (Python's max
    would skip a NaN that is not first)."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    errs = [float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-300)) for k in b]
    return float("inf") if any(e != e for e in errs) else max(errs)


CASES = [("s1", None, "tokens", {}), ("s1", "default", "tokens", {}), ("s2", None, "tokens", {"replay_buffer": 8}),
         ("s2", "default", "tokens", {"replay_buffer": 8}), ("s1", None, "frames", {"alpha": 1.0})]


@pytest.mark.parametrize("rec,variant,candidate,kw", CASES)
def test_stepwise_methods_match_the_full_graph(rec, variant, candidate, kw):
    model = tiny(rec, variant, candidate, **kw)
    x = window(model)
    full, out_full = grads_after(model, x, "full")
    assert "alpha" in full or not model.cfg.ebt.alpha_learnable  # alpha's gradient is checked too
    for method in ("double", "jvp", "explicit"):
        g, out = grads_after(model, x, method)
        assert max_rel(g, full) < 1e-10, method
        assert float(out["loss"]) == pytest.approx(float(out_full["loss"]), rel=1e-10)
        assert float(out["ce_first"]) == pytest.approx(float(out_full["ce_first"]), rel=1e-10)
        assert not out["loss"].requires_grad


@pytest.mark.parametrize("rec,variant", [("s1", None), ("s1", "default"), ("s2", None)])
def test_official_algorithm_computes_the_same_energy_and_gradients(rec, variant):
    model = tiny(rec, variant, replay_buffer=8 if rec == "s2" else 0)
    x = window(model)
    official = OfficialAlgorithmEBT.from_model(model)
    p = torch.softmax(torch.randn(3, 12, 97, dtype=torch.float64), -1)
    for k in range(model.cfg.ebt.landscapes):
        e_ours, e_off = model.energy(x[:, :-1], p, k), official.energy(x[:, :-1], p, k)
        assert torch.allclose(e_ours, e_off, rtol=1e-11, atol=1e-11)
    assert max_rel(grads_after(model, x, "full", official=True)[0], grads_after(model, x, "full")[0]) < 1e-10


def test_doubled_mask_blocks_future_tokens_and_other_candidates():
    m = doubled_mask(S=4, prefix=1, device="cpu")
    C = 5
    assert m[:C, C:].sum() == 0  # the context never sees a candidate
    for i in range(4):
        assert m[C + i, : 1 + i + 1].all() and not m[C + i, 1 + i + 1: C].any()  # step token, x_0..x_i only
        assert m[C + i, C:].tolist() == [j == i for j in range(4)]  # itself, no other candidate


def test_reference_cases_pass_for_every_training_path(reference_dir):
    rows = dict(check_reference(reference_dir / "official_ebt_s1_small.safetensors"))
    for tag in ("double", "jvp", "explicit", "official"):
        grads = {k: v for k, v in rows.items() if k.startswith("grad.") and k.endswith(f" [{tag}]")}
        assert len(grads) == len([k for k in rows if k.startswith("grad.") and "[" not in k])  # every gradient
        assert max(grads.values()) < 1e-10 and rows[f"loss [{tag}]"] < 1e-12, tag


@pytest.mark.parametrize("fn", [token_loss_grad, token_loss_grad_pointwise])
def test_closed_form_cross_entropy_gradient(fn):
    torch.manual_seed(0)
    z = (30 * torch.randn(4, 5, 11, dtype=torch.float64)).requires_grad_()  # large logits, as after EBT steps
    t = torch.randint(1, 11, (4, 5))
    t[0, :3] = 0  # pad targets
    for pad in (0, None):
        ref = token_loss(z, t, pad)
        (g_ref,) = torch.autograd.grad(ref["loss"] * 0.3, z)
        out, g = fn(z.detach(), t, pad, 0.3)
        assert float(out["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-12)
        assert int(out["n_tokens"]) == int(ref["n_tokens"])
        assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-14)


def test_loss_only_cross_entropy_eager_and_compiled():
    """token_nll (System 2's logged first-step loss on CUDA, compiled there): token_loss's values without
    writing log-probabilities; pad and no pad, huge logits, a target whose probability underflows."""
    from ebt.models.transformer import compiled_token_nll, token_nll

    torch.manual_seed(0)
    z = 30 * torch.randn(4, 5, 11, dtype=torch.float64)
    z[1, 2, 0] = -1000.0
    t = torch.randint(1, 11, (4, 5))
    t[0, :3] = 0
    t[1, 2] = 0
    for pad in (0, None):
        ref = token_loss(z, t, pad)
        for fn in (token_nll, compiled_token_nll()):
            out = fn(z, t, pad)
            assert float(out["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-12)
            assert float(out["nll_sum"]) == pytest.approx(float(ref["nll_sum"]), rel=1e-12)
            assert int(out["n_tokens"]) == int(ref["n_tokens"])
    zb = z.to(torch.bfloat16)  # low-precision logits are reduced in float32, as cross-entropy does
    assert float(token_nll(zb, t, 0)["loss"]) == pytest.approx(float(token_loss(zb, t, 0)["loss"]), rel=1e-6)


@pytest.mark.parametrize("fn", [token_loss_grad, token_loss_grad_pointwise])
def test_closed_form_loss_where_the_target_probability_underflows(fn):
    """-log p_t from the log-sum-exp minus z_t: finite and equal to log-softmax's where p_t is 0 in floats."""
    z = torch.zeros(2, 3, 7, dtype=torch.float64)
    z[..., 0] = -1000.0  # exp(-1000) underflows to 0 in float64
    t = torch.zeros(2, 3, dtype=torch.long)
    out, g = fn(z, t, None)
    assert float(out["loss"]) == pytest.approx(float(token_loss(z, t, None)["loss"]), rel=1e-15)
    assert torch.isfinite(g).all()


def test_update_and_token_grad_in_one_function_matches_the_two_steps():
    """The compiled fused step's update and loss gradient as one function
    (ebt.objective.update_and_token_grad), p from `_probs_in`'s softmax statistics: z_next, the loss and
    the gradient in a padded layout equal `mapped_update` then `token_loss_grad`."""
    from ebt.fast.vocab_side import mapped_update, _probs_in
    from ebt.objective import update_and_token_grad

    torch.manual_seed(0)
    z = 5 * torch.randn(3, 4, 11, dtype=torch.float64)
    wtu = torch.randn(3, 4, 16, dtype=torch.float64)  # W^T u with 5 padding columns
    a = torch.full((3, 4, 1), 0.7, dtype=torch.float64)
    t = torch.randint(1, 11, (3, 4))
    t[1, :2] = 0
    for softmax in (True, False):
        z_ref = mapped_update(z, wtu, a, softmax)
        out_ref, v_ref = token_loss_grad(z_ref, t, 0, 0.5, (torch.float64, 5))
        p, stats = _probs_in(z, softmax, torch.float64, 5)  # p laid out, and z's softmax statistics
        assert torch.allclose(p[..., :11], torch.softmax(z, -1) if softmax else z, rtol=1e-14, atol=1e-16)
        assert not p[..., 11:].any() and (stats is None) == (not softmax)
        z_next, out, v = update_and_token_grad(z, wtu, a, softmax, stats, t, 0, 0.5, (torch.float64, 5))
        assert torch.allclose(z_next, z_ref, rtol=1e-14, atol=1e-15)
        assert v.shape == (3, 4, 16) and not v[..., 11:].any()
        assert torch.allclose(v, v_ref, rtol=1e-12, atol=1e-15)
        assert float(out["loss"]) == pytest.approx(float(out_ref["loss"]), rel=1e-13)
        assert int(out["n_tokens"]) == int(out_ref["n_tokens"]) == 10


class PoisonedRecycler(Recycler):
    """A CPU recycler on every tensor size, each tensor it keeps overwritten with NaN: a tensor read after
    it was given back, or a recycled one not wholly overwritten, turns the results into NaN."""

    def __init__(self):
        super().__init__(min_bytes=0)

    def give(self, *tensors):
        super().give(*tensors)
        for t in self.free:
            if any(t.data_ptr() == u.data_ptr() for u in tensors if u is not None):
                t.fill_(float("nan"))


@pytest.fixture
def poisoned_recycler():
    return PoisonedRecycler()


def fresh_memory():
    """A recycler that keeps nothing: the same steps with fresh tensors only."""
    return Recycler(keep=0, min_bytes=0)


@pytest.mark.parametrize("rec", ["s1", "s2"])
def test_recycled_memory_changes_no_result(rec, poisoned_recycler):
    model = tiny(rec, replay_buffer=8 if rec == "s2" else 0)
    x = window(model)
    got = {m: grads_after(model, x, m, calls=3, pool=poisoned_recycler) for m in ("explicit", "jvp")}
    assert poisoned_recycler.free  # the steps did recycle
    for method, (g, out) in got.items():
        g_ref, out_ref = grads_after(model, x, method, calls=3, pool=fresh_memory())
        assert g.keys() == g_ref.keys() and all(torch.equal(g[n], g_ref[n]) for n in g_ref), method  # NaN-safe
        assert float(out["loss"]) == float(out_ref["loss"]) and float(out["ce_first"]) == float(out_ref["ce_first"])


def test_recycling_never_takes_a_callers_tensor(poisoned_recycler):
    """A start the caller passes in (and holds) is read, never recycled."""
    model = tiny("s1")
    x = window(model)
    init = model.init_candidate(x[:, :-1])
    kept = init.clone()
    model.train()
    plan = resolve_plan(model, grad="explicit", pool=poisoned_recycler)
    for _ in range(2):
        train_step(model, x, init=init, plan=plan)
    assert torch.equal(init, kept)


@pytest.mark.parametrize("cfg", [ThinkConfig(steps=3), ThinkConfig(steps=3, noise=0.5, candidates=2),
                                 ThinkConfig(steps=2, score_final=False)])
def test_recycled_thinking_changes_no_result(cfg, poisoned_recycler):
    """Thinking on CPU runs its steps in recycled memory: the same candidates and energies as with fresh
    tensors, and a start the caller passes in is left as it was."""
    model = tiny("s2").eval()
    x = window(model)[:, :-1]
    init = model.init_candidate(x)
    kept = init.clone()

    def run(pool):
        step = resolve_plan(model, pool=pool).think_step(model, cfg)
        torch.manual_seed(5)
        return think(model, x, cfg, init=init, step=step), think(model, x, cfg, step=step)

    got = run(poisoned_recycler)
    assert poisoned_recycler.free and torch.equal(init, kept)
    for a, b in zip(got, run(fresh_memory())):
        assert torch.equal(a.z, b.z) and torch.equal(a.energy, b.energy)
        assert torch.equal(a.initial_energy, b.initial_energy)


def test_chunked_cpu_normal_draws():
    """randn_ on a large CPU tensor: every element drawn, the numbers fixed by the seed whatever the
    thread count, N(0, 1) moments, and a different draw for the next call."""
    def draw(threads):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(7)
            return randn_(torch.full((3, 1000, 1001), float("nan"))), randn_(torch.empty(3, 1000, 1001))
        finally:
            torch.set_num_threads(old)

    (a, a2), (b, _) = draw(1), draw(2)
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, a2)
    assert abs(float(a.mean())) < 5e-3 and abs(float(a.std()) - 1) < 5e-3
    chunks = a.view(-1)[: 2 * (1 << 20)].view(2, -1)  # two chunks: different generators, not one repeated
    assert not torch.equal(chunks[0], chunks[1])


def test_vocabulary_padding_changes_no_result():
    model = tiny("s1")
    x = window(model)
    for method in ("double", "jvp", "explicit"):
        g_pad, out_pad = grads_after(model, x, method, pad_vocab=True)  # what CUDA does, here
        g, out = grads_after(model, x, method, pad_vocab=False)
        assert max_rel(g_pad, g) < 1e-12 and float(out_pad["loss"]) == pytest.approx(float(out["loss"]), rel=1e-12)
    h, w = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(97, 8, dtype=torch.float64)
    p = torch.randn(2, 3, 97, dtype=torch.float64)
    assert ebt_nn.vocab_out(h, w, pad=True).shape == (2, 3, 97)
    assert torch.allclose(ebt_nn.vocab_out(h, w, pad=True), h @ w.T)
    assert ebt_nn.vocab_t(h, p, pad=True).shape == (8, 97)
    assert torch.allclose(ebt_nn.vocab_t(h, p, pad=True), h.flatten(0, 1).T @ p.flatten(0, 1))


def test_autocast_does_not_keep_old_candidates_alive():
    """Autocast caches its casts of leaves that require grad until the region ends: were the candidate a
    leaf, every thinking step's (B, S, V) candidate would stay alive (GPU memory grew 9 GiB per step)."""
    model = tiny("s2").float().eval()
    x = window(model)[:, :-1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = ContextCache(model, x).get_ctx(0, False)
        z = torch.randn(3, 12, 97)
        p, E, g = energy_and_grad(model, ctx, z)  # autograd: the path with a leaf
        first = weakref.ref(p)
        del p, E, g
        energy_and_grad(model, ctx, z)
        gc.collect()
        assert first() is None


@pytest.mark.parametrize("rec", ["s1", "s2"])
def test_static_shape_decoding_matches_dynamic(rec):
    from ebt.generate import GenerateConfig, generate

    model = tiny(rec, S=24).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    cfg = dict(max_new_tokens=10, think=ThinkConfig(steps=2, score_final=False))
    a, la = generate(model, prompts, GenerateConfig(**cfg), return_logits=True)
    b, lb = generate(model, prompts, GenerateConfig(**cfg, cuda_graph=True), return_logits=True)
    assert a == b and torch.allclose(la, lb, rtol=1e-9, atol=1e-9)


def test_static_decoder_is_kept_across_calls_and_matches_dynamic():
    """generate(cuda_graph=True) keeps its static decoder (and on CUDA its captured graph) with the model:
    later calls with other prompts and lengths, and after the weights changed in place, reuse it and still
    choose the tokens of decoding without a cache; another batch size or the weights' storage changing builds a new one."""
    from ebt.generate import _STATIC, GenerateConfig, generate, generate_uncached, release_static_decoder

    model = tiny("s2", S=24).eval()
    # noise=0 explicit (issue 19: S2 thinks with its trained std by default): without a cache the noise is
    # drawn for every position, so other numbers
    think_cfg = ThinkConfig(steps=2, score_final=False, noise=0.0)
    runs = [([[1, 2, 3], [4, 5, 6, 7, 8]], 6), ([[9, 8, 7, 6], [5, 4, 3, 2]], 9), ([[3], [11, 12]], 4)]
    kept = None
    for i, (prompts, new) in enumerate(runs):
        if i == 2:
            with torch.no_grad():
                for p in model.parameters():  # in place (an optimizer step): the kept decoder stays valid
                    p.mul_(1.01)
        cfg = dict(max_new_tokens=new, think=think_cfg)
        a, la = generate_uncached(model, prompts, GenerateConfig(**cfg), return_logits=True)  # no cache at all
        b, lb = generate(model, prompts, GenerateConfig(**cfg, cuda_graph=True), return_logits=True)
        assert a == b and torch.allclose(la, lb, rtol=1e-8, atol=1e-8), i
        assert kept is None or _STATIC[model][1] is kept  # reused, not rebuilt
        kept = _STATIC[model][1]
    generate(model, [[1, 2]], GenerateConfig(max_new_tokens=3, think=think_cfg, cuda_graph=True))
    assert _STATIC[model][1] is not kept  # batch 1: a decoder of its own, the old one dropped
    kept = _STATIC[model][1]
    model.float()  # new parameter storage: the old decoder's buffers (and a graph's addresses) are stale
    a = generate_uncached(model, [[1, 2]], GenerateConfig(max_new_tokens=3, think=think_cfg))
    assert generate(model, [[1, 2]], GenerateConfig(max_new_tokens=3, think=think_cfg, cuda_graph=True)) == a
    assert _STATIC[model][1] is not kept
    release_static_decoder(model)
    assert model not in _STATIC
    generate(model, [[1, 2]], GenerateConfig(max_new_tokens=3, think=think_cfg, cuda_graph=True))
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None and len(_STATIC) == 0  # the kept decoder does not keep its model alive


def test_captured_step_needs_cuda():
    with pytest.raises(ConfigError, match="CUDA"):
        CapturedStep(tiny("s1"), None)


def stand_in_capture(fns, warmup, warmup_fns=None, release=False):
    """What ebt.fast.cuda_graph.capture_cuda_graphs does, on CPU: warm-up runs, then outputs that a replay overwrites
    in place. A CUDA graph replays the host-side decisions made at capture (shapes, the step count, what
    runs); this stand-in reruns fn, so it checks CapturedStep's bookkeeping (which graph for which step
    count, eager steps while the buffer fills, no rows pushed by warm-ups), not the capture itself (the
    device check does: benchmarks/speed.py --only check). The warm-ups' random draws are undone, as a
    graph's own random offsets leave the eager stream alone. The graphs share one memory pool, so a
    replay may write its temporaries over any other graph's outputs: each replay here fills the others'
    outputs with NaN (-1 for integers), and a caller that reads a replay's outputs after the next replay
    reads garbage, as it would on the device."""
    state = torch.get_rng_state()
    warmup_fns = warmup_fns or fns
    for f in warmup_fns:
        for _ in range(warmup):
            f()
    graphs = []

    class Graph:
        def __init__(self, fn, static):
            self.fn, self.static = fn, static

        def tensors(self):
            return [*self.static[0].values(), *(g for g in self.static[1] if g is not None)]

        def replay(self):
            out, grads = self.fn()
            for other in graphs:
                if other is not self:
                    for t in other.tensors():
                        t.fill_(float("nan") if t.is_floating_point() else -1)
            for k, t in self.static[0].items():
                t.copy_(out[k])
            for t, g in zip(self.static[1], grads):
                t.copy_(g)

    for fn, warm in zip(fns, warmup_fns):
        graphs.append(Graph(fn, warm()))  # a capture runs nothing: its outputs' tensors, filled by each replay
    torch.set_rng_state(state)
    return [(g, g.static) for g in graphs]


def captured_pair(eager):
    """(eager, a copy stepped by CapturedStep under the stand-in capture, that step, both(x, seed)): both runs
    train_step on eager and the captured step on the copy from the same seed, grads zeroed first, and
    returns their metrics (a, b)."""
    graphed = copy.deepcopy(eager)
    plan_e, plan_g = resolve_plan(eager, grad="explicit"), resolve_plan(graphed, grad="explicit")
    step = CapturedStep(graphed, partial(train_step, graphed, plan=plan_g), capture=stand_in_capture)

    def both(x, seed):
        for m in (eager, graphed):
            m.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        a = train_step(eager, x, plan=plan_e)
        torch.manual_seed(seed)
        return a, step(x)

    return eager, graphed, step, both


def test_captured_s2_step_matches_eager_steps():
    """System 2 through CapturedStep (stand-in capture): the same step counts, replayed rows, buffer and
    gradients as eager train_step, step for step; none while the buffer fills, then one graph for every
    step count the recipe can draw."""
    eager, graphed, step, both = captured_pair(tiny("s2", replay_buffer=6).train())
    counts, prev = [], None
    for i in range(8):
        a, b = both(window(eager, B=4), seed=100 + i)
        counts.append((int(a["steps"]), int(b["steps"]), len(step.graphs)))
        if prev is not None and counts[-2][2] and counts[-2][1] != counts[-1][1]:
            assert prev["loss"].isnan()  # the graphs share a pool: a replay's outputs last until the next
        prev = b
        assert float(a["loss"]) == float(b["loss"]) and float(a["replay_rows"]) == float(b["replay_rows"])
        for p, q in zip(eager.parameters(), graphed.parameters()):
            assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))
        assert torch.equal(eager.replay.windows, graphed.replay.windows)
        assert torch.equal(eager.replay.logits, graphed.replay.logits) and eager.replay.next == graphed.replay.next
    assert [c[2] for c in counts] == [0, 0] + [2] * 6  # 4 + 4 rows fill the 6-row buffer: eager until then,
    assert {c[0] for c in counts} == {2, 3} and all(c[0] == c[1] for c in counts)  # then a graph per count
    assert set(step.graphs) == {2, 3}
    assert any(a[1] != b[1] for a, b in zip(counts[2:], counts[3:]))  # a switch of graphs (the NaN check ran)


def test_s2_step_with_a_full_buffer_reads_nothing_back_on_the_host():
    """What a CUDA graph cannot hold: no .item(), bool(), int() of a tensor, no host-drawn randperm, no
    tensor made from Python data on the device in a System 2 step once its buffer is full and its step
    count given (CPU: the path shared with CUDA)."""
    from torch.overrides import TorchFunctionMode

    host_reads = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "nonzero",
                  "randperm", "cpu"}

    class Probe(TorchFunctionMode):
        hits, ops = [], 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Probe.ops += 1
            name = getattr(func, "__name__", "")
            # a tensor made from Python data on the step's device is a host-to-device copy (not capturable)
            if name in host_reads or (name in ("tensor", "as_tensor") and "device" in (kwargs or {})):
                Probe.hits.append(name)
            return func(*args, **(kwargs or {}))

    for method, pad, candidate in (("explicit", 0, "tokens"), ("double", None, "tokens"), ("jvp", 0, "tokens"),
                                   ("explicit", None, "frames")):
        m = tiny("s2", candidate=candidate, replay_buffer=3).train()
        m.cfg.pad_token_id = pad
        x = window(m, 3)
        plan = resolve_plan(m, grad=method)
        for _ in range(2):
            train_step(m, x, plan=plan)
        assert len(m.replay) == 3
        Probe.hits, Probe.ops = [], 0
        with Probe():
            out = train_step(m, x, plan=plan, n_steps=3)
        assert Probe.ops > 200 and Probe.hits == [], (method, Probe.hits)
        assert int(out["steps"]) == 3 and float(out["replay_rows"]) == 1
        with Probe():
            train_step(m, x, plan=plan)
        assert Probe.hits == ["__int__"]  # the step count drawn on the host (CapturedStep draws it outside)


def test_replay_buffer_samples_distinct_rows_and_resumes_its_cursor():
    from ebt.models.ebt import ReplayBuffer

    buf = ReplayBuffer(5)
    buf.push(torch.arange(5)[:, None].repeat(1, 3), torch.zeros(5, 2, 4))
    seen = set()
    for i in range(40):
        torch.manual_seed(i)
        w, _ = buf.sample(3)
        rows = w[:, 0].tolist()
        assert len(set(rows)) == 3
        seen.update(rows)
    assert seen == set(range(5))
    buf.push(torch.full((2, 3), 7), torch.ones(2, 2, 4))  # rows 0, 1 overwritten; the cursor at 2
    state = buf.state_dict()
    assert state["next"] == 2 and isinstance(state["next"], int)
    other = ReplayBuffer(5)
    other.load_state_dict(copy.deepcopy(state))  # as torch.load gives it back
    other.push(torch.full((1, 3), 9), torch.ones(1, 2, 4))
    assert other.windows[:, 0].tolist() == [7, 7, 9, 3, 4] and other.next == 3
    buf.paused = True
    buf.push(torch.full((1, 3), 8), torch.ones(1, 2, 4))
    assert buf.windows[:, 0].tolist() == [7, 7, 2, 3, 4] and buf.next == 2


def test_unknown_gradient_method_is_refused():
    model = tiny("s1")
    with pytest.raises(ConfigError, match="gradient method"):
        train_step(model, window(model), plan=resolve_plan(model, grad="reverse"))


def test_thinking_is_unchanged_by_the_fast_context():
    """Inference contexts use fused attention kernels (no graph): same energies as explicit attention."""
    model = tiny("s2").eval()
    x = window(model)[:, :-1]
    torch.manual_seed(3)
    a = think(model, x, ThinkConfig(steps=3), step=resolve_plan(model).think_step(model, ThinkConfig(steps=3)))
    official = OfficialAlgorithmEBT.from_model(model)
    torch.manual_seed(3)
    b = think(official, x, ThinkConfig(steps=3))
    assert torch.allclose(a.z, b.z, rtol=1e-9, atol=1e-9) and torch.allclose(a.energy, b.energy, rtol=1e-9)


@pytest.mark.parametrize("candidate", ["tokens", "frames"])
def test_step_losses_take_the_update_first_when_given_one(candidate):
    """StepLosses.grad(update=...) (the fused step's way in, ebt.fast.vocab_side._update_and_loss): the update
    z_next = p - alpha W^T u, then the loss and its gradient at z_next, as the plain call at z_next; frames
    (no softmax, Smooth L1 by autograd) as well as tokens."""
    from ebt.fast.vocab_side import mapped_update, _probs_in
    from ebt.objective import StepLosses

    model = tiny("s1", candidate=candidate)
    x = window(model)
    targets = x[:, 1:]
    plan = resolve_plan(model)
    torch.manual_seed(1)
    C = model.candidate_size
    z = torch.randn(3, 12, C, dtype=torch.float64)
    wtu = torch.randn(3, 12, C + 3, dtype=torch.float64)
    a = torch.full((3, 12, 1), 0.3, dtype=torch.float64)
    softmax = model.candidate_softmax
    _, stats = _probs_in(z, softmax, torch.float64, 3)
    ref = StepLosses(model, targets, 0.5, plan)
    z_ref = mapped_update(z, wtu, a, softmax)
    loss_ref, v_ref = ref.grad(0, z_ref, 2.0, grad_layout=(torch.float64, 3))
    got = StepLosses(model, targets, 0.5, plan)
    loss, v, z_next = got.grad(0, z, 2.0, grad_layout=(torch.float64, 3), update=(wtu, a, softmax, stats))
    assert torch.allclose(z_next, z_ref, rtol=1e-13, atol=1e-14)
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-12)
    assert v.shape == (3, 12, C + 3) and torch.allclose(v, v_ref, rtol=1e-10, atol=1e-14)
    assert float(got.ce[0]["loss"]) == pytest.approx(float(ref.ce[0]["loss"]), rel=1e-12)
