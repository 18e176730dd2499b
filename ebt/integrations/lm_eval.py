"""lm-evaluation-harness adapter: an EBT or a Transformer++ run as lm_eval's model `ebt`.

    python -m ebt.integrations.lm_eval --model ebt \\
        --model_args pretrained=runs/x,think_steps=4,candidates=2 --tasks TASKS

takes `lm_eval`'s arguments. lm_eval looks models up only among those registered in its own process and has no
plugin hook for them, so plain `lm_eval --model ebt` cannot find this one: run it through this module, or in
Python `import ebt.integrations.lm_eval` before `lm_eval.simple_evaluate(model="ebt", ...)`.

model_args: pretrained (a run directory, its checkpoint or an `ebt export` folder; required), think_steps
(steps per landscape; default the model's inference default), candidates (random starts, the lowest final
energy kept), noise (Langevin std before each step; default the trained one), final_landscape, seed, data
(a data directory, for a checkpoint that holds no tokenizer), max_gen_toks. The thinking options apply to an
EBT; a Transformer++ is scored from its logits.

Log-likelihoods: the log-softmax of the next-token logits (an EBT's: its thinking's final candidate,
ebt.think.think) at the continuation's positions, the context cut to the model's context length from the
left; loglikelihood_rolling scores a text in lm_eval's disjoint windows of the context length, the first
predicted from the eos token; generate_until decodes through ebt.generate. Thinking draws random starts and
noise: every batch of requests is scored under the same seed, so results repeat exactly, and at batch size 1
(lm_eval's default) a request's score does not depend on the other requests.
"""

from __future__ import annotations

import json
import logging
import sys

import torch

try:
    # the harness's own models first: its get_model loads them only into an empty registry
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install -e '.[lm_eval]'") from e
from tqdm.auto import tqdm

from ebt.errors import ConfigError, EBTError
from ebt.fast.plan import resolve_plan
from ebt.generate import GenerateConfig, generate
from ebt.hub import from_pretrained, load_tokenizer
from ebt.runtime import resolve_device, seeded
from ebt.think import ThinkConfig, think

log = logging.getLogger(__name__)
THINK_ARGS = ("think_steps", "candidates", "noise", "final_landscape")


def _number(name: str, value, kind):
    """A numeric model_arg (lm_eval passes what it cannot parse as a number as text); None stays None."""
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or isinstance(value, bool) or (kind is int and float(value) != number):
        raise ConfigError(f"{name}={value!r}: give {'an integer' if kind is int else 'a number'}")
    return number


def _batch_size(value) -> int:
    """lm_eval's batch size: an integer, or 'auto' / 'auto:N', which this adapter does not tune (8)."""
    text = str(value if value is not None else 1)
    if text.startswith("auto"):
        return 8
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"batch_size={value!r}: give a positive integer")
    return int(text)


