"""Training loop: schedule, groups, resume bit for bit, DDP and accumulation equivalence, checkpoints, bad input."""

import errno
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ebt.checkpoint import save_checkpoint
from ebt.models import load_model
from ebt.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ebt.errors import CheckpointError, ConfigError
from ebt.evaluate import evaluate_lm
from ebt.models import build_model, from_pretrained
from ebt.train import TrainingError, lr_factor, param_groups, train

TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3 + f"Document number {i} speaks of {w} and more {w}."
    for i, w in enumerate(["kings", "queens", "rivers", "mountains", "ships", "stars", "bread", "wine"] * 6)
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from ebt.data.shards import write_shards
    from ebt.data.tokenizers import get_tokenizer

    root = tmp_path_factory.mktemp("data")
    tok = get_tokenizer("bpe", root / "cache", texts=TEXT[:40], vocab_size=300)
    write_shards(TEXT[:40], tok, root, "train")
    write_shards(TEXT[40:44], tok, root, "val")
    write_shards(TEXT[44:], tok, root, "ood")
    return root, tok


def run_config(data_dir, out, **train_kw):
    from ebt.data.loader import TokenData

    probe = TokenData(data_dir, "train", 1)
    kw = dict(out_dir=str(out), steps=6, batch_size=4, warmup_steps=2, eval_every=3, eval_windows=None,
              eval_batch_size=3, log_every=2, device="cpu", precision="fp32", progress=False, seed=1)
    kw.update(train_kw)
    return RunConfig(
        model=ModelConfig(size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=probe.vocab_size,
                          context_length=16, pad_token_id=probe.pad_id),
        data=DataConfig(data_dir=str(data_dir)),
        train=TrainConfig(**kw),
    )


def weights(run_dir):
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def official_lr(k, peak, W, divider, total, eta):
    """The official trainer's lr at optimizer step k (from 0) for a group of peak `peak`, written out from
    optimization.py: its scheduler has stepped once when built, so step k runs at t = k + 1; warm-up
    peak * t / W (from 0) or peak / d + (peak - peak / d) * t / W; then CosineAnnealingLR at epoch t - W."""
    t = k + 1
    if W and t <= W:
        return peak * t / W if divider == -1 else peak / divider + (peak - peak / divider) * t / W
    return eta + (peak - eta) * (1 + math.cos(math.pi * (t - W) / (total - W))) / 2


def schedule(model, **kw):
    """The lr of every group at each of cfg.steps optimizer steps, as make_optimizer schedules them."""
    from ebt.train import make_optimizer

    cfg = TrainConfig(**kw)
    opt, sched = make_optimizer(model, cfg, 1e-3, torch.device("cpu"))
    out = []
    for _ in range(cfg.steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("divider", [-1, 10.0, 0.5])
@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_lr_schedule_is_the_official_one(divider, warmup):
    model = build_model(ModelConfig(size="4xs", n_layer=1, d_model=16, n_head=2, vocab_size=16,
                                    context_length=8))
    got = schedule(model, steps=12, warmup_steps=warmup, warmup_base_lr_divider=divider, min_lr_ratio=0.2)
    want = [official_lr(k, 1e-3, warmup, divider, 12, 2e-4) for k in range(12)]
    assert [g[0] for g in got] == pytest.approx(want, rel=1e-12, abs=0)
    assert got[-1][0] == pytest.approx(2e-4, rel=1e-12)  # the last step runs at the floor


def test_lr_schedule_written_out():
    # from 0: 1/W at the first step (the official scheduler steps once when built), the peak at step W-1
    assert [lr_factor(k, 4, 20, 0.1) for k in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # from peak / 10
    assert [lr_factor(k, 2, 20, 0.1, divider=10) for k in range(2)] == pytest.approx([0.55, 1.0])
    # the cosine is one step into its phase at the first step after warm-up; the floor at the last step
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 16)) / 2)
    assert lr_factor(11, 4, 20, 0.1) == pytest.approx(0.55)
    assert lr_factor(19, 4, 20, 0.1) == pytest.approx(0.1)
    # a group at 1500 x the peak decays towards the run's floor (peak * 0.1), not towards its own peak * 0.1
    assert 1500 * lr_factor(19, 4, 20, 0.1, mult=1500) == pytest.approx(0.1)
    assert 1500 * lr_factor(11, 4, 20, 0.1, mult=1500) == pytest.approx(0.1 + (1500 - 0.1) / 2)
    with pytest.raises(ConfigError, match="warmup_base_lr_divider"):
        TrainConfig(warmup_base_lr_divider=0.0)


