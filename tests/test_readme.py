"""The README's examples still work: every `ebt` command in it parses with today's flags, and its Python
examples run against a freshly trained tiny run (the README's run paths replaced by it)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ebt.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(lang: str) -> list[str]:
    return [b for tag, b in re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.S) if tag == lang]


def _ebt_commands() -> list[list[str]]:
    """Each `ebt ...` command of the README's bash blocks as argv (continuation lines joined, comments and
    shell variables left out); `torchrun ... -m ebt.cli ARGS` counts as `ebt ARGS`."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "ebt.cli" in words:
                words = ["ebt", *words[words.index("ebt.cli") + 1:]]
            if words[:1] == ["ebt"]:
                commands.append(words[1:])
    return commands


def test_the_readme_has_commands_to_check():
    commands = _ebt_commands()
    assert len(commands) >= 30 and {c[0] for c in commands} >= {"train", "eval", "generate", "data", "scale"}


@pytest.mark.parametrize("argv", _ebt_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv, capsys):
    try:
        build_parser().parse_args(argv)
    except SystemExit:  # argparse: an unknown flag, a bad value or a renamed command
        pytest.fail(f"`ebt {' '.join(argv)}` no longer parses: {capsys.readouterr().err.strip()}")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny S2 EBT trained for two steps from the command line, with its tokenizer."""
    from test_cli import ebt, tiny_dataset

    tmp = tmp_path_factory.mktemp("readme")
    tiny_dataset(tmp)
    run = tmp / "run"
    r = ebt("train", "--model", "ebt", "--recipe", "s2", "--data", tmp / "data", "--size", "4xs", "--n-layer", "1",
            "--d-model", "32", "--n-head", "2", "--context-length", "64", "--steps", "2", "--batch-size", "2",
            "--eval-every", "0", "--device", "cpu", "--no-progress", "--out", run)
    assert r.returncode == 0, r.stderr
    return run


@pytest.mark.slow
def test_readme_python_examples_run(tiny_run, tmp_path):
    examples = [b for b in _blocks("python") if "runs/" in b]
    assert len(examples) >= 2
    for i, code in enumerate(examples):
        code = re.sub(r'"runs/[\w/]+"', repr(str(tiny_run)), code)
        script = tmp_path / f"example{i}.py"
        script.write_text(code)
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, f"README Python example {i} fails:\n{code}\n{r.stderr[-2000:]}"
