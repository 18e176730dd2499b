"""Checkpoints as the official trainer writes them: read without unpickling, every setting that matters
mapped, only what the library lacks refused, and the converted model computing the official outputs."""

import subprocess
import sys

import pytest
import torch

from ebt.compat.official import check_checkpoint, load_reference, read_official
from ebt.errors import CheckpointError
from ebt.models import from_pretrained

CKPT = "official_checkpoint_ebt_s2.ckpt"


def variant(reference_dir, tmp_path, **hparams):
    """The bundled official checkpoint with some hyperparameters changed."""
    ckpt = torch.load(reference_dir / CKPT, weights_only=True)
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], **hparams}
    torch.save(ckpt, tmp_path / "v.ckpt")
    return tmp_path / "v.ckpt"


def test_the_official_s2_checkpoint_computes_the_official_outputs(reference_dir):
    rows = dict(check_checkpoint(reference_dir / CKPT))
    assert set(rows) == {f"step{k}.{t}" for k in range(3) for t in ("logits", "energy")}
    assert max(rows.values()) < 1e-4, rows


def test_convert_maps_the_official_settings(reference_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ebt.cli", "convert-official", str(reference_dir / CKPT),
                        str(tmp_path / "conv")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    e = from_pretrained(tmp_path / "conv").cfg.ebt
    hp = torch.load(reference_dir / CKPT, weights_only=True)["hyper_parameters"]
    assert (e.replay_buffer, e.replay_fraction) == (hp["mcmc_replay_buffer_size"],
                                                    hp["mcmc_replay_buffer_sample_bs_percent"])
    assert (e.landscapes, e.rand_steps, e.rand_steps_min, e.alpha, e.langevin, e.detach, e.truncate) == \
        (1, 2, 2, 5.0, 3.0, False, True)
    cfg, _ = read_official(variant(reference_dir, tmp_path, mcmc_replay_buffer_size=64,
                                   mcmc_replay_buffer_sample_bs_percent=0.25, randomize_mcmc_num_steps_min=0))
    assert (cfg.ebt.replay_buffer, cfg.ebt.replay_fraction, cfg.ebt.rand_steps_min) == (64, 0.25, 1)
    cfg, _ = read_official(variant(reference_dir, tmp_path, ffn_dim_multiplier=1, mcmc_replay_buffer=False))
    assert cfg.ebt.replay_buffer == 0


def test_only_settings_the_library_lacks_are_refused(reference_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"not implemented here: \{'ffn_dim_multiplier': 4\}"):
        read_official(variant(reference_dir, tmp_path, ffn_dim_multiplier=4))
    with pytest.raises(CheckpointError, match="not implemented here: {'contrastive_loss': True}"):
        read_official(variant(reference_dir, tmp_path, contrastive_loss=True))
    # initialisation settings do not matter to trained weights
    read_official(variant(reference_dir, tmp_path, weight_initialization_method="he"))


def test_a_transformer_checkpoint_ignores_the_ebt_settings(reference_dir, tmp_path):
    meta, t = load_reference(reference_dir / "official_transformer_small.safetensors")
    state = {"model." + k[6:]: v for k, v in t.items() if k.startswith("param.")}
    hp = {**meta["hparams"], "normalize_initial_condition": False, "ffn_dim_multiplier": None}
    torch.save({"state_dict": state, "hyper_parameters": hp}, tmp_path / "tpp.ckpt")
    cfg, model = read_official(tmp_path / "tpp.ckpt")
    assert cfg.model == "transformer"
    logits = model.double().logits(t["input.tokens"][:, :-1])
    assert (logits - t["logits"]).abs().max() / t["logits"].abs().max() < 1e-5  # float32 weights


@pytest.mark.slow
def test_check_reference_without_arguments_checks_every_bundled_case(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ebt.cli", "check-reference"], capture_output=True, text=True,
                       cwd=tmp_path)  # from any folder
    assert r.returncode == 0, r.stdout + r.stderr
    checked = [line for line in r.stdout.splitlines() if "worst relative error" in line]
    assert len(checked) == 7 and any(CKPT in line and "tolerance 1e-04" in line for line in checked)
    assert r.stdout.rstrip().endswith("all 7 file(s) within tolerance")