@register_model("ebt")
class EBTLM(LM):
    """An ebt text model (EBT or Transformer++) behind lm_eval's LM interface."""

    def __init__(self, pretrained=None, think_steps=None, candidates=1, noise=None, final_landscape=False,
                 seed=1234, data=None, max_gen_toks=256, batch_size=1, max_batch_size=None, device=None,
                 **unknown):
        super().__init__()
        if unknown:
            raise ConfigError(f"unknown model_args {sorted(unknown)}; known: pretrained, data, seed, "
                              f"max_gen_toks, {', '.join(THINK_ARGS)}")
        if pretrained is None:
            raise ConfigError("model_args needs pretrained=RUN (a run directory, checkpoint or `ebt export` "
                              "folder)")
        self.options = {"think_steps": _number("think_steps", think_steps, int),
                        "candidates": _number("candidates", candidates, int),
                        "noise": _number("noise", noise, float), "final_landscape": bool(final_landscape)}
        self.seed, self.max_gen_toks = _number("seed", seed, int), _number("max_gen_toks", max_gen_toks, int)
        self.batch_size = _batch_size(batch_size)
        self._device = resolve_device(device)
        self.model = from_pretrained(pretrained, device=self._device).eval()
        cfg = self.model.cfg
        if cfg.candidate != "tokens" or cfg.model not in ("ebt", "transformer"):
            raise ConfigError(f"{pretrained} is a {cfg.model} model of {cfg.candidate}: lm_eval scores text "
                              f"models (an EBT or a Transformer++ trained on tokens)")
        self.tok = load_tokenizer(pretrained, data)
        if self.tok.vocab_size != cfg.vocab_size:
            raise ConfigError(f"the tokenizer of {data or pretrained} has {self.tok.vocab_size} tokens, the "
                              f"model {cfg.vocab_size}: pass data=DIR, the data the model was trained on")
        self.pretrained, self.max_length = str(pretrained), cfg.context_length
        self.is_ebt, o = cfg.model == "ebt", self.options
        self.think_cfg = None
        if self.is_ebt:
            self.think_cfg = ThinkConfig(steps=o["think_steps"], candidates=o["candidates"], noise=o["noise"],
                                         final_landscape=o["final_landscape"], score_final=False)
            self.step = resolve_plan(self.model, self._device).think_step(self.model, self.think_cfg)
        elif o != {"think_steps": None, "candidates": 1, "noise": None, "final_landscape": False}:
            log.warning("%s is a Transformer++: think_steps, candidates, noise and final_landscape are "
                        "ignored", pretrained)

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def get_model_info(self) -> dict:
        info = {"ebt_model": self.model.cfg.model, "ebt_pretrained": self.pretrained, "seed": self.seed}
        return {**info, **(self.options if self.is_ebt else {})}

    # ------------------------------------------------------------------------------------------- scoring

    def next_token_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) logits for the token after each position, under the seed."""
        with seeded(self.seed, self._device):
            if self.is_ebt:
                return think(self.model, tokens, self.think_cfg, step=self.step).z.detach()
            with torch.no_grad():
                return self.model.logits(tokens)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation), as lm_eval's HF model splits them: the context's trailing
        spaces move to the continuation, the pair is encoded whole and split at the context's length; an
        empty context is the eos token."""
        if not context:
            return [self.tok.eos_id], self.tok.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.tok.encode(context + continuation), self.tok.encode(context)
        return ctx, whole[len(ctx):]

    def score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = False) -> list:
        """(log-probability of the continuation, whether greedy decoding gives it) for (context, continuation)
        token-id pairs, in batches of similar length."""
        rows = []
        for ctx, cont in pairs:
            if len(cont) > self.max_length:
                raise ConfigError(f"a continuation of {len(cont)} tokens is longer than the model's context "
                                  f"length {self.max_length}")
            rows.append(((ctx + cont)[-(self.max_length + 1):][:-1], cont))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list = [None] * len(rows)
        batches = range(0, len(order), self.batch_size)
        for start in tqdm(batches, disable=disable_tqdm, desc="ebt loglikelihood"):
            idx = order[start:start + self.batch_size]
            width = len(rows[idx[0]][0])
            batch = torch.full((len(idx), width), self.tok.eos_id, dtype=torch.long)
            for j, i in enumerate(idx):
                batch[j, :len(rows[i][0])] = torch.tensor(rows[i][0])
            logits = self.next_token_logits(batch.to(self._device))
            for j, i in enumerate(idx):  # read now: thinking may recycle the logits' memory in its next call
                inp, cont = rows[i]
                logp = torch.log_softmax(logits[j, len(inp) - len(cont):len(inp)].double(), -1)
                target = torch.tensor(cont, device=logp.device, dtype=torch.long)
                greedy = bool((logp.argmax(-1) == target).all())
                out[i] = (float(logp.gather(-1, target[:, None]).sum()), greedy)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = self.score([self.encode_pair(*req.args) for req in requests], disable_tqdm)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """lm_eval's disjoint windows of a text: each token predicted once, the first from the eos token."""
        windows = get_rolling_token_windows(token_list=self.tok.encode(text), prefix_token=self.tok.eos_id,
                                            max_seq_len=self.max_length, context_len=1)
        return [make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, req in enumerate(requests):
            for w in self.rolling_windows(req.args[0]):
                windows.append(w)
                owner.append(k)
        out = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self.score(windows, disable_tqdm)):
            out[k] += ll
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return out

    # ----------------------------------------------------------------------------------------- generation

    def generate_config(self, kwargs: dict) -> tuple[GenerateConfig, list[str]]:
        """ebt.generate's settings and the stop strings for one request's generation kwargs."""
        kw = dict(kwargs or {})
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        new = max(1, min(int(kw.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1))
        temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
        cfg = GenerateConfig(max_new_tokens=new, temperature=temperature, top_p=float(kw.get("top_p") or 1.0),
                             seed=self.seed, eos_id=self.tok.eos_id, think=self.think_cfg)
        return cfg, until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}  # requests with the same settings decode together
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="ebt generate_until")
        for idx in groups.values():
            cfg, until = self.generate_config(requests[idx[0]].args[1])
            room = self.max_length - cfg.max_new_tokens
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                prompts = [(self.tok.encode(requests[i].args[0]) or [self.tok.eos_id])[-room:] for i in chunk]
                for i, new in zip(chunk, generate(self.model, prompts, cfg)):
                    text = self.tok.decode(new, skip_special=True)
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out


def main(argv=None) -> None:
    """`lm_eval`'s command line with the model `ebt` registered; an ebt error: one line, exit status 2."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except EBTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
