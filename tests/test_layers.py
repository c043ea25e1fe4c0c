"""The layer rule (docs/architecture.md), read from the sources: which tilegraph modules each folder
may import, no import circles, no private attribute read across module boundaries, and every module
opening with a line that says its job."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"runtime": "tilegraph", "planner": "tilegraph.planner", "kernels": "tilegraph.kernels", "graphs": "tilegraph.graphs"}

FOUNDATION = {"tilegraph", "tilegraph._device", "tilegraph.errors", "tilegraph.settings"}
NVTX = {"tilegraph.nvtx_ranges"}
#: tilegraph modules each folder may import (beyond its own folder's modules)
ALLOWED = {
    "tilegraph.planner": FOUNDATION,
    "tilegraph.kernels": FOUNDATION | NVTX | {"tilegraph.planner.layout", "tilegraph.planner.prefill_layout"},
    "tilegraph.graphs": FOUNDATION | NVTX | {"tilegraph.kernels.launch"},
}
#: the one kernels module that reads the variant definitions (inside its functions)
VARIANT_READERS = {"tilegraph.kernels.compile_spec": {"tilegraph.variants"}}
#: the core (runtime/ outside its subpackages) never imports the tooling or the serving stack
CORE_FORBIDDEN = ("tilegraph.tools", "tilegraph.serving", "tilegraph.integrations")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    name = ".".join(parts)[: -len(".py")]
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def sources() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found[module_name(path)] = path
    return found


MODULES = sources()


def imports(name: str, top_level_only: bool = False) -> set[str]:
    """tilegraph modules ``name`` imports (``from pkg import sub`` counts sub when it is a module)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tilegraph")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("tilegraph"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return found - {name}


def folder_of(name: str) -> str:
    for prefix in ("tilegraph.planner", "tilegraph.kernels", "tilegraph.graphs"):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return "tilegraph"


def is_core(name: str) -> bool:
    """runtime/ minus its subpackages and the CLI (which dispatches to the tools)."""
    return folder_of(name) == "tilegraph" and not name.startswith(CORE_FORBIDDEN) and name != "tilegraph.__main__"


def test_the_sources_are_found():
    assert {"tilegraph.attention", "tilegraph.planner.decode", "tilegraph.kernels.hooks", "tilegraph.graphs.runner"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if folder_of(n) in ALLOWED))
def test_lower_folders_import_only_what_the_rule_allows(name):
    folder = folder_of(name)
    allowed = ALLOWED[folder] | VARIANT_READERS.get(name, set())
    bad = sorted(m for m in imports(name) if folder_of(m) != folder and m not in allowed)
    assert not bad, f"{name} imports {bad}; {folder} may import only {sorted(allowed)} (docs/architecture.md)"


def test_only_compile_spec_reads_the_variants_among_kernels():
    readers = {n for n in MODULES if folder_of(n) == "tilegraph.kernels" and "tilegraph.variants" in imports(n)}
    assert readers <= set(VARIANT_READERS), readers


@pytest.mark.parametrize("name", sorted(n for n in MODULES if is_core(n) and n not in ("tilegraph", "tilegraph._moved")))
def test_the_core_does_not_import_tooling_or_serving(name):
    bad = sorted(m for m in imports(name) if m.startswith(CORE_FORBIDDEN))
    assert not bad, f"{name} (core) imports {bad}"


def test_no_import_circles():
    graph = {n: {m for m in imports(n, top_level_only=True) if m in MODULES} for n in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if m == "tilegraph" or n == "tilegraph":
                continue  # the package __init__ only re-exports (lazily)
            if state.get(m) == 1:
                circle = stack[stack.index(m) :] + [m]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


PRIVATE_READ = re.compile(r"(?<![\w.])(?!self\b|cls\b)([a-z]\w*)\._(?!_)[a-z]\w*")
#: receivers that are not objects of another module: modules' own private names read through their
#: module object are still cross-module reads, so only these stdlib/third-party ones are exempt
EXEMPT_RECEIVERS = {"tilegraph", "sys", "os", "torch", "np", "numba", "cuda", "threading", "warnings", "importlib", "types", "inspect"}
#: namedtuple's API is underscored but public
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make"}


def private_reads(path: Path, root: Path = ROOT) -> list[str]:
    """``obj._name`` reads in ``path`` where ``_name`` is not this module's own (defined or assigned
    here: then it is another instance of a class of this module)."""
    text = path.read_text()
    own = set(re.findall(r"\b\w+\.(_\w+)\s*(?::[^=]*)?=(?!=)", text)) | set(re.findall(r"\bdef (_\w+)", text))
    hits = []
    for lineno, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        code = re.sub(r"(\"[^\"]*\"|'[^']*')", "''", code)  # strings are not reads
        for match in PRIVATE_READ.finditer(code):
            receiver, attribute = match.group(1), match.group(0).split(".", 1)[1]
            if receiver in EXEMPT_RECEIVERS or attribute in own or attribute in PUBLIC_UNDERSCORED:
                continue
            hits.append(f"{path.relative_to(root)}:{lineno}: {match.group(0)}")
    return hits


#: reads of private state that stay inside the object's own module (other instances of the same
#: class, or numba-cuda's simulator internals the primitives emulate against, pinned in pyproject)
SAME_MODULE_OR_PINNED = ("kernels/_sim_warp.py", "kernels/_sim_async.py", "runtime/_device.py", "runtime/_moved.py", "graphs/standin.py")


def test_no_private_attribute_is_read_across_modules():
    hits = []
    for name, path in MODULES.items():
        rel = str(path.relative_to(ROOT))
        if rel.startswith(SAME_MODULE_OR_PINNED) or "/tools/" in rel or "/serving/" in rel:
            continue
        hits += private_reads(path)
    assert not hits, "private attributes read across module boundaries:\n" + "\n".join(hits)


def test_the_check_finds_a_private_read(tmp_path):
    bad = tmp_path / "runtime" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("def f(level):\n    return level._positions  # a cross-module read\n")
    assert private_reads(bad, tmp_path) == ["runtime/bad.py:2: level._positions"]
    bad.write_text("class A:\n    def __init__(self):\n        self._positions = 1\n    def same(self, other):\n        return other._positions\n")
    assert private_reads(bad, tmp_path) == []  # another instance of this module's own class


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_opens_with_its_job(name):
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text()))
    assert doc and doc.strip().splitlines()[0].strip(), f"{name} has no opening line saying its job"
