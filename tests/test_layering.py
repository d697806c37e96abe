"""The package map: each part of dloral imports only parts on a lower floor (read with `ast`).

    5  cli                                   the command line
    4  sweep  report  doctor  upscale        jobs built from the floors below
    3  train  bench                          the training recipe; the benchmark harness
    2  model  data                           the DLoRAL model; clips, degradation, sampling
    1  foundation modules                    config, tracking, provenance, weights, quality,
                                             trials, atomic, devices, resize, signals

A foundation module imports no other dloral module, so that `model` and `data` stay on floor 2.
Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dloral"

FOUNDATION = (
    "atomic",
    "config",
    "devices",
    "provenance",
    "quality",
    "resize",
    "signals",
    "tracking",
    "trials",
    "weights",
)
FLOORS = {
    **dict.fromkeys(FOUNDATION, 1),
    "model": 2,
    "data": 2,
    "train": 3,
    "bench": 3,
    "sweep": 4,
    "report": 4,
    "doctor": 4,
    "upscale": 4,
    "cli": 5,
}


def _part(module: str) -> str:
    """dloral.bench.harness -> bench; dloral.config -> config."""
    return module.split(".")[1]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:
            out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path) -> set[str]:
    """dloral modules named by every import statement of the file (resolved to modules)."""
    known = _modules()
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from dloral.model import lora` names the module dloral.model.lora
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        found |= {n for n in names if n == "dloral" or n.startswith("dloral.")}
    return {n for n in found if n in known and n != module}


def test_every_part_has_a_floor():
    parts = {_part(m) for m in _modules()}
    assert parts <= set(FLOORS), f"parts without a floor in this test: {parts - set(FLOORS)}"


def test_no_import_runs_up_or_sideways():
    bad = []
    for module, path in _modules().items():
        src = _part(module)
        for target in sorted(_imports(module, path)):
            dst = _part(target)
            if dst == src and src not in FOUNDATION:
                continue  # inside one package
            if src in FOUNDATION or FLOORS[dst] >= FLOORS[src]:
                bad.append(f"{module} (floor {FLOORS[src]}) imports {target} (floor {FLOORS[dst]})")
    assert not bad, "imports that break the package map:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = {m: _imports(m, p) for m, p in _modules().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_check_sees_a_wrong_import(tmp_path):
    """The reader resolves the forms the code uses (absolute, `from pkg import module`, lazy)."""
    path = ROOT / "bench" / "harness.py"
    names = _imports("dloral.bench.harness", path)
    assert any(n.startswith("dloral.bench.") for n in names)
    fake = tmp_path / "x.py"
    fake.write_text(
        "def f():\n    from dloral.report import build\n    import dloral.sweep.runner\n"
    )
    assert _imports("dloral.bench.x", fake) >= {"dloral.report.build", "dloral.sweep.runner"}
