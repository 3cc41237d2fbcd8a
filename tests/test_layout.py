"""The package's shape, checked from its source: no import cycles (tests/package_graph.py, deferred imports
included), docs/layout.md names every module, the robot-facing contract is defined once, and every exception
class lwam defines lives in lwam/errors.py under LwamError."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import package_graph

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ROOT / "docs" / "layout.md"


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert package_graph.cycles(g) == [["a", "b", "c"]]
    assert package_graph.cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycles():
    g = package_graph.graph()
    assert "lwam.policy.compiled" in g and "lwam.model.lightwam" in g["lwam.policy.compiled"]
    assert "lwam._argtypes" in g["lwam.serving.server"]  # deferred (function-level) imports are edges too
    assert package_graph.cycles(g) == []


def _layout_tree() -> set[str]:
    """Paths (relative to lwam/) the tree in docs/layout.md names: dirs as 'x/', files as 'x/y.py'."""
    block = LAYOUT.read_text().split("```", 2)[1]
    named, stack = set(), []  # stack of (indent, dir)
    inside = False
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        token = line.split()[0]
        if indent == 0:
            inside = token == "lwam/"
            stack = []
            continue
        if not inside or indent >= 16 or not (token.endswith("/") or token.endswith(".py")):
            continue  # a wrapped description line
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(d for _, d in stack) + token
        named.add(path)
        if token.endswith("/"):
            stack.append((indent, token))
    return named


def test_layout_names_every_module():
    named = _layout_tree()
    package = ROOT / "lwam"
    missing = []
    for f in sorted(package.rglob("*.py")):
        rel = f.relative_to(package).as_posix()
        if f.name == "__init__.py":
            if rel != "__init__.py" and str(Path(rel).parent) + "/" not in named:
                missing.append(str(Path(rel).parent) + "/")
        elif rel not in named:
            missing.append(rel)
    assert not missing, f"docs/layout.md does not name {missing}"
    stale = sorted(p for p in named if not (package / p).exists())
    assert not stale, f"docs/layout.md names modules that do not exist: {stale}"


def _defs(name: str) -> list[str]:
    """Where ``def name`` is a method of a class in lwam (file:class)."""
    out = []
    for f in sorted((ROOT / "lwam").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == name:
                        out.append(f"{f.relative_to(ROOT).as_posix()}:{node.name}")
    return out


def test_robot_policy_contract_is_defined_once():
    assert _defs("select_action") == ["lwam/policy/base.py:RobotPolicy"]
    assert sorted(set(_defs("executed_steps"))) == ["lwam/policy/base.py:RobotPolicy"]  # getter + setter
    policy_resets = [d for d in _defs("reset") if d.endswith("Policy")]
    assert policy_resets == ["lwam/policy/base.py:RobotPolicy"]
    assert {d.split(":")[1] for d in _defs("predict_batch")} == {"ModelPolicy", "Policy", "EagerPolicy",
                                                                   "ExportedPolicy"}


def test_every_exception_class_lives_in_errors_under_lwam_error():
    import lwam.errors as errors

    defined = {}
    for f in sorted((ROOT / "lwam").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef) and re.search(r"(Error|Exception)$", node.name):
                defined.setdefault(node.name, []).append(f.relative_to(ROOT).as_posix())
    assert {n: fs for n, fs in defined.items() if fs != ["lwam/errors.py"]} == {}
    for name in defined:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.LwamError), name
    assert len(defined) >= 12
