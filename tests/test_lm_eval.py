"""lm-evaluation-harness adapter (ebt/integrations/lm_eval.py): an EBT and a Transformer++ scored on local
tasks through lm_eval itself, each score checked against the same computation done directly with the library.
Offline: the tasks read local JSONL files (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE set while they run)."""

import json
import subprocess
import sys

import pytest
import torch

from ebt.fast.plan import resolve_plan

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[lm_eval]' (or '.[dev]')")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from ebt.errors import ConfigError  # noqa: E402
from ebt.generate import GenerateConfig, generate  # noqa: E402
from ebt.hub import from_pretrained, load_tokenizer  # noqa: E402
from ebt.integrations.lm_eval import EBTLM  # noqa: E402  (importing it registers the model "ebt")
from ebt.runtime import seeded  # noqa: E402
from ebt.think import ThinkConfig, think  # noqa: E402

SEED = 7
MC = [("The quick brown fox", ["jumps", "kings", "bread"], 0),
      ("Document number 3 speaks of", ["ships", "the", "dog"], 0),
      ("over the lazy", ["dog", "wine", "stars"], 0),
      ("and more", ["rivers", "fox", "quick"], 0),
      ("The quick brown", ["fox", "ships", "more"], 0),
      ("speaks of kings and more", ["kings", "lazy", "over"], 0)]
TEXTS = ["The quick brown fox.",  # fits one window of the models' 16 tokens
         "The quick brown fox jumps over the lazy dog. Document number 9 speaks of wine and more wine."]


