"""Continuous candidates (frames): the same EBT class, attention and thinking loop as text."""

import pytest
import torch

from ebt.config import EBTConfig, ModelConfig
from ebt.errors import ConfigError
from ebt.models import EBT, build_model
from ebt.think import ThinkConfig, think, unroll

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
    logits, energies = unroll(m, x, z, 1, stochastic=False, build_graph=False)
    zg = z.clone().requires_grad_()
    E = m.energy(x, zg, 0)
    (g,) = torch.autograd.grad(E.sum(), zg)
    assert torch.allclose(logits[0], z - 0.5 * g, atol=1e-12)
    assert torch.allclose(energies[0], E.detach(), rtol=1e-12, atol=1e-12)  # fused attention in the context
    out = think(m.eval(), x, ThinkConfig(steps=3, final_landscape=True, candidates=2))  # the one thinking loop (4 steps on 2 landscapes)
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
    first = float(out["loss"].detach())
    for _ in range(30):
        loss = m(w)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first


def test_feature_size_mismatch_and_missing_dim():
    m = frames_model()
    with pytest.raises(ConfigError, match="feature size must match the model's feature_dim"):
        m(torch.randn(2, 9, F + 1, dtype=torch.float64))
    with pytest.raises(ConfigError, match="longer than the model's context_length 8"):
        m(torch.randn(2, 10, F, dtype=torch.float64))
    with pytest.raises(ConfigError, match="needs feature_dim"):
        ModelConfig(candidate="frames")


@pytest.mark.slow
def test_video_training_and_report(tmp_path, monkeypatch, capsys):
    """Train a tiny EBT and Transformer++ on generated clips, then the full video report."""
    import json
    from pathlib import Path

    import numpy as np

    import ebt.data.video as vd
    from ebt.config import DataConfig, RunConfig, TrainConfig, recipe
    from ebt.errors import ConfigError
    from ebt.train import train
    from ebt.video import video_report

    rng = np.random.default_rng(0)
    monkeypatch.setattr(vd, "load_mnist_digits", lambda cache_dir: (
        (rng.random((100, 28, 28)) > 0.7).astype(np.uint8) * 255, np.arange(100) % 10))
    vd.write_video_dataset(tmp_path / "v", n_train=24, n_val=6, n_test=6, log=lambda *a: None)

    def run(kind, out, feature_dim=16):
        return RunConfig(
            model=ModelConfig(model=kind, size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=1, pad_token_id=None,
                              context_length=8, candidate="frames", feature_dim=feature_dim,
                              ebt=recipe("s1", alpha=1.0, alpha_lr_mult=3.0) if kind == "ebt" else None),
            data=DataConfig(data_dir=str(tmp_path / "v"), features="pca", feature_dim=16),
            train=TrainConfig(out_dir=str(out), steps=6, batch_size=8, warmup_steps=2, eval_every=3, eval_windows=16,
                              device="cpu", progress=False))

    train(run("ebt", tmp_path / "e"), log=lambda *a: None)
    train(run("transformer", tmp_path / "t"), log=lambda *a: None)
    assert (tmp_path / "e" / "checkpoint" / "features" / "features.safetensors").is_file()
    with pytest.raises(ConfigError, match="encoded to 16 features"):
        train(run("ebt", tmp_path / "x", feature_dim=12), log=lambda *a: None)
    rep = video_report(tmp_path / "e", baseline=tmp_path / "t", think_steps=[1, 3], split="test", clips=6,
                       out_dir=tmp_path / "eval", log=lambda *a: None)
    assert [r.get("steps") for r in rep["rows"]] == [1, 3, None]
    for r in rep["rows"]:
        assert len(r["rollout"]["mse_per_step"]) == 8 and r["mse"] > 0 and r["frames"] > 0
    for png in rep["png"]:
        assert open(png, "rb").read(4) == b"\x89PNG"
    md = (tmp_path / "eval" / "video_eval.md").read_text()
    assert md.count("| ebt |") == 2 and "| transformer |" in md and "bounce" in md
    assert json.loads((tmp_path / "eval" / "video_eval.json").read_text())["split"] == "test"

    # `ebt eval` names every file it wrote, each with what it holds
    from ebt.cli import main

    capsys.readouterr()
    main(["eval", str(tmp_path / "e"), "--think-steps", "1", "--video-split", "test", "--device", "cpu",
          "--out-dir", str(tmp_path / "cli"), "--json", str(tmp_path / "v.json")])
    out = capsys.readouterr().out.splitlines()
    listed, d = out[out.index("files written:") + 1:], tmp_path / "cli"
    names = ("video_eval.md", "video_eval.json", "energy_along_clips.png", "frames.png")
    assert [line.split()[0] for line in listed] == [str(d / f) for f in names] + [str(tmp_path / "v.json")]
    assert listed[0].endswith("  next-frame and rollout errors (Markdown)")
    assert listed[2].endswith("  figure: energy along clips, bounces marked")
    assert listed[-1].endswith("  this report as JSON (--json)")
    for line in listed:
        assert Path(line.split()[0]).stat().st_size > 0


def test_frames_with_the_s2_recipe_and_replay():
    m = frames_model(rand_steps=2, rand_steps_min=2, detach=False, truncate=True, loss_last_only=True,
                     alpha_rand_scale=2.0, langevin=0.1, replay_buffer=6).train()
    w = torch.randn(4, 9, F, dtype=torch.float64)
    m(w)["loss"].backward()
    out = m(w)
    assert float(out["replay_rows"]) == 2 and m.replay.windows.dtype == torch.float64
    assert m.replay.windows.shape == (6, 9, F) and m.replay.logits.shape == (6, 8, F)


def test_written_lines_align_paths_and_say_what_each_holds():
    from ebt.plots import written_lines

    files = {"out/a.md": "the table (Markdown)", "out/figure.png": "figure: a plot"}
    assert written_lines(files) == ["files written:", "  out/a.md        the table (Markdown)",
                                    "  out/figure.png  figure: a plot"]
    assert written_lines(files, "r.json")[-1] == "  r.json          this report as JSON (--json)"
