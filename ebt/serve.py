"""`ebt serve RUN`: a local web page to watch a model write, and an EBT think, token by token.

A standard-library HTTP server, bound to 127.0.0.1 only, serves one page (ebt/serve_static/index.html)
and two JSON endpoints:

    GET  /api/info                      the run: model kind, size, thinking settings, limits
    POST /api/generate {"prompt": "...", "max_new_tokens": 8}   (also GET /api/generate?prompt=...)
         -> {"tokens": [{"id", "text", "energy", "trace", "candidates", "selected"}, ...], ...}

An EBT chooses each new token by thinking about the next position of the growing prefix, the whole
prefix re-run for every token (as ebt.generate.generate_uncached does), with the energy traced at every
step (ThinkConfig(trace=True)). With several candidates each one thinks from its own random start and
the lowest final energy is kept, the rule of ebt.think.think's "min" selection; every candidate's final
energy is reported. The starts are drawn as ebt.generate draws them (one start for the new position per
candidate, seeded by the seed), so without Langevin noise the page writes the tokens `ebt generate`
writes with the same settings. A Transformer++ has no energy: its tokens come from ebt.generate.generate.
"""

from __future__ import annotations

import json
import math
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ebt.config import Bound, bounded, check_bounds
from ebt.errors import ConfigError, EBTError, first_line

# torch is imported inside the functions that run the model: `ebt --help` builds this command's parser
# without loading torch

HOST = "127.0.0.1"
HOST_NAMES = ("127.0.0.1", "localhost")  # what --host accepts; both bind 127.0.0.1
PAGE = Path(__file__).resolve().parent / "serve_static" / "index.html"
MAX_BODY = 1 << 16  # a prompt request is a few hundred bytes


@dataclass
class ServeConfig:
    port: int = bounded(8765, int, 0, 65535)  # 0: any free port
    think_steps: int | None = bounded(None, int, 1)  # EBT: steps per landscape (None: inference default)
    candidates: int = bounded(1, int, 1)  # EBT: random starts per token, the lowest final energy kept
    max_new_tokens: int = bounded(32, int, 1)  # the most a request may ask for (each re-runs the prefix)
    noise: float | None = bounded(None, float, 0)  # EBT: Langevin std before each step (None: trained std)
    temperature: float = bounded(0.0, float, 0)  # 0: greedy
    seed: int = bounded(0, int, 0)

    def __post_init__(self):
        check_bounds(self)


def check_host(host: str) -> str:
    """The address to bind: 127.0.0.1, whatever loopback name was given; anything else is refused."""
    if host not in HOST_NAMES:
        raise ConfigError(f"--host {host}: ebt serve binds 127.0.0.1 only (the page runs a model for anyone "
                          f"who can reach it); use an SSH tunnel to look from another machine")
    return HOST


def _ebt_next(model, seq, think_cfg, candidates: int, step) -> tuple:
    """Think about the position after seq (1, t), each candidate on its own (think_cfg: one candidate,
    traced): (the kept candidate's logits (1, V), its index, every candidate's final energy, the kept
    one's energy fed into each step then its final energy)."""
    import torch

    from ebt.think import think

    runs = []
    for _ in range(candidates):
        # ebt.generate's draw: a start for the new position only (the others' cannot reach it: no leakage)
        z_last = model.init_candidate(seq[:, -1:])
        init = torch.cat([z_last.new_zeros(1, seq.shape[1] - 1, z_last.shape[-1]), z_last], 1)
        runs.append(think(model, seq, think_cfg, init=init, step=step))
    finals = [_num(r.energy[0, -1]) for r in runs]
    k = min(range(candidates), key=lambda c: float(runs[c].energy[0, -1]))  # the first lowest, as think's
    return runs[k].z[:, -1], k, finals, [_num(e) for e in runs[k].trace[:, 0, -1]]