def write_tasks(root):
    """Three local tasks over JSONL files: multiple choice, rolling perplexity, generation."""
    with open(root / "mc.jsonl", "w") as f:
        for q, choices, answer in MC:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    with open(root / "ppl.jsonl", "w") as f:
        for t in TEXTS:
            f.write(json.dumps({"text": t}) + "\n")
    data = ("dataset_path: json\ntest_split: test\n"
            "dataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n    test: {file}\n")
    specs = {
        "ebt_tiny_mc": ("mc.jsonl", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
                        'metric_list:\n  - metric: acc\n'),
        "ebt_tiny_ppl": ("ppl.jsonl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                         'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'),
        "ebt_tiny_gen": ("mc.jsonl", 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
                         'doc_to_target: "{{choices[answer]}}"\ngeneration_kwargs:\n  until: ["."]\n'
                         '  max_gen_toks: 4\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n'),
    }
    for name, (file, body) in specs.items():
        source = data.format(cache=root / "hf_cache", file=root / file)
        (root / f"{name}.yaml").write_text(f"task: {name}\n{source}{body}")
    return TaskManager(include_path=str(root), include_defaults=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_hub import tiny_runs

    root = tmp_path_factory.mktemp("lm_eval")
    runs = tiny_runs(root)
    tasks = root / "tasks"
    tasks.mkdir()
    with pytest.MonkeyPatch.context() as mp:  # no network: local files only
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield runs, write_tasks(tasks), tasks


def evaluate(run, manager, batch_size=1, tasks=("ebt_tiny_mc", "ebt_tiny_ppl", "ebt_tiny_gen"), **args):
    model_args = ",".join(f"{k}={v}" for k, v in {"pretrained": run, "seed": SEED, **args}.items())
    return lm_eval.simple_evaluate(model="ebt", model_args=model_args, tasks=list(tasks),
                                   task_manager=manager, batch_size=batch_size, device="cpu",
                                   bootstrap_iters=0, log_samples=True)


def scores(res) -> list[float]:
    """Every log-likelihood of the multiple-choice and rolling tasks, in order."""
    mc = [float(r[0]) for s in res["samples"]["ebt_tiny_mc"] for r in s["filtered_resps"]]
    return mc + [float(s["filtered_resps"][0]) for s in res["samples"]["ebt_tiny_ppl"]]


def direct_logits(model, ids, think_cfg):
    """Next-token logits (T, V) for one sequence, straight from the library under the adapter's seed."""
    x = torch.tensor([ids])
    if think_cfg is None:
        with torch.no_grad():
            return model.logits(x)[0].double()
    with seeded(SEED, torch.device("cpu")):
        step = resolve_plan(model).think_step(model, think_cfg)  # the adapter's plan: the run's fast path
        return think(model, x, think_cfg, step=step).z[0].detach().double()


def direct_loglik(model, think_cfg, inputs, targets):
    """Sum of log p(target) at the last len(targets) positions of `inputs`."""
    logp = torch.log_softmax(direct_logits(model, inputs, think_cfg), -1)[-len(targets):]
    return float(logp.gather(-1, torch.tensor(targets)[:, None]).sum())


@pytest.mark.parametrize("kind", ["transformer", "ebt"])
def test_lm_eval_scores_a_run_as_the_library_does(setup, kind):
    runs, manager, _ = setup
    args = {"think_steps": 3, "candidates": 2} if kind == "ebt" else {}
    res = evaluate(runs[kind], manager, **args)
    assert 0 <= res["results"]["ebt_tiny_mc"]["acc,none"] <= 1
    assert 0 <= res["results"]["ebt_tiny_gen"]["exact_match,none"] <= 1
    assert res["results"]["ebt_tiny_ppl"]["word_perplexity,none"] > 1
    assert res["config"]["ebt_model"] == kind
    model, tok = from_pretrained(runs[kind]), load_tokenizer(runs[kind])
    think_cfg = ThinkConfig(steps=3, candidates=2, score_final=False) if kind == "ebt" else None
    L = model.cfg.context_length
    # multiple choice: every choice's log-likelihood, for the first item
    sample = res["samples"]["ebt_tiny_mc"][0]
    for (context, continuation), resp in zip(sample["arguments"], sample["filtered_resps"]):
        ctx = tok.encode(context)
        cont = tok.encode(context + continuation)[len(ctx):]
        want = direct_loglik(model, think_cfg, (ctx + cont)[:-1], cont)
        assert float(resp[0]) == pytest.approx(want, rel=1e-6, abs=1e-6)
    # rolling: the short text is the model's NLL on [eos] + text; the long one spans two windows
    ppl = res["samples"]["ebt_tiny_ppl"]
    ids = tok.encode(TEXTS[0])
    assert len(ids) < L
    short = direct_loglik(model, think_cfg, [tok.eos_id] + ids[:-1], ids)
    assert float(ppl[0]["filtered_resps"][0]) == pytest.approx(short, rel=1e-6)
    if kind == "transformer":  # the model's own loss on that window
        nll = float(model(torch.tensor([[tok.eos_id] + ids]))["nll_sum"])
        assert float(ppl[0]["filtered_resps"][0]) == pytest.approx(-nll, rel=1e-5)
    ids = tok.encode(TEXTS[1])
    assert len(ids) > 2 * L and len(ids) % L  # several windows, the last one partial
    # lm_eval's windows: L tokens predicted at a time; each window's input is the L tokens before its last
    # prediction (the first preceded by eos), so the last, partial window still sees a full context
    stream, long = [tok.eos_id] + ids, 0.0
    for s in range(0, len(ids), L):
        e = min(s + L, len(ids))
        long += direct_loglik(model, think_cfg, stream[max(0, e - L):e], ids[s:e])
    assert float(ppl[1]["filtered_resps"][0]) == pytest.approx(long, rel=1e-6)
    # generation: the first item's text is ebt.generate's greedy continuation, cut at the stop string
    gen = res["samples"]["ebt_tiny_gen"][0]
    cfg = GenerateConfig(max_new_tokens=4, eos_id=tok.eos_id, seed=SEED, think=think_cfg)
    new = generate(model, [tok.encode(MC[0][0])], cfg)[0]
    assert gen["filtered_resps"][0] == tok.decode(new, skip_special=True).split(".")[0]


def test_batched_scores_repeat_and_a_transformers_do_not_depend_on_batching(setup):
    runs, manager, _ = setup
    tasks = ("ebt_tiny_mc", "ebt_tiny_ppl")
    one, four = (scores(evaluate(runs["transformer"], manager, b, tasks)) for b in (1, 4))
    assert one == pytest.approx(four, rel=1e-5)  # padding and batch neighbours change nothing
    # an EBT's random starts are drawn per batch (their shape is the batch's): seeded, a run repeats exactly
    a, b = (scores(evaluate(runs["ebt"], manager, 4, tasks, candidates=2)) for _ in range(2))
    assert a == b and all(x < 0 for x in a)


def test_bad_model_args_are_one_line_errors(setup):
    runs, _, _ = setup
    with pytest.raises(ConfigError, match="needs pretrained=RUN"):
        EBTLM()
    with pytest.raises(ConfigError, match=r"unknown model_args \['thinksteps'\]"):
        EBTLM(pretrained=str(runs["ebt"]), thinksteps=3)
    with pytest.raises(ConfigError, match="ThinkConfig.candidates must be >= 1"):
        EBTLM(pretrained=str(runs["ebt"]), candidates=0)
    with pytest.raises(ConfigError, match="batch_size='x'"):
        EBTLM(pretrained=str(runs["ebt"]), batch_size="x")
    with pytest.raises(ConfigError, match="think_steps=2.5: give an integer"):
        EBTLM(pretrained=str(runs["ebt"]), think_steps=2.5)


@pytest.mark.slow
def test_lm_eval_command_line_runs_an_ebt(setup, tmp_path):
    """`python -m ebt.integrations.lm_eval` takes lm_eval's arguments with the model `ebt` registered."""
    runs, _, tasks = setup
    args = f"pretrained={runs['ebt']},think_steps=2,candidates=2,seed={SEED}"
    r = subprocess.run([sys.executable, "-m", "ebt.integrations.lm_eval", "--model", "ebt",
                        "--model_args", args, "--tasks", "ebt_tiny_mc", "--include_path", tasks,
                        "--device", "cpu", "--output_path", tmp_path / "out"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "|ebt_tiny_mc|" in r.stdout.replace(" ", "")
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert 0 <= results["results"]["ebt_tiny_mc"]["acc,none"] <= 1
    assert results["config"]["ebt_model"] == "ebt" and results["config"]["candidates"] == 2
