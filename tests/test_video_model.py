"""Continuous candidates (frames): the same EBT class, attention and thinking loop as text."""

import pytest
import torch

from ebt.config import EBTConfig, ModelConfig
from ebt.errors import ConfigError
from ebt.models import EBT, build_model
from ebt.think import ThinkConfig, think

F = 12


def frames_model(kind="ebt", **e):
    torch.manual_seed(0)
    cfg = ModelConfig(model=kind, size="4xs", n_layer=2, d_model=32, n_head=2, context_length=8,
                      candidate="frames", feature_dim=F,
                      ebt=EBTConfig(landscapes=2, alpha=0.5, **e) if kind == "ebt" else None)
    return build_model(cfg).double()


def test_frames_use_the_text_code_path():
    m = frames_model()
    assert type(m) is EBT and m.vocab_to_embed.in_features == F and m.tok_emb.in_features == F
    z = torch.randn(2, 8, F, dtype=torch.float64)
    assert m.candidate_input(z) is z  # no softmax: the update is z - alpha dE/dz
    x = torch.randn(2, 8, F, dtype=torch.float64)
    logits, energies = m.unroll(x, z, 1, stochastic=False, build_graph=False)
    zg = z.clone().requires_grad_()
    E = m.energy(x, zg, 0)
    (g,) = torch.autograd.grad(E.sum(), zg)
    assert torch.allclose(logits[0], z - 0.5 * g, atol=1e-12) and torch.equal(energies[0], E.detach())
    out = think(m.eval(), x, ThinkConfig(steps=4, candidates=2))  # the one thinking loop
    assert out.z.shape == (2, 8, F) and out.passes == 2 * 5


def test_no_leakage_from_future_frames():
    m = frames_model()
    x = torch.randn(1, 8, F, dtype=torch.float64)
    z = torch.randn(1, 8, F, dtype=torch.float64)

    def e_and_g(x):
        zg = z.clone().requires_grad_()
        E = m.energy(x, zg, 1)
        return E.detach(), torch.autograd.grad(E.sum(), zg)[0]

    E, g = e_and_g(x)
    for i in range(7):
        x2 = x.clone()
        x2[:, i + 1:] += torch.randn_like(x2[:, i + 1:])
        E2, g2 = e_and_g(x2)
        assert torch.equal(E2[:, : i + 1], E[:, : i + 1]) and torch.equal(g2[:, : i + 1], g[:, : i + 1])


@pytest.mark.parametrize("kind", ["ebt", "transformer"])
def test_frames_train_with_smooth_l1(kind):
    m = frames_model(kind).float()
    w = torch.randn(4, 9, F).cumsum(1) * 0.1  # smooth trajectories
    out = m(w)
    assert int(out["n_tokens"]) == 4 * 8 and out["loss"].requires_grad
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    first = float(out["loss"])
    for _ in range(30):
        loss = m(w)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first


def test_feature_size_mismatch_and_missing_dim():
    m = frames_model()
    with pytest.raises(ConfigError, match="feature size must match the model's feature_dim"):
        m(torch.randn(2, 9, F + 1, dtype=torch.float64))
    with pytest.raises(ConfigError, match="longer than the model's context_length 8"):
        m(torch.randn(2, 10, F, dtype=torch.float64))
    with pytest.raises(ConfigError, match="needs feature_dim"):
        ModelConfig(candidate="frames")