def test_alpha_lr_decays_to_the_runs_floor():
    model = build_model(ModelConfig(model="ebt", size="4xs", n_layer=1, d_model=16, n_head=2, vocab_size=16,
                                    context_length=8))
    got = schedule(model, steps=10, warmup_steps=3, warmup_base_lr_divider=-1, min_lr_ratio=0.1)
    names = [g["name"] for g in make_groups(model)]
    assert names == ["decay", "alpha"]
    mult = model.cfg.ebt.alpha_lr_mult
    want = [official_lr(k, 1e-3 * mult, 3, -1, 10, 1e-4) for k in range(10)]
    assert [g[1] for g in got] == pytest.approx(want, rel=1e-12, abs=0)
    assert got[-1] == pytest.approx([1e-4, 1e-4], rel=1e-12)  # one eta_min for every group


def make_groups(model, **kw):
    return param_groups(model, 0.01, **kw)


@pytest.mark.parametrize("model_name", ["transformer", "ebt"])
def test_param_groups_decay_everything_but_alpha(model_name):
    model = build_model(ModelConfig(model=model_name, size="4xs", vocab_size=64, context_length=8))
    groups = {g["name"]: g for g in make_groups(model)}
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.01
    named = dict(model.named_parameters())
    assert id(named["tok_emb.weight"]) in decayed and id(named["backbone.norm.weight"]) in decayed  # official
    assert all(id(p) in decayed for n, p in named.items() if n != "alpha")
    if model_name == "ebt":
        assert groups["alpha"]["params"] == [model.alpha] and groups["alpha"]["weight_decay"] == 0.0
    assert set(groups) == ({"decay", "alpha"} if model_name == "ebt" else {"decay"})


def test_param_groups_decay_only_matrices_opt_in():
    model = build_model(ModelConfig(size="4xs", vocab_size=64, context_length=8))
    groups = {g["name"]: g for g in make_groups(model, matrices_only=True)}
    assert groups["decay"]["weight_decay"] == 0.01 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in groups["decay"]["params"])
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])  # the RMSNorm scales
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_training_lowers_loss_and_writes_run(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    final = train(run_config(data_dir, tmp_path / "run", steps=30, eval_every=10, lr=3e-3), log=lambda *a: None)
    hist = final["history"]
    assert hist[0]["step"] == 0 and hist[-1]["step"] == 30
    assert hist[-1]["loss"] < hist[0]["loss"] - 1.0
    assert "ood" in final and final["ood"]["tokens"] > 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {x["split"] for x in lines} == {"train", "val", "ood"}
    assert all(k in lines[1] for k in ("loss", "lr", "grad_norm", "tokens_per_s"))
    saved = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert saved["model"]["d_model"] == 32 and saved["train"]["steps"] == 30
    assert (tmp_path / "run" / "checkpoint" / "tokenizer" / "tokenizer.json").is_file()
    model = from_pretrained(tmp_path / "run")  # a run directory resolves to its checkpoint
    again = evaluate_lm(model, __import__("ebt.data.loader", fromlist=["x"]).TokenData(data_dir, "val", 16), 3)
    assert again["loss"] == pytest.approx(final["val"]["loss"], rel=1e-6)


def test_resume_is_bit_for_bit(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    train(run_config(data_dir, tmp_path / "a"), log=lambda *a: None)
    train(run_config(data_dir, tmp_path / "b", stop_at=3), log=lambda *a: None)
    assert json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    train(run_config(data_dir, tmp_path / "b"), resume=True, log=lambda *a: None)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = torch.load(tmp_path / "a" / "checkpoint" / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    ob = torch.load(tmp_path / "b" / "checkpoint" / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)


def test_a_run_resumed_mid_interval_logs_the_mean_of_the_steps_it_took(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    quiet = lambda *a: None  # noqa: E731
    train(run_config(data_dir, tmp_path / "each", log_every=1), log=quiet)
    train(run_config(data_dir, tmp_path / "b", stop_at=3), log=quiet)  # log_every 2: pauses mid-interval
    train(run_config(data_dir, tmp_path / "b"), resume=True, log=quiet)

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}

    each, b = losses("each"), losses("b")
    assert b[4] == pytest.approx(each[4], rel=1e-6)  # step 4 alone was summed after the resume at 3
    assert b[6] == pytest.approx((each[5] + each[6]) / 2, rel=1e-6)


def test_grad_accumulation_matches_full_batch(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    train(run_config(data_dir, tmp_path / "a", precision="fp64"), log=lambda *a: None)
    train(run_config(data_dir, tmp_path / "b", precision="fp64", grad_accum=2), log=lambda *a: None)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-10) for k in a)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tiny_data, tmp_path):
    """torchrun with 2 gloo processes and the same global batch gives the single-process weights."""
    data_dir, _ = tiny_data
    common = ["--data", str(data_dir), "--size", "4xs", "--n-layer", "1", "--d-model", "32", "--n-head", "2",
              "--context-length", "16", "--steps", "4", "--batch-size", "4", "--warmup-steps", "2",
              "--eval-every", "2", "--eval-windows", "0", "--eval-batch-size", "3", "--device", "cpu",
              "--precision", "fp64", "--no-progress", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "ebt.cli", "train", *common, "--out", str(tmp_path / "single")],
                   check=True, env=env, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                        "-m", "ebt.cli", "train", *common, "--out", str(tmp_path / "ddp")],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-10) for k in a)
    fa = json.loads((tmp_path / "single" / "final_metrics.json").read_text())
    fb = json.loads((tmp_path / "ddp" / "final_metrics.json").read_text())
    assert fb["val"]["tokens"] == fa["val"]["tokens"]  # both ranks' windows counted once
    assert fb["val"]["loss"] == pytest.approx(fa["val"]["loss"], rel=1e-9)


