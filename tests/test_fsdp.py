"""FSDP2 training (ebt/fsdp.py) on CPU with 2 gloo processes: the same weights as DDP (EBT, second-order
graph included) and as one process (Transformer++), and bit-for-bit resume from a gathered checkpoint."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train import _free_port, run_config, tiny_data  # noqa: F401  (the fixture)

from ebt.errors import ConfigError
from ebt.fsdp import fully_shard_fn
from ebt.train import train

needs_fsdp2 = pytest.mark.skipif(fully_shard_fn() is None, reason=f"--fsdp needs torch >= 2.7, this is {torch.__version__}")


def weights(run_dir):
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def cli_train(data_dir, out, model, nproc=1, *extra):
    common = ["--data", str(data_dir), "--model", model, "--size", "4xs", "--n-layer", "1", "--d-model", "32",
              "--n-head", "2", "--context-length", "16", "--steps", "4", "--batch-size", "4", "--warmup-steps", "2",
              "--eval-every", "2", "--eval-windows", "0", "--eval-batch-size", "3", "--device", "cpu",
              "--precision", "fp64", "--no-progress", "--seed", "3", "--out", str(out), *extra]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                                      "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    cmd = [sys.executable, *launcher, "-m", "ebt.cli", "train", *common]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if r.returncode:
        open("/tmp/w8/pytest_fail.log", "w").write(r.stdout + "\n=====\n" + r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "final_metrics.json").read_text()) if (out / "final_metrics.json").is_file() else None


def same(a, b, atol=1e-10):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


def test_fsdp_needs_several_processes(tiny_data, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node"):
        train(run_config(tiny_data[0], tmp_path / "r", fsdp=True), log=lambda *a: None)
    from ebt.config import TrainConfig
    from ebt.fsdp import check_fsdp

    if fully_shard_fn() is not None:  # accepted (where this torch has FSDP2; otherwise see the next test)
        check_fsdp(2, TrainConfig(fsdp=True))
    with pytest.raises(ConfigError, match="ebt-grad full"):
        check_fsdp(2, TrainConfig(fsdp=True, ebt_grad="jvp"))
    with pytest.raises(ConfigError, match="--compile"):
        check_fsdp(2, TrainConfig(fsdp=True, compile=True))


def test_fsdp_on_a_torch_without_fsdp2_says_which_torch(monkeypatch):
    """torch 2.4-2.5 have no public fully_shard and 2.6 has no ignored_params (an EBT's 0-d step size
    stays whole): the run stops before sharding, naming the torch it needs, not with an ImportError."""
    import torch.distributed.fsdp as fsdp_mod

    from ebt.config import TrainConfig
    from ebt.fsdp import check_fsdp

    def fully_shard(module, *, mesh=None, reshard_after_forward=True):  # torch 2.6's signature, abridged
        return module

    monkeypatch.setattr(fsdp_mod, "fully_shard", fully_shard, raising=False)
    with pytest.raises(ConfigError, match=r"needs torch >= 2\.7 .* this is torch " + re.escape(torch.__version__)):
        check_fsdp(2, TrainConfig(fsdp=True))
    monkeypatch.delattr(fsdp_mod, "fully_shard")
    with pytest.raises(ConfigError, match=r"needs torch >= 2\.7"):
        check_fsdp(2, TrainConfig(fsdp=True))


@pytest.mark.slow
@needs_fsdp2
def test_fsdp_ebt_matches_ddp_and_resumes(tiny_data, tmp_path):  # noqa: F811
    """S1 EBT: every step differentiates the energy with create_graph inside the forward and the loss's
    backward goes through that graph; FSDP2 (one unit, unsharded from forward to backward) must give
    DDP's weights. (Not the single process's: each rank draws its own random candidates.)"""
    data_dir = tiny_data[0]
    fa = cli_train(data_dir, tmp_path / "ddp", "ebt", 2)
    fb = cli_train(data_dir, tmp_path / "fsdp", "ebt", 2, "--fsdp")
    assert same(weights(tmp_path / "ddp"), weights(tmp_path / "fsdp"))
    assert fb["val"]["loss"] == pytest.approx(fa["val"]["loss"], rel=1e-9)
    assert weights(tmp_path / "fsdp")["alpha"].item() != 500.0  # the unsharded scalar alpha was trained
    # stop half-way and resume under FSDP: the gathered checkpoint restores weights and optimizer exactly
    cli_train(data_dir, tmp_path / "resumed", "ebt", 2, "--fsdp", "--stop-at", "2")
    opt = torch.load(tmp_path / "resumed" / "checkpoint" / "optimizer.pt", weights_only=False)["optimizer"]
    assert all(isinstance(k, str) for k in opt["state"])  # saved by parameter name, full tensors
    cli_train(data_dir, tmp_path / "resumed", "ebt", 2, "--fsdp", "--resume")
    assert same(weights(tmp_path / "fsdp"), weights(tmp_path / "resumed"), atol=0)


@pytest.mark.slow
@needs_fsdp2
def test_fsdp_transformer_matches_one_process(tiny_data, tmp_path):  # noqa: F811
    data_dir = tiny_data[0]
    cli_train(data_dir, tmp_path / "single", "transformer", 1)
    cli_train(data_dir, tmp_path / "fsdp", "transformer", 2, "--fsdp")
    assert same(weights(tmp_path / "single"), weights(tmp_path / "fsdp"))
