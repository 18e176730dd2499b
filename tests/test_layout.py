"""The package's shape: imports flow one way, the reference loop needs no fast path, models carry no
path flags (the fast paths are chosen once, by ebt.fast.plan)."""

import ast
from pathlib import Path

from ebt.config import ModelConfig, recipe
from ebt.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    """ebt module -> the ebt modules it imports, at module level or inside functions."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "ebt").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycle(graph) -> list[str] | None:
    """One import cycle, or None."""
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        stack.pop()
        state[u] = "done"
        return None

    return next((c for u in sorted(graph) if u not in state and (c := visit(u))), None)


def test_ebt_imports_have_no_cycle():
    graph = import_graph()
    assert {"ebt.think", "ebt.fast.plan", "ebt.models", "ebt.checkpoint"} <= set(graph)
    assert cycle(graph) is None, " -> ".join(cycle(graph))
    assert cycle({**graph, "ebt.think": graph["ebt.think"] | {"ebt.objective"}}) is not None  # it can fail


def test_the_reference_loop_needs_no_fast_path():
    graph = import_graph()
    assert not {d for d in graph["ebt.think"] if d.startswith("ebt.fast")}
    assert not {d for m in graph if m.startswith("ebt.models") for d in graph[m] if d.startswith("ebt.think")}


def test_models_carry_no_path_flags():
    flags = {"fused_attention", "measure_final_energy", "grad_method", "explicit_grad", "compile_grad"}
    for cfg in (ModelConfig(model="ebt", size="4xs", vocab_size=50, context_length=8, ebt=recipe("s2")),
                ModelConfig(model="transformer", size="4xs", vocab_size=50, context_length=8),
                ModelConfig(model="ebt", size="4xs", candidate="image", image_size=8, patch=4, channels=1,
                            ebt=recipe("s1"))):
        model = build_model(cfg)
        assert not flags & set(vars(model)), (cfg.model, flags & set(vars(model)))
