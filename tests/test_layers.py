"""The layers of kdforge, kept by a test: which packages may import which, and no import cycles.

Every module of src/kdforge is parsed (never imported) and every import of a kdforge module
is collected, at module level and inside functions; imports under ``if TYPE_CHECKING:``
(annotations only) are skipped. The rules:

* the lower layers (``losses``, ``signals``, ``models``, ``data``, ``engine``, ``eval``) never
  import the higher ones (``tasks``, ``methods``, ``runner``, ``cli``, ``report``);
* ``tasks`` never imports ``methods``, ``runner`` or ``cli``; ``methods`` never imports
  ``runner`` or ``cli``;
* ``kdforge.recipe``, the recipe schema, is a leaf: it imports only ``kdforge.errors``,
  ``kdforge.provenance`` and ``kdforge.registry``;
* no import cycle among modules, counting the module-level imports; nor counting the imports
  inside functions too, except through the edges of :data:`CYCLE_EDGES_ALLOWED`.

The checker is :func:`layer_problems`; the tests below also plant violations to show it bites.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "kdforge"

LOWER = ("losses", "signals", "models", "data", "engine", "eval")
HIGHER = ("tasks", "methods", "runner", "cli", "report")
#: layer -> the layers it never imports (a layer: the part after ``kdforge.``, e.g. kdforge.tasks.base -> tasks)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    **{layer: HIGHER for layer in LOWER},
    "tasks": ("methods", "runner", "cli"),
    "methods": ("runner", "cli"),
}
#: leaf modules -> the only kdforge modules they import
LEAVES: dict[str, tuple[str, ...]] = {
    "kdforge.recipe": ("kdforge.errors", "kdforge.provenance", "kdforge.registry"),
}
#: imports inside functions that may close a cycle, each with its reason
CYCLE_EDGES_ALLOWED: dict[tuple[str, str], str] = {
    ("kdforge", "kdforge.api"): (
        "kdforge/__init__.py loads kdforge.api on first use of kdforge.load_recipe or kdforge.run (PEP 562"
        " __getattr__), so that `import kdforge` stays free of torch; the modules below it that read"
        " kdforge.__version__ (report.builder) get it from the package, which defines it before any submodule"
    ),
}


@dataclass(frozen=True)
class Module:
    name: str
    source: str
    is_package: bool = False


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the kdforge module imported
    line: int
    in_function: bool

    def where(self) -> str:
        return f"{self.source}:{self.line} ({'inside a function' if self.in_function else 'module level'})"


def read_tree(root: Path = SRC) -> list[Module]:
    """Every module of the package folder ``root`` (named as imported: kdforge.signals.base)."""
    modules = []
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules.append(Module(name, path.read_text(encoding="utf-8"), is_package))
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def collect_imports(modules: Iterable[Module]) -> list[Import]:
    """Each import of a kdforge module by one of ``modules``; ``from a import b`` names the module
    ``a.b`` when there is one, else ``a``."""
    modules = list(modules)
    known = {m.name for m in modules}
    found: list[Import] = []

    def resolve(module: Module, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(module: Module, node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for branch in child.orelse:  # the else branch runs
                    visit_one(module, branch, in_function)
                continue
            visit_one(module, child, in_function)

    def visit_one(module: Module, node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "kdforge" or alias.name.startswith("kdforge."):
                    found.append(Import(module.name, alias.name, node.lineno, in_function))
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, node)
            if base == "kdforge" or base.startswith("kdforge."):
                targets = {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
                found.extend(Import(module.name, t, node.lineno, in_function) for t in sorted(targets))
        else:
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(module, node, inner)

    for module in modules:
        visit(module, ast.parse(module.source, filename=module.name), False)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def direction_problems(imports: Iterable[Import]) -> list[str]:
    problems = []
    for imp in imports:
        if layer(imp.target) in FORBIDDEN.get(layer(imp.source), ()):
            problems.append(
                f"{imp.where()} imports {imp.target}: {layer(imp.source)} never imports {layer(imp.target)}"
            )
        allowed = LEAVES.get(imp.source)
        if allowed is not None and imp.target not in allowed:
            problems.append(f"{imp.where()} imports {imp.target}: {imp.source} imports only {', '.join(allowed)}")
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):  # Tarjan's algorithm, iterative
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))
    return sorted(components)


def _one_cycle(component: list[str], edges: dict[tuple[str, str], Import]) -> str:
    """A shortest cycle through the first module of a component, each step with its import line."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for (source, target), _ in sorted(edges.items()):
            if source != node or target not in members:
                continue
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                path.reverse()
                steps = [edges[(a, b)].where() for a, b in zip(path, [*path[1:], start])]
                return " -> ".join([*path, start]) + f" [{'; '.join(steps)}]"
            if target not in previous:
                previous[target] = node
                queue.append(target)
    return " <-> ".join(component)


def cycle_problems(
    imports: Iterable[Import], *, in_functions: bool, allowed: Iterable[tuple[str, str]] = ()
) -> list[str]:
    """Every import cycle (one per group of modules importing each other), counting the module-level
    imports, and with ``in_functions`` those inside functions too (less the ``allowed`` edges)."""
    allowed = set(allowed)
    edges: dict[tuple[str, str], Import] = {}
    for imp in imports:
        if (imp.in_function and not in_functions) or (imp.source, imp.target) in allowed:
            continue
        edge = (imp.source, imp.target)
        if edge not in edges or edges[edge].in_function > imp.in_function:  # show a module-level line first
            edges[edge] = imp
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
    kind = "import cycle (counting imports inside functions)" if in_functions else "import cycle"
    return [f"{kind}: {_one_cycle(c, edges)}; modules: {', '.join(c)}" for c in _cycles(graph)]


