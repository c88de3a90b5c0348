"""The project's import structure, read with ast from every module (../shared/DESIGN.md, STYLE.md 12 and 14).

(a) the layers: model/ imports nothing of ours; handler/ and train/ only model/; the client side never the
    model code (nor torch); (b) no import cycle between project modules; (c) a command-line module (one with
    a top-level ``main()``) is a leaf: no project module imports it, unless its ``main`` is thin (at most
    `THIN_MAIN_LINES` lines: argument parsing and a call, as ``python -m ops.server stop`` has); (d) a project
    import inside a function carries a comment on its line or the line above saying why (a deliberate lazy
    load of heavy code), so that no import hides in a function to dodge a cycle.

Imports at module level and inside functions both count; an ``if TYPE_CHECKING:`` import counts for the
layers only (it never runs). Importing ``a.b.c`` also runs the packages ``a`` and ``a.b``: those count as
imported too (for the cycles), except a module's own parent packages. The one test lists every violation
in one message.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The layers (DESIGN.md). The client side talks to the server over the wire: it runs without the model code.
GROUND = "model"  # imports nothing of ours
ON_MODEL = ("handler", "train")  # import only model/
CLIENT_SIDE = ("koa_client", "loadtest", "gateway", "pacs")  # never model/, handler/, train/ or torch
MODEL_CODE = ("model", "handler", "train", "torch")
NOT_PROJECT = ("tests",)  # folders with an __init__.py that are not part of the product
SKIP_PARTS = ("_proto",)  # generated gRPC stubs
THIN_MAIN_LINES = 30
# A comment that only talks to a tool does not say why an import sits in a function.
DIRECTIVE = re.compile(r"^(noqa\b.*|type:\s*ignore.*|fmt:\s*\w+|isort:\s*\w+|pragma\b.*)$")


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    lines: list[str]
    main_lines: int | None = None  # length of a top-level main(), None when there is none


@dataclass
class Import:
    source: str
    target: str
    line: int
    in_function: bool
    type_only: bool
    implicit: bool = False  # a parent package that runs because one of its modules is imported


@dataclass
class Project:
    root: Path
    modules: dict[str, Module]
    imports: list[Import] = field(default_factory=list)

    def where(self, name: str, line: int) -> str:
        return f"{self.modules[name].path.relative_to(self.root)}:{line}"


def find_modules(root: Path) -> dict[str, Module]:
    """Every module of the top-level packages of ``root`` (folders with an ``__init__.py``), by dotted name."""
    out: dict[str, Module] = {}
    for init in sorted(root.glob("*/__init__.py")):
        pkg = init.parent
        if pkg.name in NOT_PROJECT or pkg.name.startswith("."):
            continue
        for path in sorted(pkg.rglob("*.py")):
            rel = path.relative_to(root)
            if any(part in SKIP_PARTS or part.startswith(".") for part in rel.parts):
                continue
            parts = list(rel.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            text = path.read_text()
            tree = ast.parse(text, str(path))
            mains = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == "main"]
            main_lines = mains[0].end_lineno - mains[0].lineno + 1 if mains else None  # type: ignore[operator]
            out[name] = Module(name, path, is_package, tree, text.splitlines(), main_lines)
    return out


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _context(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> tuple[bool, bool]:
    """(inside a function, under ``if TYPE_CHECKING``)."""
    in_function = type_only = False
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            in_function = True
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only = True
    return in_function, type_only


def _longest_module(dotted: str, modules: dict[str, Module]) -> str | None:
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in modules:
            return ".".join(parts[:k])
    return None


def _targets(mod: Module, node: ast.Import | ast.ImportFrom, modules: dict[str, Module]) -> list[tuple[str, bool]]:
    """The project modules an import statement names, each with whether it names it exactly (a ``from pkg import
    sub`` names the module ``pkg.sub``); a module this test does not read (generated stubs) stands for its
    nearest package that it reads, not exactly."""
    if isinstance(node, ast.Import):
        return [(t, t == a.name) for a in node.names if (t := _longest_module(a.name, modules))]
    if node.level:
        base = mod.name.split(".")
        base = base if mod.is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        where = ".".join(base + ([node.module] if node.module else []))
    else:
        where = node.module or ""
    out = []
    for alias in node.names:
        if f"{where}.{alias.name}" in modules:
            out.append((f"{where}.{alias.name}", True))
        elif t := _longest_module(where, modules):
            out.append((t, t == where))
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def read_project(root: Path = ROOT) -> Project:
    modules = find_modules(root)
    project = Project(root, modules)
    for mod in modules.values():
        parents = _parents(mod.tree)
        own = set(_ancestors(mod.name))
        for node in ast.walk(mod.tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            in_function, type_only = _context(node, parents)
            for target, exact in dict.fromkeys(_targets(mod, node, modules)):
                # A module skipped here (generated stubs) inside one's own package runs nothing new.
                if target == mod.name or not exact and target in own:
                    continue
                project.imports.append(Import(mod.name, target, node.lineno, in_function, type_only))
                for parent in _ancestors(target):
                    if parent not in own and parent != mod.name and parent in modules:
                        project.imports.append(Import(mod.name, parent, node.lineno, in_function, type_only, True))
    return project


# ---- the four rules; each yields one line per violation
def layer_violations(project: Project) -> Iterator[str]:
    for mod in project.modules.values():
        top = mod.name.split(".")[0]
        named = {(i.target.split(".")[0], i.line) for i in project.imports if i.source == mod.name and not i.implicit}
        # torch is not ours, but the client side must run without it: read the third-party imports too.
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                named |= {(a.name.split(".")[0], node.lineno) for a in node.names if a.name.split(".")[0] == "torch"}
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "torch":
                named.add(("torch", node.lineno))
        for other, line in sorted(named):
            if other == top or other == "torch" and top not in CLIENT_SIDE:
                continue
            if top == GROUND:
                yield f"{project.where(mod.name, line)}: {mod.name} imports {other}/ (model/ imports nothing of ours)"
            elif top in ON_MODEL and other != GROUND:
                yield f"{project.where(mod.name, line)}: {mod.name} imports {other}/ ({top}/ imports only model/)"
            elif top in CLIENT_SIDE and other in MODEL_CODE:
                yield (
                    f"{project.where(mod.name, line)}: {mod.name} imports {other} "
                    f"({top}/ runs without the model code: never {', '.join(MODEL_CODE)})"
                )


def find_cycles(project: Project) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules, imports that run only."""
    edges: dict[str, set[str]] = {m: set() for m in project.modules}
    for i in project.imports:
        if not i.type_only:
            edges[i.source].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm, iterative over the edges of each module
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:  # the shortest way from the group's first module back to itself
        start, members = group[0], set(group)
        paths = {start: [start]}
        frontier = [start]
        cycle: list[str] | None = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v] & members):
                    if w == start:
                        cycle = [*paths[v], start]
                        break
                    if w not in paths:
                        paths[w] = [*paths[v], w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle or [*group, start])
    return cycles