DDP_SCRIPT = """
import sys
from ebt.config import DataConfig, ModelConfig, RunConfig, TrainConfig, recipe
from ebt.train import leave_process_group, train
data, out, vocab, pad = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
train(RunConfig(
    model=ModelConfig(model="ebt", size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=vocab, context_length=16,
                      pad_token_id=pad, ebt=recipe("s1", init_scale=0.0)),
    data=DataConfig(data_dir=data),
    train=TrainConfig(out_dir=out, steps=3, batch_size=4, warmup_steps=1, eval_every=0, eval_windows=2,
                      eval_batch_size=2, device="cpu", precision="fp64", progress=False, seed=3, ebt_grad="jvp")),
    log=lambda *a: None)
leave_process_group()
"""


@pytest.mark.slow
def test_ebt_ddp_two_processes_match_single_process(tiny_data, tmp_path):
    """An EBT runs its own forward+backward (one unroll step's graph at a time); across ranks its
    gradients are averaged in one all-reduce. With deterministic starts (init_scale 0: the random
    candidate would otherwise be drawn per rank), 2 gloo processes give the single-process weights."""
    from ebt.data.loader import TokenData

    data_dir, _ = tiny_data
    probe = TokenData(data_dir, "train", 1)
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    args = [str(data_dir), "OUT", str(probe.vocab_size), str(probe.pad_id)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), *[str(tmp_path / "single") if a == "OUT" else a for a in args]],
                   check=True, env=env, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script),
                        *[str(tmp_path / "ddp") if a == "OUT" else a for a in args]],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-10


@pytest.mark.parametrize("method", ["double", "jvp", "explicit", "auto"])
def test_ebt_gradient_methods_train_to_the_same_weights(tiny_data, tmp_path, method):
    data_dir, _ = tiny_data
    run = ebt_config(data_dir, tmp_path / method, steps=2, eval_every=0, precision="fp64", ebt_grad=method)
    train(run, log=lambda *a: None)
    ref = ebt_config(data_dir, tmp_path / "ref", steps=2, eval_every=0, precision="fp64", ebt_grad="full")
    train(ref, log=lambda *a: None)
    a, b = weights(tmp_path / method), weights(tmp_path / "ref")
    assert all(torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-12) for k in a)


