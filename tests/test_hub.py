"""Hub folders (ebt/hub.py): save_pretrained / from_pretrained round trip, the model card, `ebt export`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ebt.config import DataConfig, ModelConfig, RunConfig, TrainConfig, recipe
from ebt.errors import CheckpointError, ConfigError
from ebt.hub import HUB_FILES, HubMixin, export_run, from_pretrained, load_tokenizer, save_pretrained
from ebt.models import EBT, Transformer, build_model
from ebt.runtime import seeded
from ebt.think import ThinkConfig, think


def tiny_data(root: Path) -> Path:
    """A prepared dataset (train/val/ood and its tokenizer) in root/data."""
    from test_train import TEXT

    from ebt.data.shards import write_shards
    from ebt.data.tokenizers import get_tokenizer

    tok = get_tokenizer("bpe", root / "cache", texts=TEXT, vocab_size=280)
    for split, docs in (("train", TEXT[:40]), ("val", TEXT[40:44]), ("ood", TEXT[44:])):
        write_shards(docs, tok, root / "data", split)
    tok.save(root / "data" / "tokenizer")
    return root / "data"


def tiny_runs(root: Path) -> dict[str, Path]:
    """A Transformer++ and an EBT (S2 recipe) trained for a few steps: {"transformer": run, "ebt": run}."""
    from ebt.data.loader import TokenData
    from ebt.train import train

    data = tiny_data(root)
    probe = TokenData(data, "train", 1)
    runs = {}
    for kind in ("transformer", "ebt"):
        ebt = recipe("s2", replay_buffer=0, langevin=0.5) if kind == "ebt" else None
        model = ModelConfig(model=kind, size="4xs", n_layer=1, d_model=32, n_head=2, context_length=16,
                            vocab_size=probe.vocab_size, pad_token_id=probe.pad_id, ebt=ebt)
        out = root / kind
        tcfg = TrainConfig(out_dir=str(out), steps=3, batch_size=4, warmup_steps=1, eval_every=3,
                           eval_windows=4, eval_batch_size=4, log_every=1, device="cpu", precision="fp32",
                           progress=False, seed=1)
        run = RunConfig(model=model, data=DataConfig(data_dir=str(data)), train=tcfg)
        train(run, log=lambda *a, **k: None)
        runs[kind] = out
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("hub"))


def ebt_cli(*args):
    return subprocess.run([sys.executable, "-m", "ebt.cli", *map(str, args)], capture_output=True, text=True)


def outputs(model, tokens):
    """Next-token logits of a Transformer++, or an EBT's thinking (seeded: its random starts repeat)."""
    if not hasattr(model, "energy_from"):
        with torch.no_grad():
            return model.logits(tokens)
    with seeded(3, torch.device("cpu")):
        return think(model, tokens, ThinkConfig(steps=2, candidates=2)).z