def _num(x) -> float | None:
    """A plain float for JSON; a NaN or infinite energy (a diverged model) is None (the page says so)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _ebt_tokens(model, ids: list[int], n: int, cfg: ServeConfig, eos_id: int | None) -> list[dict]:
    import torch

    from ebt.generate import sample
    from ebt.fast.plan import resolve_plan
    from ebt.runtime import seeded
    from ebt.think import ThinkConfig

    think_cfg = ThinkConfig(steps=cfg.think_steps, noise=cfg.noise, trace=True)  # per candidate
    step = resolve_plan(model).think_step(model, think_cfg)  # the run's fast path, as ebt generate's
    dev = model.tok_emb.weight.device
    seq = torch.tensor([ids], device=dev)
    out = []
    with seeded(cfg.seed, dev):
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        for _ in range(n):
            logits, k, finals, trace = _ebt_next(model, seq, think_cfg, cfg.candidates, step)
            tok = int(sample(logits, cfg.temperature, 1.0, gen))
            out.append({"id": tok, "energy": finals[k], "trace": trace, "candidates": finals, "selected": k})
            seq = torch.cat([seq, seq.new_tensor([[tok]])], 1)
            if tok == eos_id:
                break
    return out


def _plain_tokens(model, ids: list[int], n: int, cfg: ServeConfig, eos_id: int | None) -> list[dict]:
    from ebt.generate import GenerateConfig, generate

    gcfg = GenerateConfig(max_new_tokens=n, temperature=cfg.temperature, seed=cfg.seed, eos_id=eos_id)
    new = generate(model, [ids], gcfg)[0]
    return [{"id": t, "energy": None, "trace": None, "candidates": None, "selected": None} for t in new]


class Served:
    """A loaded run and its settings; `generate` answers a request (one at a time: the model is shared)."""

    def __init__(self, model, tokenizer, cfg: ServeConfig, name: str = "model"):
        self.model, self.tok, self.cfg, self.name = model, tokenizer, cfg, name
        self.is_ebt = hasattr(model, "energy_from")
        self.lock = threading.Lock()

    def info(self) -> dict:
        m = self.model.cfg
        note = None if self.is_ebt else ("This run is a Transformer++: it predicts each token in one pass "
                                         "and has no energy, so its tokens are not coloured and have no "
                                         "thinking steps.")
        c = self.cfg
        return {"run": self.name, "model": m.model, "size": m.size, "energies": self.is_ebt,
                "landscapes": m.ebt.landscapes if self.is_ebt else None, "think_steps": c.think_steps,
                "candidates": c.candidates, "noise": c.noise, "temperature": c.temperature, "seed": c.seed,
                "max_new_tokens": c.max_new_tokens, "context_length": m.context_length, "note": note}

    def generate(self, prompt, max_new_tokens=None) -> dict:
        import torch

        ids, n = self._request(prompt, max_new_tokens)
        was_training = self.model.training
        start = time.perf_counter()
        with self.lock, torch.no_grad():
            self.model.eval()
            try:
                step = _ebt_tokens if self.is_ebt else _plain_tokens
                tokens = step(self.model, ids, n, self.cfg, self.tok.eos_id)
            finally:
                self.model.train(was_training)
        for t in tokens:
            t["text"] = self.tok.decode([t["id"]])
        return {"prompt": prompt, "prompt_ids": ids, "tokens": tokens, "energies": self.is_ebt,
                **self._thinking(), "seconds": round(time.perf_counter() - start, 3),
                "note": self.info()["note"]}

    def _thinking(self) -> dict:
        """How each token was thought about: the steps, the landscape of each (an EBT's energy is a
        different function on each landscape, so a trace may jump between them), the candidates."""
        if not self.is_ebt:
            return {"steps": None, "schedule": None, "candidates": None}
        from ebt.recipe import inference_schedule

        schedule = inference_schedule(self.model.cfg.ebt, self.cfg.think_steps)  # as ebt.think.think runs it
        return {"steps": len(schedule), "schedule": schedule, "candidates": self.cfg.candidates}

    def _request(self, prompt, max_new_tokens) -> tuple[list[int], int]:
        """The prompt's ids and the token count asked for, or a ConfigError saying what to change."""
        cap = self.cfg.max_new_tokens
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError("give a prompt: a non-empty text")
        n = cap if max_new_tokens in (None, "") else max_new_tokens
        problem = Bound(int, 1, cap).problem(n) if not isinstance(n, str) else None
        if isinstance(n, str) or problem:
            why = problem or f"must be an integer (got {n!r})"
            raise ConfigError(f"max_new_tokens {why}: this server allows at most {cap} (ebt serve "
                              f"--max-new-tokens)")
        ids, limit = self.tok.encode(prompt), self.model.cfg.context_length
        if not ids:
            raise ConfigError("the prompt encodes to no tokens: give some text")
        if len(ids) + int(n) > limit:
            raise ConfigError(f"prompt ({len(ids)} tokens) + max_new_tokens ({int(n)}) = {len(ids) + int(n)} "
                              f"exceeds the model's context_length {limit}: shorten the prompt or ask for "
                              f"fewer tokens")
        return ids, int(n)