@pytest.mark.slow
def test_compiled_ebt_training_gives_the_same_weights(tiny_data, tmp_path):
    """--compile for an EBT: the written-out energy gradient and the loss gradient through torch.compile
    (training and validation), against the uncompiled whole-graph path."""
    data_dir, _ = tiny_data
    run = ebt_config(data_dir, tmp_path / "c", steps=2, eval_every=2, eval_windows=2, precision="fp64", compile=True)
    ref = ebt_config(data_dir, tmp_path / "ref", steps=2, eval_every=2, eval_windows=2, precision="fp64",
                     ebt_grad="full")
    for r in (run, ref):  # test_energy_grad's compiled shapes: a test session compiles them once for both
        r.model.n_layer, r.model.n_head, r.model.context_length = 2, 4, 12
    logs = []
    train(run, log=logs.append)
    assert any("written-out energy gradient" in line for line in logs)
    train(ref, log=lambda *a: None)
    a, b = weights(tmp_path / "c"), weights(tmp_path / "ref")
    assert all(torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-12) for k in a)
    val = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    val_ref = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in val if r["split"] == "val"]
    assert loss and loss == pytest.approx([r["loss"] for r in val_ref if r["split"] == "val"], rel=1e-9)


def test_auto_gradient_method_is_the_fastest_measured():
    from ebt.fast.plan import auto_grad_method

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_grad_method(cpu, False) == "explicit" and auto_grad_method(cuda, False) == "double"
    assert auto_grad_method(cuda, True) == "explicit"


def test_cuda_graph_and_gradient_method_options_are_checked(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    with pytest.raises(ConfigError, match="ebt_grad"):
        train(ebt_config(data_dir, tmp_path / "a", ebt_grad="reverse"), log=lambda *a: None)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(ebt_config(data_dir, tmp_path / "d", cuda_graph=True, steps=1, eval_every=0), log=lambda *a: None)
    assert not (tmp_path / "d" / "metrics.jsonl").exists()  # refused before any work


def test_validation_is_token_weighted(tiny_data):
    from ebt.data.loader import TokenData

    data_dir, _ = tiny_data
    torch.manual_seed(0)
    val = TokenData(data_dir, "val", 16)
    model = build_model(ModelConfig(size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=val.vocab_size,
                                    context_length=16, pad_token_id=val.pad_id))
    res = evaluate_lm(model, val, batch_size=4)  # the last batch is partial when windows % 4 != 0
    nll, n = 0.0, 0
    for i in range(val.num_windows):
        w = torch.as_tensor(val.window(i).astype("int64"))[None]
        out = model(w)
        nll, n = nll + float(out["nll_sum"]), n + int(out["n_tokens"])
    assert res["tokens"] == n and res["loss"] == pytest.approx(nll / n, rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-6)


def test_nonfinite_loss_stops_with_step(tiny_data, tmp_path, monkeypatch):
    import ebt.train as tr

    real = tr.build_model

    def poisoned(cfg):
        model = real(cfg)
        with torch.no_grad():
            model.head.weight[0, 0] = float("nan")
        return model

    monkeypatch.setattr(tr, "build_model", poisoned)
    with pytest.raises(TrainingError, match="non-finite at step 0.*learning rate"):
        train(run_config(data_dir := tiny_data[0], tmp_path / "nan"), log=lambda *a: None)
    assert data_dir


def test_bad_input_vocab_mismatch_and_existing_checkpoint(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    run = run_config(data_dir, tmp_path / "r", steps=2, eval_every=0)
    run.model.vocab_size += 1
    with pytest.raises(ConfigError, match="vocabulary mismatch"):
        train(run, log=lambda *a: None)
    train(run_config(data_dir, tmp_path / "r", steps=2, eval_every=0), log=lambda *a: None)
    before = weights(tmp_path / "r")
    with pytest.raises(CheckpointError, match="--resume"):
        train(run_config(data_dir, tmp_path / "r", steps=2, eval_every=0), log=lambda *a: None)
    other = run_config(data_dir, tmp_path / "r", steps=4, eval_every=0)
    other.model.d_model = 64
    with pytest.raises(CheckpointError, match="model config"):
        train(other, resume=True, log=lambda *a: None)
    after = weights(tmp_path / "r")
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match="multiple of world size"):
        train(run_config(data_dir, tmp_path / "q", batch_size=3, grad_accum=2), log=lambda *a: None)


def test_checkpoint_errors_and_atomic_save(tmp_path, monkeypatch):
    import ebt.checkpoint as ck

    cfg = ModelConfig(size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=40, context_length=8)
    model = build_model(cfg)
    config = {"model": __import__("dataclasses").asdict(cfg)}
    path = save_checkpoint(tmp_path / "ckpt", model, config)
    loaded = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    # a full disk while saving: clear error, the previous checkpoint untouched, no temp dir left
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left.*previous checkpoint there, if any, is untouched"):
        save_checkpoint(tmp_path / "ckpt", build_model(cfg), config)
    monkeypatch.undo()
    assert not (tmp_path / "ckpt.tmp").exists()
    again = load_model(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    # weights of another model
    other = dict(config)
    other["model"] = {**config["model"], "d_model": 64}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match="different model"):
        load_model(tmp_path / "ckpt")
    # corrupt weights and missing paths
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "ckpt")


