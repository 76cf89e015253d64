"""The floors (DESIGN "Layout"): every folder is a floor; a file imports only its own floor or
lower, and no files of different folders import each other in a cycle. Every import is read,
module-level and inside functions. The public face (llmpareto/__init__.py, llmpareto/api.py)
sits above every floor: it is what a user imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"llmpareto": 1, "spaces": 2, "compress": 2, "evaluators": 2, "device_profiles": 2,
          "search": 3, "export": 4, "cli": 5}
PUBLIC_FACE = {"llmpareto/__init__.py", "llmpareto/api.py"}


def folder_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "llmpareto":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in FLOORS else "llmpareto"


def module_of(rel: str) -> str:
    folder, *rest = Path(rel).with_suffix("").parts
    name = ".".join(p for p in rest if p != "__init__")
    base = "llmpareto" if folder == "llmpareto" else f"llmpareto.{folder}"
    return f"{base}.{name}" if name else base


def sources(root: Path = ROOT) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for folder in FLOORS
            for p in (root / folder).rglob("*.py")}


def imports(files: dict[str, str]) -> list[tuple[str, str, int]]:
    """(file, imported llmpareto module, line) for every import in `files`."""
    out = []
    for rel, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports pkg.mod; `from mod import name`, mod
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            out += [(rel, n, node.lineno) for n in names if folder_of(n) is not None]
    return out


def upward(files: dict[str, str]) -> list[str]:
    bad = []
    for rel, name, line in imports(files):
        if rel in PUBLIC_FACE:
            continue
        here, there = Path(rel).parts[0], folder_of(name)
        if FLOORS[there] > FLOORS[here]:
            bad.append(f"{rel}:{line} imports {name} (floor {FLOORS[there]} > {FLOORS[here]})")
    return bad


def cycles_across_folders(files: dict[str, str]) -> list[list[str]]:
    """Strongly connected groups of modules that span more than one folder."""
    known = {module_of(rel): rel for rel in files if rel not in PUBLIC_FACE}
    graph: dict[str, set[str]] = {m: set() for m in known}
    for rel, name, _ in imports(files):
        if rel in PUBLIC_FACE:
            continue
        target = name if name in known else name.rpartition(".")[0]
        if target in known and target != module_of(rel):
            graph[module_of(rel)].add(target)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len({folder_of(m) for m in group}) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_file_imports_a_higher_floor():
    assert upward(sources()) == []


def test_no_cycle_between_folders():
    assert cycles_across_folders(sources()) == []


def test_a_planted_upward_import_and_a_planted_cycle_fail():
    files = sources()
    planted = dict(files)
    planted["llmpareto/text.py"] += "\n\ndef _x():\n    from llmpareto.export.pick import pick\n"
    line = planted["llmpareto/text.py"].count("\n")
    want = f"llmpareto/text.py:{line} imports llmpareto.export.pick.pick (floor 4 > 1)"
    assert upward(planted) == [want]
    ring = dict(files)
    ring["compress/prune.py"] += "\nfrom llmpareto.spaces.sparsity import PREFIX\n"
    assert any("llmpareto.compress.prune" in g and "llmpareto.spaces.sparsity" in g
               for g in cycles_across_folders(ring))


def _calls(files: dict[str, str], attr: str) -> set[str]:
    """Files that call something named `attr` (a function or a method)."""
    out = set()
    for rel, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name == attr:
                    out.add(rel)
    return out


def test_one_function_records_a_trial_and_one_lifecycle_runs_a_search():
    """Every backend records trials through search/records.record_trial and lives one run
    lifecycle (search/session.lifecycle): no backend sets a trial's constraints or starts the
    energy tracker itself, and each of the three uses both."""
    files = sources()
    assert _calls(files, "set_constraint") == {"search/records.py"}
    assert _calls(files, "emissions") == {"search/session.py"}
    backends = {"search/local.py", "search/rdb.py", "search/ray_backend.py"}
    assert backends <= _calls(files, "lifecycle")
    assert {"search/local.py", "search/ray_backend.py"} <= _calls(files, "record_trial")
    assert "search/rdb.py" in _calls(files, "run_one")  # run_one records with record_trial


def test_sensitivity_json_has_one_reader():
    files = sources()
    readers = {rel for rel, text in files.items()
               if "sensitivity.json" in text or "FILE)" in text}
    parsing = {rel for rel in readers if "json.loads" in files[rel]}
    assert parsing == {"search/sensitivity_file.py"}, parsing
