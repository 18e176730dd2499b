"""`ebt serve`: the JSON endpoint (tokens, energies, traces, candidates), loopback-only binding, bad requests,
and the page itself in headless Chromium (slow)."""

import contextlib
import json
import math
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser
from urllib.parse import quote

import pytest

from ebt.checkpoint import save_checkpoint
from ebt.config import ModelConfig, to_dict
from ebt.errors import ConfigError
from ebt.generate import GenerateConfig, generate
from ebt.models import build_model
from ebt.serve import ServeConfig, Served, load, make_server
from ebt.recipe import inference_schedule
from ebt.think import ThinkConfig

PROMPT = "The quick brown"
WORDS = ["kings", "queens", "rivers", "mountains", "ships", "stars", "bread", "wine"] * 6
TEXT = [f"The quick brown fox jumps over the lazy dog. Document {i} speaks of {w} and more {w}."
        for i, w in enumerate(WORDS)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny untrained run folders, as `ebt train` lays them out: an EBT (S1) and a Transformer++."""
    import torch

    from ebt.data.tokenizers import get_tokenizer

    root = tmp_path_factory.mktemp("serve")
    tok = get_tokenizer("bpe", root / "cache", texts=TEXT, vocab_size=280)
    out = {}
    for kind in ("ebt", "transformer"):
        torch.manual_seed(0)
        cfg = ModelConfig(model=kind, size="4xs", n_layer=1, d_model=32, n_head=2, vocab_size=tok.vocab_size,
                          context_length=24)
        save_checkpoint(root / kind / "checkpoint", build_model(cfg), {"model": to_dict(cfg)})
        tok.save(root / kind / "checkpoint" / "tokenizer")
        out[kind] = root / kind
    return out


@contextlib.contextmanager
def serving(run, **settings):
    served = load(run, ServeConfig(port=0, **settings))
    server = make_server(served, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def post(url, body, headers=None):
    """(status, JSON answer) of a POST to url."""
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                 headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_endpoint_gives_every_token_its_energy_trace_and_candidates(runs):
    with serving(runs["ebt"], think_steps=2, candidates=3) as (served, _, url):
        code, res = post(url + "/api/generate", {"prompt": PROMPT, "max_new_tokens": 5})
    assert code == 200, res
    steps = len(inference_schedule(served.model.cfg.ebt, 2))  # 2 per landscape, on each of the 2 landscapes
    assert steps == 4 and res["steps"] == steps and res["energies"] is True and res["note"] is None
    assert res["schedule"] == [0, 0, 1, 1] and res["candidates"] == 3
    assert res["prompt_ids"] == served.tok.encode(PROMPT) and len(res["tokens"]) == 5
    for t in res["tokens"]:
        assert math.isfinite(t["energy"]) and all(map(math.isfinite, t["trace"]))
        assert len(t["trace"]) == steps + 1
        assert t["trace"][-1] == t["energy"]  # the trace ends on the kept candidate's final energy
        assert len(t["candidates"]) == 3 and all(map(math.isfinite, t["candidates"]))
        assert t["candidates"][t["selected"]] == t["energy"] == min(t["candidates"])
        assert t["text"] == served.tok.decode([t["id"]])
    assert len({round(t["energy"], 9) for t in res["tokens"]}) > 1  # energies per token, not one for all


@pytest.mark.parametrize("candidates", [1, 2])
def test_tokens_are_those_of_generate_without_noise(runs, candidates):
    """The page thinks on the whole prefix per token but draws its starts as ebt.generate does: the same
    tokens."""
    with serving(runs["ebt"], think_steps=2, candidates=candidates, noise=0.0, seed=3) as (served, _, url):
        code, res = post(url + "/api/generate", {"prompt": PROMPT, "max_new_tokens": 6})
    want = generate(served.model, [served.tok.encode(PROMPT)],
                    GenerateConfig(max_new_tokens=6, seed=3, eos_id=served.tok.eos_id,
                                   think=ThinkConfig(steps=2, candidates=candidates, noise=0.0)))[0]
    assert code == 200 and [t["id"] for t in res["tokens"]] == want


def test_transformer_run_has_tokens_without_energies(runs):
    with serving(runs["transformer"]) as (served, _, url):
        code, res = post(url + "/api/generate", {"prompt": PROMPT, "max_new_tokens": 4})
        info = json.loads(urllib.request.urlopen(url + "/api/info", timeout=30).read())
        query = f"{url}/api/generate?prompt={quote(PROMPT)}&max_new_tokens=2"  # a GET serves as well
        by_get = json.loads(urllib.request.urlopen(query, timeout=30).read())
    want = generate(served.model, [served.tok.encode(PROMPT)], GenerateConfig(max_new_tokens=4,
                                                                              eos_id=served.tok.eos_id))[0]
    assert code == 200 and [t["id"] for t in res["tokens"]] == want
    assert [t["id"] for t in by_get["tokens"]] == want[:2]
    assert res["energies"] is False and res["steps"] is None and res["schedule"] is None
    assert all(t["energy"] is None and t["trace"] is None and t["candidates"] is None for t in res["tokens"])
    assert info["model"] == "transformer" and info["energies"] is False
    assert "Transformer++" in res["note"] and "no energy" in res["note"] and res["note"] == info["note"]


def test_binds_loopback_only(runs):
    with serving(runs["ebt"]) as (_, server, url):
        assert server.server_address[0] == "127.0.0.1"
        page = urllib.request.urlopen(url + "/", timeout=30).read().decode()
        assert 'id="output"' in page and "/api/generate" in page
    for host in ("0.0.0.0", "::", "192.168.1.2", ""):
        with pytest.raises(ConfigError, match="binds 127.0.0.1 only"):
            make_server(Served(None, None, ServeConfig()), port=0, host=host)


def test_help_names_the_cap_and_gives_examples(capsys):
    from ebt.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "examples:" in out and "ebt serve runs/demo/ebt" in out
    assert "re-runs the whole prefix for every new token" in out and "(default 32)" in out


def test_other_host_is_refused_with_exit_2_and_one_line(tmp_path):
    # checked before the run is read: this run does not even exist
    r = subprocess.run([sys.executable, "-m", "ebt.cli", "serve", tmp_path / "none", "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: --host 0.0.0.0: ebt serve binds 127.0.0.1 only")


def test_bad_requests_are_answered_with_one_line(runs):
    with serving(runs["ebt"], max_new_tokens=4) as (_, _, url):
        gen = url + "/api/generate"
        code, res = post(gen, {"prompt": "word " * 30, "max_new_tokens": 4})
        assert code == 400 and "exceeds the model's context_length 24" in res["error"]
        code, res = post(gen, {"prompt": PROMPT, "max_new_tokens": 5})
        assert code == 400 and res["error"].startswith("max_new_tokens must be >= 1 and <= 4")
        assert post(gen, {"prompt": ""}) == (400, {"error": "give a prompt: a non-empty text"})
        # a form on another site cannot send JSON
        assert post(gen, {"prompt": PROMPT}, {"Content-Type": "text/plain"})[0] == 415
        # a name of some other site pointed at 127.0.0.1 (DNS rebinding) is refused
        code, res = post(gen, {"prompt": PROMPT}, {"Content-Type": "application/json",
                                                   "Host": "evil.example:80"})
        assert code == 403 and "127.0.0.1 only" in res["error"]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/nothing", timeout=30)
        assert e.value.code == 404


def test_a_failure_inside_generation_is_a_500_with_one_line(runs, monkeypatch, capsys):
    with serving(runs["ebt"]) as (served, _, url):
        monkeypatch.setattr(served, "generate", lambda *a: (_ for _ in ()).throw(RuntimeError("boom\nmore")))
        code, res = post(url + "/api/generate", {"prompt": PROMPT})
    assert code == 500
    assert res == {"error": "generation failed (RuntimeError: boom); see the terminal running ebt serve"}
    assert "Traceback" in capsys.readouterr().err


class _Tokens(HTMLParser):
    """From a dumped page: the rendered tokens (span.tok), the output's state, the detail panel's final
    energy, its trace lines and its candidate rows."""

    def __init__(self):
        super().__init__()
        self.ids, self.state, self.energy, self.lines, self.rows = [], None, None, 0, 0
        self._energy = self._table = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "tok" in (a.get("class") or "").split():
            self.ids.append(int(a["data-id"]))
        self.state = a.get("data-state") if a.get("id") == "output" else self.state
        self._energy = a.get("id") == "energy"
        self._table = self._table or a.get("id") == "candidates"
        self.rows += tag == "tr" and self._table
        self.lines += tag == "polyline"

    def handle_endtag(self, tag):
        self._table = self._table and tag != "table"

    def handle_data(self, data):
        if self._energy:
            self.energy, self._energy = data, False


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_page_in_headless_chromium_shows_the_endpoints_tokens(runs, tmp_path):
    with serving(runs["ebt"], think_steps=2, candidates=2) as (_, _, url):
        code, res = post(url + "/api/generate", {"prompt": PROMPT, "max_new_tokens": 6})
        page = f"{url}/?prompt={quote(PROMPT)}&n=6&autorun=1&token=2"
        # virtual time waits for the page's requests, so the DOM is dumped once the generation is rendered
        r = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=60000",
                            "--dump-dom", page], capture_output=True, text=True, timeout=180)
    assert code == 200 and r.returncode == 0, r.stderr[-2000:]
    dom = _Tokens()
    dom.feed(r.stdout)
    assert dom.state == "done", r.stdout[-2000:]
    assert dom.ids == [t["id"] for t in res["tokens"]] and len(dom.ids) == 6
    # the page opened token 3 (token=2): its final energy, its trace drawn, both candidates listed
    assert float(dom.energy) == pytest.approx(res["tokens"][2]["energy"], rel=1e-3)  # shown to 4 digits
    assert dom.lines == 1 and dom.rows == 2
