"""The import graph of hvdtrain: no cycle, and every import goes down the layers.

Layers, bottom to top (DESIGN.md): errors/config/layout/catalogs -> comm -> strategies, data,
sources, checkpoint -> train -> api, cli -> tools. The graph comes from an AST walk over every
module of hvdtrain/: module-level and function-level imports (TYPE_CHECKING ones too), `import
x`, `from x import y` and relative imports. `from pkg import name` is an edge to the module
pkg.name when there is one, else to pkg; the implicit import of a module's parent packages is
not an edge, and neither is a module name held in a string (cli.py's table of tools).

The checks are pure functions of the graph, so each is also fed a small synthetic graph below
to prove it can fail.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "hvdtrain"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

#: Bottom to top; a module's layer is that of its longest matching entry (an entry matches the
#: module itself and, except the root package, everything under it). An import may only go to
#: the same or a lower layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("hvdtrain.errors", "hvdtrain.config", "hvdtrain.layout", "hvdtrain.plugins",
                    "hvdtrain.catalog", "hvdtrain.strategies.catalog", "hvdtrain.applies")),
    ("comm", ("hvdtrain.comm",)),
    ("parts", ("hvdtrain.strategies", "hvdtrain.data", "hvdtrain.sources", "hvdtrain.checkpoint",
               "hvdtrain.registry", "hvdtrain.models", "hvdtrain.metrics", "hvdtrain.guard",
               "hvdtrain.examples")),
    ("loop", ("hvdtrain.train",)),
    ("entry", ("hvdtrain", "hvdtrain.api", "hvdtrain.cli", "hvdtrain.__main__", "hvdtrain.versions")),
    ("tools", ("hvdtrain.tools",)),
]
TOOLS = "hvdtrain.tools"
NOT_CORE = (TOOLS, "hvdtrain.examples")
#: What hvdtrain.config may import: leaves only (no registry, no strategy, no library).
CONFIG = "hvdtrain.config"
CATALOGS = ("hvdtrain.catalog", "hvdtrain.strategies.catalog")


@dataclass(frozen=True)
class Import:
    source: str          # the importing module
    target: str          # the hvdtrain module imported
    name: str | None     # the name taken by `from ... import name` (None for `import target`)
    line: int

    def __str__(self) -> str:
        what = f"{self.target}:{self.name}" if self.name and not self.target.endswith("." + self.name) else self.target
        return f"{self.source} -> {what} (line {self.line})"


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# ---- building the graph from source ---------------------------------------------------------

def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package folder `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def scan(root: Path) -> tuple[dict[str, Path], list[Import], list[str]]:
    """(modules, imports between them, imports of the package that name no module)."""
    package = root.name
    modules = module_files(root)
    imports: list[Import] = []
    unresolved: list[str] = []

    def ours(name: str) -> bool:
        return under(name, package)

    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            found: list[tuple[str, str | None]] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        found.append((alias.name, None))
                    elif ours(alias.name):
                        unresolved.append(f"{module} line {node.lineno}: import {alias.name}")
            elif isinstance(node, ast.ImportFrom):
                base = _from_base(module, path.name == "__init__.py", node)
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        found.append((f"{base}.{alias.name}", alias.name))
                    elif base in modules:
                        found.append((base, alias.name))
                    elif ours(base):
                        unresolved.append(f"{module} line {node.lineno}: from {base} import {alias.name}")
            imports += [Import(module, target, name, node.lineno) for target, name in found if target != module]
    return modules, imports, unresolved


def edges(imports: list[Import]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for imp in imports:
        out.setdefault(imp.source, set()).add(imp.target)
        out.setdefault(imp.target, set())
    return out


# ---- the checks: each returns what breaks its rule ------------------------------------------

def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(_cycle_in(set(c), graph) for c in components)


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ()) & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            hit = module == p if p == PACKAGE else under(module, p)
            if hit and (best is None or len(p) > best[0]):
                best = (len(p), i)
    return None if best is None else best[1]


def upward_imports(imports: list[Import], layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> list[str]:
    out = []
    for imp in imports:
        src, dst = layer_of(imp.source, layers), layer_of(imp.target, layers)
        if src is not None and dst is not None and dst > src:
            out.append(f"{imp}: layer '{layers[src][0]}' imports the higher layer '{layers[dst][0]}'")
    return out


def unlayered(modules: list[str], layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> list[str]:
    return [m for m in modules if layer_of(m, layers) is None]


def core_imports_tool(imports: list[Import]) -> list[str]:
    return [str(i) for i in imports
            if not any(under(i.source, p) for p in NOT_CORE) and under(i.target, TOOLS)]


def config_non_leaf(imports: list[Import]) -> list[str]:
    """config may import only foundation modules, and no registry or strategy (the catalogs are
    leaves); a catalog imports nothing of hvdtrain but errors."""
    out = []
    for i in imports:
        if i.source == CONFIG and (under(i.target, "hvdtrain.registry") or layer_of(i.target) != 0
                                   or (under(i.target, "hvdtrain.strategies") and i.target not in CATALOGS)):
            out.append(f"{i}: config imports only leaves (errors, plugins, the catalogs)")
        if i.source in CATALOGS and i.target != "hvdtrain.errors":
            out.append(f"{i}: a catalog is a leaf (it may import hvdtrain.errors only)")
    return out


def comm_imports_strategies(imports: list[Import]) -> list[str]:
    return [str(i) for i in imports if under(i.source, "hvdtrain.comm") and under(i.target, "hvdtrain.strategies")]


def private_imports(imports: list[Import]) -> list[str]:
    """A tool takes no `_private` name (nor a module named so) from any other module."""
    out = []
    for i in imports:
        if not under(i.source, TOOLS):
            continue
        parts = i.target.split(".")[1:] + ([i.name] if i.name else [])
        bad = [p for p in parts if is_private(p)]
        if bad:
            out.append(f"{i}: takes the private name {bad[-1]!r}; make it public in {i.target}")
    return out


def private_attributes(modules: dict[str, Path]) -> list[str]:
    """`from hvdtrain import cli; cli._x` in a tool: the same private use, through an attribute."""
    out = []
    for module, path in modules.items():
        if not under(module, TOOLS):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        bound: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or under(node.module or "", PACKAGE)):
                bound |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                bound |= {a.asname or a.name.split(".")[0] for a in node.names if under(a.name, PACKAGE)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and is_private(node.attr)):
                out.append(f"{module} line {node.lineno}: {node.value.id}.{node.attr}")
    return out


# ---- the real package -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Import], list[str]]:
    return scan(ROOT)


def _fail_with(problems: list[str], rule: str) -> None:
    assert not problems, rule + ":\n  " + "\n  ".join(problems)


def test_every_import_of_hvdtrain_names_a_module(graph):
    _, _, unresolved = graph
    _fail_with(unresolved, "imports of hvdtrain modules that do not exist (moved? renamed?)")


def test_no_import_cycle(graph):
    _, imports, _ = graph
    cycles = [" -> ".join(c) for c in find_cycles(edges(imports))]
    _fail_with(cycles, "import cycles (break each by moving the shared names into a lower-layer leaf)")


def test_every_module_has_a_layer(graph):
    modules, _, _ = graph
    _fail_with(unlayered(list(modules)), "modules missing from LAYERS in tests/test_imports.py")


def test_imports_only_go_down_the_layers(graph):
    _, imports, _ = graph
    _fail_with(upward_imports(imports), "imports that go up a layer "
               "(errors/config/layout/catalogs -> comm -> strategies, data, sources, checkpoint -> "
               "train -> api, cli -> tools)")


def test_the_core_imports_no_tool(graph):
    _, imports, _ = graph
    _fail_with(core_imports_tool(imports), "core modules importing hvdtrain.tools (dispatch through "
               "a module-name string, as cli.FORWARDED does)")


def test_config_imports_only_leaves(graph):
    _, imports, _ = graph
    _fail_with(config_non_leaf(imports), "hvdtrain.config importing a non-leaf")


def test_comm_imports_no_strategy(graph):
    _, imports, _ = graph
    _fail_with(comm_imports_strategies(imports), "hvdtrain.comm importing hvdtrain.strategies "
               "(collectives know no training policy)")


def test_tools_use_only_public_names(graph):
    modules, imports, _ = graph
    _fail_with(private_imports(imports) + private_attributes(modules), "tools using private names")


def test_tools_and_catalogs_are_where_the_layers_say(graph):
    modules, _, _ = graph
    for name in ("hvdtrain.tools.bench", "hvdtrain.tools.compare", "hvdtrain.tools.doctor",
                 "hvdtrain.tools.launch", "hvdtrain.tools.allreduce_impls", *CATALOGS):
        assert name in modules, f"{name} is missing from hvdtrain/"
    flat = [m for m in modules if m.split(".")[-1] in ("bench", "compare", "doctor", "launch", "plots", "tables",
                                                       "allreduce_impls") and not under(m, TOOLS)]
    assert not flat, f"tool modules outside hvdtrain/tools/: {flat}"


# ---- each check can fail --------------------------------------------------------------------

def _imports(*pairs: str) -> list[Import]:
    out = []
    for n, pair in enumerate(pairs, 1):
        src, _, dst = pair.partition(" -> ")
        target, _, name = dst.partition(":")
        out.append(Import(src, target, name or None, n))
    return out


def test_find_cycles_reports_each_cycle_and_only_cycles():
    graph = edges(_imports("a -> b", "b -> c", "c -> a", "c -> d", "d -> e", "e -> d", "f -> f", "g -> a"))
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["d", "e", "d"], ["f", "f"]]
    assert find_cycles(edges(_imports("a -> b", "b -> c", "a -> c"))) == []


def test_upward_imports_are_reported_with_both_layers():
    found = upward_imports(_imports("hvdtrain.comm.ring -> hvdtrain.train", "hvdtrain.train -> hvdtrain.comm.base",
                                    "hvdtrain.api -> hvdtrain.train", "hvdtrain.cli -> hvdtrain.tools.compare",
                                    "hvdtrain.config -> hvdtrain.strategies.catalog",
                                    "hvdtrain.config -> hvdtrain.strategies"))
    assert len(found) == 3, found
    assert "hvdtrain.comm.ring -> hvdtrain.train (line 1)" in found[0] and "'comm'" in found[0] and "'loop'" in found[0]
    assert "hvdtrain.tools.compare" in found[1] and "hvdtrain.config -> hvdtrain.strategies (line 6)" in found[2]
    assert layer_of("hvdtrain") == 4 and layer_of("hvdtrain.nothing_listed") is None
    assert unlayered(["hvdtrain.errors", "hvdtrain.newthing"]) == ["hvdtrain.newthing"]


def test_rule_checks_report_offending_edges():
    assert core_imports_tool(_imports("hvdtrain.train -> hvdtrain.tools.launch", "hvdtrain.tools.bench -> hvdtrain.cli",
                                      "hvdtrain.examples.x -> hvdtrain.tools.tables")) == \
        ["hvdtrain.train -> hvdtrain.tools.launch (line 1)"]
    bad = config_non_leaf(_imports("hvdtrain.config -> hvdtrain.registry:MODELS", "hvdtrain.config -> hvdtrain.errors",
                                   "hvdtrain.config -> hvdtrain.strategies:STRATEGIES",
                                   "hvdtrain.config -> hvdtrain.strategies.catalog:STRATEGIES",
                                   "hvdtrain.catalog -> hvdtrain.config"))
    assert [b.split(":")[0] for b in bad] == ["hvdtrain.config -> hvdtrain.registry", "hvdtrain.config -> hvdtrain.strategies",
                                             "hvdtrain.catalog -> hvdtrain.config (line 5)"]
    assert comm_imports_strategies(_imports("hvdtrain.comm.mpi -> hvdtrain.strategies.mpi_average",
                                            "hvdtrain.comm -> hvdtrain.comm.env")) == \
        ["hvdtrain.comm.mpi -> hvdtrain.strategies.mpi_average (line 1)"]
    bad = private_imports(_imports("hvdtrain.tools.x -> hvdtrain.cli:_json", "hvdtrain.tools.x -> hvdtrain:__version__",
                                   "hvdtrain.tools.x -> hvdtrain.tools._util", "hvdtrain.cli -> hvdtrain.config:_check",
                                   "hvdtrain.tools.x -> hvdtrain.cli:Parser"))
    assert len(bad) == 2 and "'_json'" in bad[0] and "'_util'" in bad[1]


def test_scan_resolves_every_form_of_import(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "tools").mkdir()
    files = {
        "__init__.py": "",
        "a.py": "import hvdtrain.sub.b\nfrom hvdtrain import c\n",
        "c.py": "def f():\n    from .sub import b\n    from . import a\n",
        "sub/__init__.py": "from .b import thing\n",
        "sub/b.py": "from ..c import f\nfrom hvdtrain.gone import x\nimport os\n",
        "tools/__init__.py": "",
        "tools/t.py": "from hvdtrain import c as C\nfrom hvdtrain.a import _hidden\nC._private()\nC.__name__\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    modules, imports, unresolved = scan(pkg)
    got = sorted((i.source, i.target, i.name) for i in imports)
    assert got == sorted([
        ("hvdtrain.a", "hvdtrain.sub.b", None), ("hvdtrain.a", "hvdtrain.c", "c"),
        ("hvdtrain.c", "hvdtrain.sub.b", "b"), ("hvdtrain.c", "hvdtrain.a", "a"),
        ("hvdtrain.sub", "hvdtrain.sub.b", "thing"), ("hvdtrain.sub.b", "hvdtrain.c", "f"),
        ("hvdtrain.tools.t", "hvdtrain.c", "c"), ("hvdtrain.tools.t", "hvdtrain.a", "_hidden"),
    ])
    assert unresolved == ["hvdtrain.sub.b line 2: from hvdtrain.gone import x"]
    # {a, c, sub.b} is one component: its shortest cycle through the first name is reported
    assert find_cycles(edges(imports)) == [["hvdtrain.a", "hvdtrain.c", "hvdtrain.a"]]
    assert private_attributes(modules) == ["hvdtrain.tools.t line 3: C._private"]
    assert len(private_imports(imports)) == 1
