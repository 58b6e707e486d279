"""The house rules of the layout, read from the source with `ast` (nothing is imported):

    cli.py → commands/ → pipeline/ → libraries (fuse, merge, evals, world, implicit) → core/

No import cycle; layers point down only; merge/ and evals/ never import fuse/; no module outside
tests imports a private name of another module; no Python file is over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "fuse", "merge", "evals", "world", "implicit", "pipeline", "commands")
LIBRARIES = ("core", "fuse", "merge", "evals", "world", "implicit")
SKIP = {".venv", ".cache", "build", "runs", ".git"}
MAX_LINES = 400


def _files() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.py") if not SKIP & set(p.relative_to(REPO).parts[:1]))


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module(p): p for p in _files()}
OURS = {m for m in MODULES if m.split(".")[0] in PACKAGES or m == "cli"}


def _ours(name: str) -> str | None:
    """The module of ours that `import name` loads (a package's own __init__ included), else None."""
    while name:
        if name in OURS:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) of every import in `module`, at any depth
    (function-level imports count: they run, and cycles through them are cycles all the same)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if _ours(sub) == sub:  # `from package import module`
                    found.append((sub, [], node.lineno))
                else:
                    found.append((base, [alias.name], node.lineno))
    return found


GRAPH = {m: {(_ours(name), tuple(names), line) for name, names, line in _imports(m) if _ours(name) and _ours(name) != m}
         for m in OURS}


def _edges(module: str) -> set[str]:
    return {target for target, _, _ in GRAPH[module]}


def _layer(module: str) -> str:
    return module.split(".")[0]


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(_edges(m)):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(OURS):
        if m not in state:
            visit(m)


def _violations(sources: tuple[str, ...], allowed) -> list[str]:
    bad = []
    for m in sorted(OURS):
        if _layer(m) not in sources:
            continue
        for target, _, line in sorted(GRAPH[m], key=lambda e: (e[2], e[0])):
            if not allowed(m, target):
                bad.append(f"{MODULES[m].relative_to(REPO)}:{line} imports {target}")
    return bad


def test_core_is_the_ground_floor() -> None:
    assert _violations(("core",), lambda m, t: _layer(t) == "core") == []


def test_merge_and_evals_never_import_fuse() -> None:
    assert _violations(("merge", "evals"), lambda m, t: _layer(t) != "fuse") == []


def test_libraries_never_import_the_orchestration_or_the_commands() -> None:
    assert _violations(LIBRARIES, lambda m, t: _layer(t) not in ("pipeline", "commands", "cli")) == []


def test_pipeline_never_imports_the_commands() -> None:
    assert _violations(("pipeline",), lambda m, t: _layer(t) not in ("commands", "cli")) == []


def _schema(module: str) -> bool:
    """A section schema: a library's `config` module (torch-free dataclasses the commands parse flags from)."""
    return _layer(module) in LIBRARIES and module.rsplit(".", 1)[-1] == "config"


def test_commands_import_only_pipeline_core_and_section_schemas() -> None:
    assert _violations(("commands",), lambda m, t: _layer(t) in ("core", "pipeline", "commands") or _schema(t)) == []


def test_cli_imports_only_core_and_the_commands_it_names() -> None:
    assert {t for t, _, _ in GRAPH["cli"]} <= {"core.offline", "core.errors"}
    tree = ast.parse(MODULES["cli"].read_text(encoding="utf-8"))
    table = next(n.value for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) and n.target.id == "COMMANDS")
    named = [ast.literal_eval(v)[0] for v in table.values]  # command -> (module, help)
    assert named and all(m in OURS and _layer(m) == "commands" for m in named), named


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_is_imported_from_another_module() -> None:
    bad = []
    for m in sorted(OURS | {k for k in MODULES if _layer(k) == "bench"}):
        if _layer(m) == "tests":
            continue
        tree = ast.parse(MODULES[m].read_text(encoding="utf-8"))
        aliases: dict[str, str] = {}  # local name -> our module it stands for
        for name, names, line in _imports(m):
            target = _ours(name)
            if target is None or target == m:
                continue
            bad += [f"{m}:{line} takes {n} from {target}" for n in names if _private(n)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _ours(a.name):
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    if _ours(f"{node.module}.{a.name}") == f"{node.module}.{a.name}":
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                chain, value = [node.attr], node.value
                while isinstance(value, ast.Attribute):
                    chain.append(value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id in aliases:
                    bad.append(f"{m}:{node.lineno} reads {aliases[value.id]}...{node.attr}")
    assert bad == []


def test_no_python_file_over_400_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in _files()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_the_rules_see_the_layout() -> None:
    """The checks above read a real graph: every layer is found, with imports between them."""
    assert {_layer(m) for m in OURS} >= set(PACKAGES) | {"cli"}
    assert "core.errors" in _edges("commands.run") and "pipeline.recipe" in _edges("pipeline.run")
    assert "fuse.extract.store" in _edges("fuse.targets.rows")
