"""benchmarks/device_check.sh (issue 23) with a stand-in for Python: every part runs, in order, writes its
log (and JSON) under $OUT, and the parts' time limits add up to at most 9 minutes."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def test_parts_time_limits_fit_nine_minutes():
    text = SCRIPT.read_text()
    limits = [int(n) for n in re.findall(r"^timeout (\d+) ", text, re.M)]
    limits += [int(n) for n in re.findall(r"^run_part \w+ (\d+) ", text, re.M)]
    assert len(limits) == 5
    assert sum(limits) <= 540
    assert f"the parts' limits add up to {sum(limits)} s" in text  # what the header says is the sum


def test_every_part_runs_and_writes_under_out(tmp_path):
    fake = tmp_path / "python"
    calls = tmp_path / "calls.txt"
    # records its arguments, writes the --json file it is given, prints a last line
    fake.write_text(f"""#!/usr/bin/env bash
echo "$@" >> {calls}
while [ $# -gt 0 ]; do
  if [ "$1" = "--json" ]; then echo '{{}}' > "$2"; fi
  shift
done
echo "stand-in done"
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "OUT": str(out)}
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    scripts = [line.split()[0] for line in calls.read_text().splitlines() if line.startswith("benchmarks/")]
    assert scripts == ["benchmarks/capture_probe.py", "benchmarks/speed.py", "benchmarks/speed.py",
                       "benchmarks/decode_kernels.py", "benchmarks/update_loss.py"]
    for name in ("capture", "check", "table", "decode"):
        assert (out / f"{name}.json").is_file() and (out / f"{name}.log").is_file(), name
    assert (out / "update_loss.log").read_text().strip() == "stand-in done"
    assert (out / "machine.txt").is_file()
    assert r.stdout.count("exit 0 (stand-in done)") == 5


def test_capture_probes_run_their_steps_with_a_stand_in_capture(monkeypatch):
    """benchmarks/capture_probe.py's step probes on CPU with the tests' stand-in capture: each builds its
    recipe, steps eagerly, captures one graph per step count and compares with eager steps where the
    draws allow. What the device adds (the capture itself) is what the probes are for."""
    import sys

    from test_speed_paths import stand_in_capture

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import capture_probe as cp

    monkeypatch.setattr(cp, "DEVICE", "cpu")
    monkeypatch.setattr(cp, "CAPTURE", stand_in_capture)
    graphs = {"s1 (captures on the device so far)": "[None]", "s2 + counts (a graph per count)": "[2, 3]",
              "s2, the whole recipe": "[2, 3]", "s2, the whole recipe, thread-local capture": "[2, 3]",
              "s2 + replay buffer": "[2]"}
    for name in cp.PROBES:
        out = cp.probe(name)
        assert out.startswith(f"ok: graphs {graphs.get(name, '[2]')}, grads finite True"), (name, out)
        exact = "+ random" not in name and "+ Langevin" not in name and "whole" not in name
        assert out.endswith("max rel diff vs eager 0.0e+00") == exact, (name, out)
    sys.modules.pop("capture_probe", None)
