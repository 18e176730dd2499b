import pytest
import torch

from ebt.compat.official import check_reference, convert_state_dict, load_reference, official_to_ours
from ebt.config import SIZES, ModelConfig
from ebt.errors import CheckpointError, ConfigError
from ebt.models import build_model
from ebt.nn import Rope, apply_rope


def test_reference_transformer_small_matches_official(reference_dir):
    rows = check_reference(reference_dir / "official_transformer_small.safetensors")
    names = [n for n, _ in rows]
    assert "logits" in names and "loss" in names
    assert sum(n.startswith("grad.") for n in names) == 21  # every parameter: 2 layers x 9 + embeddings, norm, head
    worst = max(e for _, e in rows)
    assert worst < 1e-5, rows


def test_explicit_attention_equals_fused(reference_dir):
    """The score-matrix path (needed for double backward) and the SDPA path agree."""
    meta, t = load_reference(reference_dir / "official_transformer_small.safetensors")
    from ebt.compat.official import config_from_meta

    model = build_model(config_from_meta(meta)).double()
    model.load_state_dict(convert_state_dict({k[6:]: v for k, v in t.items() if k.startswith("param.")}))
    x = t["input.tokens"][:, :-1]
    pos = torch.arange(x.shape[1])
    h = model.tok_emb(x)
    a = model.backbone(h, pos, causal=True, fused=True)
    b = model.backbone(h, pos, causal=True, fused=False)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_rope_is_complex_multiplication_of_adjacent_pairs():
    x = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    pos = torch.arange(5)
    freqs = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    ang = pos[:, None].double() * freqs
    z = torch.view_as_complex(x.reshape(1, 1, 5, 4, 2).contiguous()) * torch.polar(torch.ones_like(ang), ang)
    ref = torch.view_as_real(z).flatten(-2)
    tables = Rope(8, 10000.0, 16).tables(pos, torch.float64)
    assert torch.allclose(apply_rope(x, tables), ref, atol=1e-14)  # eager: complex multiplication
    import unittest.mock

    with unittest.mock.patch("torch.compiler.is_compiling", return_value=True):  # the real form compile sees
        real = Rope(8, 10000.0, 16).tables(pos, torch.float64)
        assert real.cis is None and torch.allclose(apply_rope(x, real), ref, atol=1e-14)


def test_causality_no_leak_from_future_tokens():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="4xs", vocab_size=50, context_length=16)).double()
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 50, (2, 7))
    a, b = model.logits(x), model.logits(y)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("size", list(SIZES))
def test_size_registry(size):
    cfg = ModelConfig(size=size, vocab_size=100)
    layers, width, heads, lr = SIZES[size]
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.default_lr) == (layers, width, heads, lr)
    if size in ("4xs", "3xs", "xxs"):
        model = build_model(cfg)
        non_emb = sum(p.numel() for n, p in model.named_parameters() if "backbone" in n)
        assert abs(non_emb / (7 * layers * width**2) - 1) < 0.01  # about 7 L D^2 (FFN hidden = D)


def test_init_matches_official_scheme():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="3xs", vocab_size=1000))
    w = model.backbone.blocks[0].attn.wq.weight
    assert abs(w.std().item() - (2 / (256 + 256)) ** 0.5) < 0.005  # Xavier-normal
    assert abs(model.tok_emb.weight.std().item() - 1.0) < 0.01  # N(0, 1)
    assert torch.equal(model.backbone.norm.weight, torch.ones(256))


def test_bad_input_messages():
    with pytest.raises(ConfigError, match="unknown size 'huge'.*4xs"):
        ModelConfig(size="huge")
    with pytest.raises(ConfigError, match="heads of even width"):
        ModelConfig(size="4xs", n_head=3)
    model = build_model(ModelConfig(size="4xs", vocab_size=50, context_length=8))
    with pytest.raises(ConfigError, match="longer than the model's context_length 8"):
        model.logits(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ConfigError, match="longer than the model's context_length 8"):
        model(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(CheckpointError, match="no mapping"):
        official_to_ours("encoder.weird.weight")


def test_loss_ignores_pad_and_is_token_weighted():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="4xs", vocab_size=30, context_length=8, pad_token_id=0)).double()
    w = torch.randint(1, 30, (3, 9))
    w[0, 5:] = 0
    out = model(w)
    assert int(out["n_tokens"]) == 3 * 8 - 4
    logp = torch.log_softmax(model.logits(w[:, :-1]), -1)
    nll = -logp.gather(-1, w[:, 1:, None])[..., 0]
    mask = w[:, 1:] != 0
    assert torch.allclose(out["nll_sum"], nll[mask].sum())
    assert torch.allclose(out["loss"], nll[mask].mean())