class Handler(BaseHTTPRequestHandler):
    """The page and the JSON endpoints. Requests must name this server as their Host (a page elsewhere
    pointing a name of its own at 127.0.0.1 is refused) and POST JSON (a cross-site form cannot)."""

    served: Served  # set on a per-server subclass by `make_server`
    quiet = True

    def do_GET(self):
        url = urlsplit(self.path)
        if not self._host_ok():
            return
        if url.path in ("/", "/index.html"):
            return self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        if url.path == "/api/info":
            return self._json(200, self.served.info())
        if url.path == "/api/generate":
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            n = q.get("max_new_tokens")
            return self._generate(q.get("prompt"), int(n) if n and n.isdigit() else n)
        self._json(404, {"error": f"no such page: {url.path}"})

    def do_POST(self):
        if not self._host_ok():
            return
        if urlsplit(self.path).path != "/api/generate":
            return self._json(404, {"error": f"no such endpoint: {self.path}"})
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._json(415, {"error": "send the request as JSON (Content-Type: application/json)"})
        size = int(self.headers.get("Content-Length") or 0)
        if size > MAX_BODY:
            return self._json(413, {"error": f"request too large ({size} bytes; at most {MAX_BODY})"})
        try:
            body = json.loads(self.rfile.read(size) or b"{}")
        except (ValueError, UnicodeDecodeError):
            return self._json(400, {"error": "the request body is not JSON"})
        if not isinstance(body, dict):
            return self._json(400, {"error": 'send an object: {"prompt": "...", "max_new_tokens": 8}'})
        self._generate(body.get("prompt"), body.get("max_new_tokens"))

    def _generate(self, prompt, max_new_tokens):
        try:
            self._json(200, self.served.generate(prompt, max_new_tokens))
        except EBTError as e:
            self._json(400, {"error": str(e)})
        except Exception as e:  # a bug, not the request: the page says so, the terminal has the traceback
            traceback.print_exc()
            self._json(500, {"error": f"generation failed ({type(e).__name__}: {first_line(e)}); "
                                      f"see the terminal running ebt serve"})

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        if host in HOST_NAMES:
            return True
        self._json(403, {"error": f"this server answers requests for 127.0.0.1 only, not {host!r}"})
        return False

    def _json(self, code: int, obj) -> None:
        self._send(code, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)


def make_server(served: Served, port: int = 8765, host: str = HOST, quiet: bool = True):
    """An HTTP server for `served` on 127.0.0.1:port (port 0: a free one; see server.server_address)."""
    handler = type("ServeHandler", (Handler,), {"served": served, "quiet": quiet})
    try:
        return ThreadingHTTPServer((check_host(host), port), handler)
    except OSError as e:
        raise ConfigError(f"cannot listen on {HOST}:{port} ({e.strerror or e}): choose another --port") from e


