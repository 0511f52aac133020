"""The package's modules form layers: no import cycle, counting the imports inside functions
(which hide a cycle from the interpreter but not from a reader) and the registries' imports of
every module of their package."""

import ast
import pathlib

import jaxunlearn

PACKAGE = pathlib.Path(jaxunlearn.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(target: str, modules) -> str | None:
    while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]
    return target if target in modules else None


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at any level of the file."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:  # `from pkg import module` names a module
                    full = f"{node.module}.{alias.name}"
                    deps.add(_resolve(full if full in modules else node.module, modules))
            elif isinstance(node, ast.Import):
                deps |= {_resolve(a.name, modules) for a in node.names}
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and path.name == "__init__.py"):
                deps |= {m for m in modules if m.startswith(name + ".")}  # a registry
        graph[name] = {d for d in deps if d and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["jaxunlearn.driver"]  # the graph was read
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles_at_any_depth():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_settings_and_their_parts_are_layered():
    graph = import_graph()
    # The settings import nothing of the package; the checks against the parts sit above.
    assert not {d for d in graph["jaxunlearn.config"] if d.startswith("jaxunlearn")}
    assert "jaxunlearn.data" not in graph["jaxunlearn.download"]
    # Recovery and unlearning sit below the run and the driver, never the other way round.
    for low in ("jaxunlearn.recovery", "jaxunlearn.unlearning", "jaxunlearn.deletion_queue"):
        assert not graph[low] & {"jaxunlearn.run", "jaxunlearn.driver", "jaxunlearn.forgetting"}


def test_the_slowest_first_order_names_test_files_that_exist():
    from conftest import SLOWEST_FIRST

    here = pathlib.Path(__file__).parent
    assert len(set(SLOWEST_FIRST)) == len(SLOWEST_FIRST)
    assert [n for n in SLOWEST_FIRST if not (here / n).is_file()] == []