def ebt_config(data_dir, out, rec="s1", **train_kw):
    from ebt.config import recipe

    run = run_config(data_dir, out, **train_kw)
    over = {"replay_buffer": 6} if rec == "s2" else {}
    run.model.model, run.model.ebt = "ebt", recipe(rec, **over)
    return run


def test_ebt_s1_trains_and_logs_thinking_metrics(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    final = train(ebt_config(data_dir, tmp_path / "s1", steps=8, lr=3e-3), log=lambda *a: None)
    assert math.isfinite(final["val"]["loss"]) and final["history"][-1]["loss"] < final["history"][0]["loss"]
    rec = [json.loads(x) for x in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rec if r["split"] == "train"]
    for key in ("ce_first", "ce_last", "energy_gap", "alpha", "grad_norm", "steps"):
        assert all(math.isfinite(r[key]) for r in train_rows), key
    assert train_rows[-1]["alpha"] != 500.0  # alpha is learned
    model = from_pretrained(tmp_path / "s1")
    assert model.cfg.ebt.landscapes == 2 and model.step_emb is not None


@pytest.mark.parametrize("rec", ["s1", "s2"])
def test_ebt_training_in_recycled_memory_gives_the_same_weights(tiny_data, tmp_path, monkeypatch, rec):
    """`ebt train` on CPU with every (B, S, V) tensor recycled (the size floor lifted for these tiny
    shapes) ends at the same weights as with fresh tensors, and holds no recycled memory afterwards."""
    import ebt.train
    from ebt.fast.memory import Recycler
    from ebt.fast.plan import resolve_plan

    class Recording(Recycler):
        def give(self, *tensors):
            given.extend(tensors)
            super().give(*tensors)

    def train_with(pool, out):  # the run's plan (resolved once, in ebt.train) with this memory
        monkeypatch.setattr(ebt.train, "resolve_plan", lambda *a, **kw: resolve_plan(*a, **kw, pool=pool))
        train(ebt_config(data_dir, out, rec, steps=4), log=lambda *a: None)

    data_dir, _ = tiny_data
    given, pool = [], Recording(min_bytes=0)
    train_with(pool, tmp_path / "a")
    assert given and pool.free == []
    train_with(Recycler(keep=0, min_bytes=0), tmp_path / "b")  # nothing recycled: fresh tensors only
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ebt_s2_resume_with_replay_buffer_is_bit_for_bit(tiny_data, tmp_path):
    """S2 draws step counts, alphas, noise and replayed rows: resuming restores RNG and replay exactly."""
    data_dir, _ = tiny_data
    train(ebt_config(data_dir, tmp_path / "a", "s2"), log=lambda *a: None)
    train(ebt_config(data_dir, tmp_path / "b", "s2", stop_at=3), log=lambda *a: None)
    saved = torch.load(tmp_path / "b" / "checkpoint" / "replay_rank0.pt", weights_only=False)
    assert saved["size"] == 6 and saved["logits"].shape[0] == 6  # bounded: 3 steps x 4 rows pushed, 6 kept
    train(ebt_config(data_dir, tmp_path / "b", "s2"), resume=True, log=lambda *a: None)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = torch.load(tmp_path / "a" / "checkpoint" / "replay_rank0.pt", weights_only=False)
    rb = torch.load(tmp_path / "b" / "checkpoint" / "replay_rank0.pt", weights_only=False)
    assert torch.equal(ra["logits"], rb["logits"]) and torch.equal(ra["windows"], rb["windows"])


def test_ebt_s2_with_cuda_graph_bookkeeping_trains_as_eager(tiny_data, tmp_path, monkeypatch):
    """`ebt train --cuda-graph` for System 2, its capture replaced by the CPU stand-in (tests/
    test_speed_paths.py): the same weights and replay buffer as eager training, through a stop, a
    checkpoint of the buffer's device cursor and a resume (which captures anew)."""
    import ebt.train
    from test_speed_paths import stand_in_capture

    data_dir, _ = tiny_data
    train(ebt_config(data_dir, tmp_path / "a", "s2"), log=lambda *a: None)
    made, real = [], ebt.train.CapturedStep

    def captured(*args, **kw):
        made.append(real(*args, capture=stand_in_capture, **kw))
        return made[-1]

    monkeypatch.setattr(ebt.train, "CapturedStep", captured)
    train(ebt_config(data_dir, tmp_path / "b", "s2", cuda_graph=True, stop_at=4), log=lambda *a: None)
    train(ebt_config(data_dir, tmp_path / "b", "s2", cuda_graph=True), resume=True, log=lambda *a: None)
    assert len(made) == 2 and all(m.graphs for m in made)  # each run captured once its buffer was full
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = torch.load(tmp_path / "a" / "checkpoint" / "replay_rank0.pt", weights_only=False)
    rb = torch.load(tmp_path / "b" / "checkpoint" / "replay_rank0.pt", weights_only=False)
    assert torch.equal(ra["logits"], rb["logits"]) and torch.equal(ra["windows"], rb["windows"])
    assert ra["next"] == rb["next"]
    ma = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    pick = lambda rows: [(r["step"], r["loss"], r["steps"]) for r in rows if r["split"] == "train"]  # noqa: E731
    assert pick(ma) == pick(mb)


def test_ebt_nonfinite_names_step_and_alpha(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    run = ebt_config(data_dir, tmp_path / "nan")
    run.model.ebt.alpha = 1e300  # candidate logits overflow
    with pytest.raises(TrainingError, match="non-finite at step 0: .*alpha is too large"):
        train(run, log=lambda *a: None)


def test_a_run_shorter_than_its_warmup_is_warned_about(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    lines = []
    train(run_config(data_dir, tmp_path / "r", steps=3, warmup_steps=10, eval_every=0), log=lines.append)
    assert any(line.startswith("warning: --warmup-steps 10 is not below --steps 3: the learning rate only warms up "
                               "(its last step at 30% of the peak)") for line in lines), lines
    lines.clear()
    train(run_config(data_dir, tmp_path / "q", steps=3, warmup_steps=1, eval_every=0), log=lines.append)
    assert not any("warm" in line for line in lines)


@pytest.mark.parametrize("over", [{}, {"langevin": 0.0, "replay_buffer": 0, "alpha_rand_scale": 1.0},
                                  {"rand_steps": 0, "rand_steps_min": 0, "langevin": 0.0,
                                   "alpha_rand_scale": 1.0}])
def test_s2_cuda_graph_is_refused_on_a_gpu_until_proven_there(over):
    """System 2's capture failed on the H200 (issue 23): `--cuda-graph` with any of its random parts is
    refused on CUDA in one line (checked before anything touches the device); S1 and the CPU stand-in
    are not."""
    from ebt.config import ModelConfig, TrainConfig, recipe
    from ebt.fast.cuda_graph import UNPROVEN, draws_in_step
    from ebt.models import build_model
    from ebt.train import step_functions

    e = recipe("s2", **over)
    assert draws_in_step(e) and not draws_in_step(recipe("s1")) and not draws_in_step(None)
    model = build_model(ModelConfig(model="ebt", size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=50,
                                    context_length=8, ebt=e))
    with pytest.raises(ConfigError) as err:
        step_functions(model, TrainConfig(cuda_graph=True), 1, torch.device("cuda"), True, lambda *a: None)
    assert str(err.value) == UNPROVEN and "\n" not in UNPROVEN
