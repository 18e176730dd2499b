"""The image EBT denoiser: energy gradient, PSNR arithmetic, thinking on images, bad input, the report."""

import math

import pytest
import torch

from ebt.config import ModelConfig
from ebt.denoise import denoising_table, linear_probe, pixel_errors, table_markdown
from ebt.errors import ConfigError
from ebt.models import DiTDenoiser, EBTDenoiser, build_model
from ebt.models.dit import level_alpha_bar, level_schedule
from ebt.think import ThinkConfig, think


def tiny(kind="ebt", channels=1, noise_level=0.1):
    torch.manual_seed(0)
    return build_model(ModelConfig(model=kind, candidate="image", size="4xs", n_layer=1, d_model=32, n_head=2,
                                   image_size=16, channels=channels, patch=4, noise_level=noise_level))


def test_energy_gradient_matches_finite_differences():
    m = tiny().double()
    with torch.no_grad():  # leave the zero init so the energy is not constant
        m.final.linear.weight.normal_()
        for b in m.blocks:
            b.ada[-1].weight.normal_(0, 0.1)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64) * 2 - 1
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(m.energy_from(None, xg).sum(), xg)
    d, eps = torch.randn_like(x), 1e-6
    fd = (m.energy_from(None, x + eps * d).sum() - m.energy_from(None, x - eps * d).sum()) / (2 * eps)
    assert abs(float(fd) - float((g * d).sum())) < 1e-7 * max(1.0, abs(float(fd)))


def test_psnr_arithmetic():
    clean = torch.zeros(2, 1, 4, 4) - 1  # black
    pred = clean.clone()
    pred[0] += 2 * 10 / 255  # every pixel off by 10 grey levels
    pred[1, 0, 0, 0] += 2 * 255 / 255  # one pixel from 0 to 255
    mse, psnr = pixel_errors(pred, clean)
    assert mse[0].item() == pytest.approx(100.0, rel=1e-4) and psnr[0].item() == pytest.approx(10 * math.log10(255**2 / 100), rel=1e-4)
    assert mse[1].item() == pytest.approx(255**2 / 16, rel=1e-4) and psnr[1].item() == pytest.approx(10 * math.log10(16), rel=1e-4)


def test_denoiser_starts_from_the_noisy_image_and_thinks_with_the_shared_loop():
    m = tiny().eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    out = think(m, x, ThinkConfig(steps=2, score_final=False))
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(m.energy_from(None, xg).sum(), xg)
    one = think(m, x, ThinkConfig(steps=1, score_final=False)).z
    assert torch.allclose(one, x - m.alpha.detach() * g, atol=1e-5)  # x <- x - alpha dE/dx from the noisy image
    assert out.z.shape == x.shape and out.steps_used.shape == (3, 1)


def test_training_losses_and_bad_input():
    m = tiny().train()
    clean = torch.rand(4, 1, 16, 16) * 2 - 1
    out = m(clean)
    out["loss"].backward()
    assert m.alpha.grad is not None and int(out["n_tokens"]) == 4
    with pytest.raises(ConfigError, match="grayscale 16x16 model needs matching data"):
        m(torch.rand(4, 3, 16, 16))
    with pytest.raises(ConfigError, match="expected images of shape"):
        tiny("dit")(torch.rand(4, 1, 32, 32))
    assert isinstance(tiny("dit"), DiTDenoiser) and isinstance(m, EBTDenoiser)


def test_ebt_trains_on_the_official_noise_the_dit_shares():
    m, d = tiny(), tiny("dit")
    assert torch.equal(m.schedule.alphas_cumprod, level_schedule(0.1).alphas_cumprod)
    assert torch.equal(m.schedule.alphas_cumprod, d.net.schedule.alphas_cumprod)
    # training noise of alpha_bar 0.896: on black images with a zero energy head (no step moves the image)
    # the loss is the Smooth L1 of noise of std 0.32, about 0.5 * (1 - alpha_bar)
    ab = level_alpha_bar(0.1)
    clean = torch.zeros(64, 1, 16, 16)
    torch.manual_seed(1)
    loss = m.train()(clean)["ce_first"].item()
    assert loss == pytest.approx(0.5 * (1 - ab), rel=0.05)


def test_denoising_table_needs_one_training_level():
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with pytest.raises(ConfigError, match="train both at one level"):
        denoising_table(tiny().eval(), tiny("dit", noise_level=0.2).eval(), x, log=lambda *a: None)


def test_denoising_table_and_probe():
    m, d = tiny().eval(), tiny("dit").eval()
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    table = denoising_table(m, d, x, ebt_steps=(1, 2), ebt_applications=2, dit_steps=(2,), dit_applications=2,
                            batch_size=4, log=lambda *a: None)
    configs = [(r["model"], r["config"], r["passes"]) for r in table]
    assert configs == [("noisy input", "-", 0), ("EBT", "1 step", 1), ("EBT", "2 steps", 2),
                       ("EBT", "1 step(s) x 2 applications", 2), ("DiT", "DDIM 2 steps x 1", 2),
                       ("DiT", "DDIM 2 steps x 2", 4)]
    noisy = table[0]
    assert noisy["0.2"]["psnr"] < noisy["0.1"]["psnr"]  # more noise, lower PSNR
    md = table_markdown(table)
    assert md.count("\n") == 2 + len(table) and "OOD 0.2 PSNR" in md
    y = torch.arange(6) % 2
    acc = linear_probe(m, x, y, x, y, epochs=50)
    assert 0.0 <= acc <= 1.0
