"""The image EBT denoiser: energy gradient, PSNR arithmetic, thinking on images, bad input, the report."""

import math
from pathlib import Path

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


def test_image_run_logs_images_not_tokens(tmp_path, monkeypatch):
    """An image run's log lines count images and name its Smooth L1 loss; metrics.jsonl keeps the old keys."""
    import json

    import numpy as np

    from ebt.config import DataConfig, RunConfig, TrainConfig
    from ebt.data import images
    from ebt.train import train

    x = np.random.default_rng(0).integers(0, 255, (24, 28, 28), dtype=np.uint8)
    monkeypatch.setattr(images, "load_fashion_mnist", lambda cache_dir: {"train": (x, np.arange(24) % 10),
                                                                         "test": (x[:6], np.arange(6) % 10)})
    run = RunConfig(
        model=ModelConfig(model="ebt", candidate="image", size="4xs", n_layer=1, d_model=32, n_head=2,
                          patch=8),
        data=DataConfig(data_dir="images:fashion_mnist", image_cache=str(tmp_path / "cache")),
        train=TrainConfig(out_dir=str(tmp_path / "run"), steps=4, batch_size=4, warmup_steps=1, eval_every=0,
                          eval_windows=4, eval_batch_size=4, log_every=2, device="cpu", precision="fp32",
                          progress=True, seed=0))
    lines = []
    train(run, log=lines.append)
    steps = [line for line in lines if line.startswith("step") and "val" not in line]
    assert len(steps) == 2 and all("images/s" in s and "sl1_1" in s and "sl1_N" in s for s in steps)
    text = "\n".join(lines)
    assert "tok/s" not in text and "tokens" not in text and "ce1" not in text
    assert "24 train images" in text and "global batch 4 images" in text
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["images_seen"] for r in train_rows] == [8, 16] == [r["tokens_seen"] for r in train_rows]
    assert all(r["images_per_s"] == r["tokens_per_s"] > 0 for r in train_rows)


@pytest.mark.slow
def test_denoise_eval_names_every_file_it_wrote(tmp_path, monkeypatch, capsys):
    """`ebt eval` of an image run prints where its table, JSON and figures went."""
    import numpy as np

    from ebt.cli import main
    from ebt.config import DataConfig, RunConfig, TrainConfig
    from ebt.data import images
    from ebt.train import train

    x = np.random.default_rng(0).integers(0, 255, (24, 28, 28), dtype=np.uint8)
    monkeypatch.setattr(images, "load_fashion_mnist", lambda cache_dir: {"train": (x, np.arange(24) % 10),
                                                                         "test": (x[:6], np.arange(6) % 10)})
    run = RunConfig(
        model=ModelConfig(model="ebt", candidate="image", size="4xs", n_layer=1, d_model=32, n_head=2, patch=8),
        data=DataConfig(data_dir="images:fashion_mnist", image_cache=str(tmp_path / "cache")),
        train=TrainConfig(out_dir=str(tmp_path / "run"), steps=2, batch_size=4, warmup_steps=1, eval_every=0,
                          eval_windows=4, eval_batch_size=4, device="cpu", precision="fp32", progress=False))
    train(run, log=lambda *a: None)
    capsys.readouterr()
    main(["eval", str(tmp_path / "run"), "--windows", "6", "--device", "cpu", "--out-dir", str(tmp_path / "d")])
    out = capsys.readouterr().out.splitlines()
    listed, d = out[out.index("files written:") + 1:], tmp_path / "d"
    names = ("denoise.md", "denoise.json", "psnr_vs_passes.png", "grid_level0.1.png", "grid_level0.2.png")
    assert [line.split()[0] for line in listed] == [str(d / f) for f in names]
    assert listed[0].endswith("  PSNR table and linear probe (Markdown)")
    assert listed[3].endswith("  figure: clean, noisy and denoised images, noise 0.1")
    for line in listed:
        assert Path(line.split()[0]).stat().st_size > 0
