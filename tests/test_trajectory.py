"""Whole training runs against the official trainer: ../shared/reference/official_trajectory_*.safetensors
(format in that folder's README.md) replayed through the optimizer, schedule and step `ebt train` runs."""

import pytest

from ebt.compat.official import check_reference, load_reference, trainer_config
from ebt.config import TrainConfig

TRAJECTORIES = ["ebt_s1", "transformer"]


@pytest.mark.parametrize("name", TRAJECTORIES)
def test_trajectory_matches_official(reference_dir, name):
    path = reference_dir / f"official_trajectory_{name}.safetensors"
    meta, t = load_reference(path)
    rows = dict(check_reference(path))
    expected = {k for k in t if k.startswith("final.") and k != "final.langevin_dynamics_noise_std"}
    for k in range(meta["steps"]):
        expected |= {f"step{k}.{what}" for what in ("loss", "lr", "grad_norm")}
        expected |= {f"step{k}.final_step_loss"} & set(t)
    assert expected <= set(rows), expected - set(rows)  # every step and every final weight is compared
    assert max(rows.values()) < 1e-9, {k: v for k, v in rows.items() if not v < 1e-9}


def test_trajectory_rows_catch_a_wrong_schedule(reference_dir, monkeypatch):
    # the previous schedule (cosine one step behind) must show up in the lr and final-weight rows
    import ebt.train as tr

    real = tr.lr_factor
    monkeypatch.setattr(tr, "lr_factor", lambda step, *a, **k: real(max(0, step - 1), *a, **k))
    rows = dict(check_reference(reference_dir / "official_trajectory_transformer.safetensors"))
    assert rows["step1.lr"] > 0.1 and max(v for k, v in rows.items() if k.startswith("final.")) > 1e-6


def test_trainer_config_from_official_hparams(reference_dir):
    meta, _ = load_reference(reference_dir / "official_trajectory_ebt_s1.safetensors")
    hp = {**meta["hparams"], "warm_up_base_lr_divider": 8.0, "gradient_clip_val": 0.0, "min_lr_scale": 4,
          "max_scheduling_steps": -1, "beta1": 0.8, "beta2": 0.95, "weight_decay": 0.1}
    cfg = trainer_config({**meta, "hparams": hp})
    assert isinstance(cfg, TrainConfig) and cfg.precision == "fp64" and cfg.device == "cpu"
    assert (cfg.warmup_base_lr_divider, cfg.grad_clip, cfg.min_lr_ratio) == (8.0, 0.0, 0.25)
    assert cfg.steps == meta["steps"]  # max_scheduling_steps -1: the run's length
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.lr) == (0.8, 0.95, 0.1, hp["peak_learning_rate"])
    assert not cfg.decay_matrices_only  # the official groups