def cycle_violations(project: Project) -> Iterator[str]:
    for cycle in find_cycles(project):
        yield "import cycle: " + " -> ".join(cycle)


def command_violations(project: Project) -> Iterator[str]:
    for i in project.imports:
        target = project.modules[i.target]
        if i.implicit or target.main_lines is None or target.main_lines <= THIN_MAIN_LINES:
            continue
        yield (
            f"{project.where(i.source, i.line)}: {i.source} imports the command-line module {i.target} "
            f"(its main() is {target.main_lines} lines; move what they share into a library module)"
        )


def _says_why(lines: list[str], line: int) -> bool:
    """Whether import line ``line`` (1-based) has a comment on it, or a comment line just above it."""
    candidates = [lines[line - 1]]
    if line >= 2 and lines[line - 2].strip().startswith("#"):
        candidates.append(lines[line - 2])
    for text in candidates:
        if "#" in text:
            comment = text.split("#", 1)[1].strip()
            if comment and not DIRECTIVE.match(comment):
                return True
    return False


def hidden_violations(project: Project) -> Iterator[str]:
    seen = set()
    for i in project.imports:
        src = project.modules[i.source]
        if i.implicit or not i.in_function or (i.source, i.line) in seen or _says_why(src.lines, i.line):
            continue
        seen.add((i.source, i.line))
        yield (
            f"{project.where(i.source, i.line)}: {i.source} imports {i.target} inside a function with no "
            "comment saying why (a lazy load of heavy code says so; anything else goes to the top)"
        )


RULES = {
    "(a) layers (DESIGN.md)": layer_violations,
    "(b) import cycles": cycle_violations,
    "(c) command-line modules imported by others": command_violations,
    "(d) project imports inside functions without a reason": hidden_violations,
}


def report(project: Project) -> str:
    parts = []
    for title, rule in RULES.items():
        found = sorted(set(rule(project)))
        if found:
            parts.append(f"{title}: {len(found)}\n" + "\n".join(f"  {v}" for v in found))
    return "\n".join(parts)


def test_the_import_structure_keeps_the_house_rules() -> None:
    project = read_project()
    assert {"model", "handler", "train", "ops"} <= set(project.modules), sorted(project.modules)[:20]
    problems = report(project)
    assert not problems, "the import structure breaks the house rules:\n" + problems


# ---- the checker itself, on a small made-up project
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_each_kind_of_violation(tmp_path: Path) -> None:
    long_main = "def main():\n" + "    x = 1\n" * THIN_MAIN_LINES + "    return x\n"
    _write(
        tmp_path,
        {
            "model/__init__.py": "",
            "model/net.py": "from handler import service\n",
            "handler/__init__.py": "",
            "handler/service.py": "import model.net\n",
            "loadtest/__init__.py": "",
            "loadtest/run.py": "import torch\n" + long_main,
            "ops/__init__.py": "",
            "ops/a.py": "from ops import b\n",
            "ops/b.py": "def f():\n    from ops import a\n    return a\n",
            "ops/c.py": "from loadtest import run\n",
            "ops/d.py": "def f():\n    # lazy: torch only here\n    from loadtest import run  # noqa: F401\n",
            "ops/e.py": "from ops.cli import helper\n",
            "ops/cli.py": "def helper():\n    pass\n\n\ndef main():\n    return helper()\n",
            # generated stubs inside a package are not read; importing them is no cycle through the package
            "koa/__init__.py": "def f():\n    # lazy: grpc when used\n    from koa import grpc\n",
            "koa/grpc.py": "def g():\n    # lazy: the stubs when used\n    from koa._proto import stub\n",
            "koa/_proto/stub.py": "",
        },
    )
    text = report(read_project(tmp_path))
    assert "model.net imports handler/" in text
    assert "loadtest.run imports torch" in text
    assert "import cycle: handler.service -> model.net -> handler.service" in text
    assert "import cycle: ops.a -> ops.b -> ops.a" in text
    assert "ops.c imports the command-line module loadtest.run" in text
    assert "ops.b imports ops.a inside a function" in text
    # a thin main may be imported; a commented lazy import is allowed (the command rule still applies to it)
    assert "ops.e imports" not in text
    assert "ops.d imports loadtest.run inside a function" not in text
    assert "ops.d imports the command-line module loadtest.run" in text
    assert "koa" not in text