def layer_problems(modules: Iterable[Module], allowed: Iterable[tuple[str, str]] = CYCLE_EDGES_ALLOWED) -> list[str]:
    """Everything wrong with the layering of ``modules``, one line each (an empty list: none)."""
    imports = collect_imports(modules)
    return [
        *direction_problems(imports),
        *cycle_problems(imports, in_functions=False),
        *cycle_problems(imports, in_functions=True, allowed=allowed),
    ]


# ----- the tests --------------------------------------------------------------------------


def test_kdforge_keeps_its_layers():
    problems = layer_problems(read_tree())
    assert not problems, "\n".join(problems)


def test_every_allowed_cycle_edge_is_still_an_import():
    """An allowance outlives its import only by mistake: remove it with the import."""
    edges = {(imp.source, imp.target) for imp in collect_imports(read_tree()) if imp.in_function}
    assert set(CYCLE_EDGES_ALLOWED) <= edges, set(CYCLE_EDGES_ALLOWED) - edges


def _modules(**sources: str) -> list[Module]:
    """A synthetic package: module name (dots as __) -> source; a name ending in __init names a package."""
    made = []
    for key, text in sources.items():
        name = key.replace("__", ".")
        is_package = name.endswith(".init")
        made.append(Module(name.removesuffix(".init"), text, is_package))
    return made


def test_a_lower_layer_importing_a_task_is_reported_at_module_level_and_inside_a_function():
    modules = _modules(
        kdforge__losses__x="from kdforge.tasks import TASKS\n",
        kdforge__models__y="def f():\n    from kdforge.runner import run_recipe\n",
        kdforge__tasks__init="",
        kdforge__runner="",
    )
    problems = layer_problems(modules)
    assert problems == [
        "kdforge.losses.x:1 (module level) imports kdforge.tasks: losses never imports tasks",
        "kdforge.models.y:2 (inside a function) imports kdforge.runner: models never imports runner",
    ]


def test_type_checking_imports_are_allowed_and_relative_imports_resolved():
    modules = _modules(
        kdforge__signals__init="",
        kdforge__signals__x=(
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from kdforge.tasks.base import Task\n"
            "else:\n    from ..methods import M\n"
        ),
        kdforge__tasks__init="",
        kdforge__tasks__base="",
        kdforge__methods__init="",
    )
    assert layer_problems(modules) == [
        "kdforge.signals.x:5 (module level) imports kdforge.methods: signals never imports methods"
    ]


def test_the_recipe_schema_importing_a_registry_of_a_higher_layer_is_reported():
    modules = _modules(
        kdforge__recipe="from kdforge.errors import RecipeError\ndef f():\n    import kdforge.losses.registry\n",
        kdforge__errors="",
        kdforge__losses__registry="",
    )
    assert layer_problems(modules) == [
        "kdforge.recipe:3 (inside a function) imports kdforge.losses.registry: kdforge.recipe imports only"
        " kdforge.errors, kdforge.provenance, kdforge.registry"
    ]


def test_cycles_are_reported_with_their_modules_and_lines():
    modules = _modules(
        kdforge__a="import kdforge.b\n",
        kdforge__b="from kdforge import c\n",
        kdforge__c="def f():\n    import kdforge.a\n",
        kdforge__d="from kdforge import e\n",
        kdforge__e="from kdforge.d import x\n",
    )
    assert layer_problems(modules) == [
        "import cycle: kdforge.d -> kdforge.e -> kdforge.d [kdforge.d:1 (module level); kdforge.e:1 (module level)];"
        " modules: kdforge.d, kdforge.e",
        "import cycle (counting imports inside functions): kdforge.a -> kdforge.b -> kdforge.c -> kdforge.a"
        " [kdforge.a:1 (module level); kdforge.b:1 (module level); kdforge.c:2 (inside a function)];"
        " modules: kdforge.a, kdforge.b, kdforge.c",
        "import cycle (counting imports inside functions): kdforge.d -> kdforge.e -> kdforge.d"
        " [kdforge.d:1 (module level); kdforge.e:1 (module level)]; modules: kdforge.d, kdforge.e",
    ]
    assert not any("kdforge.a" in p for p in layer_problems(modules, allowed=[("kdforge.c", "kdforge.a")]))


def test_a_forbidden_import_planted_in_a_copy_of_the_source_tree_is_reported(tmp_path):
    copy = tmp_path / "kdforge"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__", "*.yaml", "*.jsonl", "*.html"))
    before = layer_problems(read_tree(copy))  # the tree's own problems, if any, are the other test's
    common = copy / "losses" / "common.py"
    lines = len(common.read_text().splitlines())
    common.write_text(common.read_text() + "\n\ndef _planted():\n    from kdforge.tasks.base import Task\n")
    problems = layer_problems(read_tree(copy))
    assert [p for p in problems if p not in before] == [
        f"kdforge.losses.common:{lines + 4} (inside a function) imports kdforge.tasks.base: losses never imports tasks"
    ]