def load(run, cfg: ServeConfig, data_dir=None, device="cpu") -> Served:
    """A run folder (or checkpoint) and its tokenizer, as `ebt generate` loads them."""
    from ebt.checkpoint import resolve
    from ebt.models import load_model
    from ebt.data.loader import tokenizer_for_checkpoint

    path = resolve(run)
    model = load_model(path, device=device)
    if model.cfg.candidate != "tokens":
        raise ConfigError(f"{run} is a {model.cfg.candidate} model: ebt serve shows text models only")
    tok = tokenizer_for_checkpoint(path, data_dir)
    if tok.vocab_size != model.cfg.vocab_size:
        raise ConfigError(f"tokenizer/vocabulary mismatch: the tokenizer of {data_dir or path} has "
                          f"{tok.vocab_size} tokens, the model {model.cfg.vocab_size}; pass --data with the "
                          f"data the model was trained on")
    return Served(model, tok, cfg, name=str(run))


def cmd_serve(args) -> None:
    from ebt.runtime import resolve_device

    host = check_host(args.host)  # before loading anything
    cfg = ServeConfig(port=args.port, think_steps=args.think_steps, candidates=args.candidates,
                      max_new_tokens=args.max_new_tokens, noise=args.noise, temperature=args.temperature,
                      seed=args.seed)
    served = load(args.run, cfg, args.data, resolve_device(args.device))
    server = make_server(served, cfg.port, host, quiet=False)
    kind = "EBT" if served.is_ebt else "Transformer++ (no energies)"
    url = f"http://{HOST}:{server.server_address[1]}/"
    print(f"serving {args.run} ({kind}) at {url}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


SERVE_HELP = """\
Start a local web page (http://127.0.0.1:PORT/) to watch generation: type a prompt, see each new token
coloured by its energy (the kept candidate's final energy), click a token for its energy across the
thinking steps and, with --candidates > 1, every candidate's final energy. A Transformer++ run works
too (its tokens have no energy). The server binds 127.0.0.1 only.

An EBT re-runs the whole prefix for every new token (no KV cache), so a request is capped at
--max-new-tokens tokens (default 32). Without Langevin noise (an S1 run, or --noise 0) the tokens are
those of `ebt generate --steps N --candidates N --seed N` with the same settings."""

SERVE_EXAMPLES = """examples:
  ebt serve runs/demo/ebt                       # then open http://127.0.0.1:8765/
  ebt serve runs/demo/ebt --think-steps 4 --candidates 3 --port 8800
  ebt serve runs/demo/tpp                       # a Transformer++: tokens without energies
  open 'http://127.0.0.1:8765/?prompt=To%20be&autorun=1'   # a prompt in the address runs at once
"""


def add_serve_command(sub, fmt) -> None:
    """Register `ebt serve` on the CLI's subparsers."""
    sp = sub.add_parser("serve", help="a local web page to watch an EBT think while it writes",
                        formatter_class=fmt, description=SERVE_HELP, epilog=SERVE_EXAMPLES)
    sp.add_argument("run", help="run directory (or checkpoint) of a text model")
    sp.add_argument("--port", type=Bound(int, 0, 65535), default=8765, help="default 8765; 0: any free port")
    sp.add_argument("--host", default=HOST, help="127.0.0.1 only (or localhost); any other is refused")
    sp.add_argument("--think-steps", type=Bound(int, 1), help="EBT: thinking steps per landscape for each "
                    "token (default: the official inference default, S2 2, S1 1)")
    sp.add_argument("--candidates", type=Bound(int, 1), default=1, help="EBT: random starts per token; the "
                    "lowest final energy is kept and every candidate's energy is shown")
    sp.add_argument("--max-new-tokens", type=Bound(int, 1), default=32, help="the most tokens a request may "
                    "ask for (default 32; an EBT re-runs the whole prefix per token, so keep it small)")
    sp.add_argument("--noise", type=Bound(float, 0), help="EBT: Langevin noise std before each thinking step "
                    "(default: the trained std; 0: none)")
    sp.add_argument("--temperature", type=Bound(float, 0), default=0.0, help="0: greedy")
    sp.add_argument("--seed", type=Bound(int, 0), default=0, help="random starts and sampling, per request")
    sp.add_argument("--data", help="data directory, if the checkpoint holds no tokenizer")
    sp.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    sp.set_defaults(func=cmd_serve)