@pytest.mark.parametrize("kind", ["transformer", "ebt"])
def test_export_round_trip_keeps_weights_outputs_and_tokenizer(runs, tmp_path, kind):
    out = tmp_path / "export"
    r = ebt_cli("export", runs[kind], "--out", out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(HUB_FILES)
    original, loaded = from_pretrained(runs[kind]), from_pretrained(out)
    assert type(loaded) is type(original)
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.tensor([[5, 9, 2, 7, 11, 3]])
    assert torch.equal(outputs(original, tokens), outputs(loaded, tokens))
    tok, run_tok = load_tokenizer(out), load_tokenizer(runs[kind])
    text = "The quick brown fox speaks of ships."
    assert tok.encode(text) == run_tok.encode(text) and tok.eos_id == run_tok.eos_id
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == kind and cfg["library_name"] == "ebt" and cfg["train"]["steps"] == 3
    hf_tok = json.loads((out / "tokenizer_config.json").read_text())
    assert hf_tok["eos_token"] == "<|endoftext|>" and hf_tok["model_max_length"] == 16
    # the weights are checked on load: a changed byte is refused
    w = bytearray((out / "model.safetensors").read_bytes())
    w[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(w))
    with pytest.raises(CheckpointError, match="fails its sha256 check"):
        from_pretrained(out)


def test_model_card_says_what_was_trained_on_what_and_how_well(runs, tmp_path):
    run = runs["ebt"]
    evaluated = {"results": {"val": {"loss": 2.5, "ppl": 12.18, "tokens": 640}}}  # `ebt eval --json`'s form
    (run / "eval.json").write_text(json.dumps(evaluated))
    try:
        out = save_pretrained(from_pretrained(run), tmp_path / "card_ebt", run=run)
    finally:
        (run / "eval.json").unlink()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: ebt\n") and "pipeline_tag: text-generation" in card
    assert "An Energy-Based Transformer (EBT) trained with the `ebt` library" in card
    assert "| recipe | `s2` with langevin 0.5, replay_buffer 0 |" in card
    assert "| size | 4xs: 1 layer, d_model 32, 2 heads |" in card
    params = sum(p.numel() for p in from_pretrained(run).parameters())
    assert f"| parameters | {params:,} |" in card
    assert f"- data: `{run.parent / 'data'}` (packed windows)" in card
    assert "- trained for 3 steps, 192 tokens" in card
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [row for row in val if row["split"] == "val"][-1]
    assert f"| val | 3 | {val['loss']:.4f} |" in card
    assert "| val | 2.5000 | 12.1800 | 640 |" in card  # from eval.json
    assert 'model = from_pretrained("card_ebt")' in card


def test_model_card_python_example_runs(runs, tmp_path):
    out = save_pretrained(from_pretrained(runs["transformer"]), tmp_path / "tpp", run=runs["transformer"])
    code = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The")


def test_save_pretrained_without_a_run_and_the_mixin(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=50, context_length=8)
    model = build_model(cfg)
    out = save_pretrained(model, tmp_path / "bare")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    assert "Not recorded (the model was saved without its run)." in card
    assert "No metrics were recorded with this model." in card
    # the mixin's classmethod returns the model only as the class asked for
    loaded = HubMixin.from_pretrained.__func__(Transformer, out)
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded.logits(x), model.logits(x))
    with pytest.raises(ConfigError, match="holds a Transformer model, not EBT"):
        HubMixin.from_pretrained.__func__(EBT, out)


def test_export_refuses_a_foreign_folder_and_replaces_its_own(runs, tmp_path):
    foreign = tmp_path / "clone"
    foreign.mkdir()
    (foreign / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (foreign / "notes.txt").write_text("mine\n")
    r = ebt_cli("export", runs["transformer"], "--out", foreign)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (f"{foreign} is not empty and was not written by `ebt export` (it holds .gitattributes, "
            f"notes.txt); choose a new or empty folder") in r.stderr
    assert sorted(p.name for p in foreign.iterdir()) == [".gitattributes", "notes.txt"]
    # a run's checkpoint folder is not an export either (optimizer state would be lost)
    r = ebt_cli("export", runs["transformer"], "--out", runs["transformer"] / "checkpoint")
    assert r.returncode == 2 and "was not written by `ebt export`" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    out = export_run(runs["transformer"], empty)
    before = (out / "config.json").read_text()
    export_run(runs["ebt"], out)  # an earlier export is replaced
    after = (out / "config.json").read_text()
    assert json.loads(before)["model_type"] == "transformer" and json.loads(after)["model_type"] == "ebt"
    assert not (tmp_path / "empty.tmp").exists() and not (tmp_path / "empty.old").exists()


def test_export_help_has_an_example(capsys):
    from ebt.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["export", "--help"])
    assert e.value.code == 0
    assert "ebt export runs/demo/ebt --out exports/ebt_demo" in capsys.readouterr().out


def test_model_card_names_images_and_frames_not_tokens(tmp_path):
    from ebt.hub import _data_section

    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer_state.json").write_text('{"step": 5, "tokens_seen": 320}')
    train = {"steps": 5, "batch_size": 64, "lr": None, "warmup_steps": 1, "seed": 0, "precision": "fp32"}
    for candidate, row, unit in (("image", "images", "images"), ("frames", "clips", "frames"),
                                 ("tokens", "sequences", "tokens")):
        card = _data_section({"data": {"data_dir": str(tmp_path)}, "train": train,
                              "model": {"candidate": candidate}}, tmp_path)
        assert f"5 steps of 64 {row}," in card and f"trained for 5 steps, 320 {unit}" in card
