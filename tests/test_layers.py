"""The package's import structure: layers import downwards only, no private name crosses a module,
and no fmpaper module imports another inside a function (which would hide a circle)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fmpaper"
CORE = {"__init__", "config", "data", "model", "objectives", "train", "evaluate", "fisher", "merge"}
# core <- rows <- runs <- stats <- pages <- entry points
LAYER = {**{m: 0 for m in CORE}, "rows": 1, "runs": 2, "stats": 3, "reproduce": 5, "verify": 5, "cli": 6, "__main__": 7}


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        yield ".".join(rel.parts), path


def layer(name: str) -> int:
    if name.startswith("pages"):
        return 4
    return LAYER[name]


def imported(name: str, node: ast.ImportFrom) -> list[tuple[str, list[str]]]:
    """(fmpaper module, names) an ImportFrom brings in, resolved against module `name`."""
    if node.level == 0:
        if not (node.module or "").startswith("fmpaper"):
            return []
        base = (node.module or "").split(".")[1:]
    else:
        pkg = name.split(".")[:-1] if not name.endswith("__init__") else name.split(".")[:-1]
        base = pkg[:len(pkg) - (node.level - 1)] + ((node.module or "").split(".") if node.module else [])
    target = ".".join(base) or "__init__"
    if (PKG / Path(*base)).is_dir():                                    # from .pages import display
        return [(f"{target}.{a.name}" if (PKG / Path(*base) / f"{a.name}.py").exists() else f"{target}.__init__",
                 [a.name]) for a in node.names]
    return [(target, [a.name for a in node.names])]


def test_layers_import_downwards_and_no_private_names():
    problems = []
    for name, path in modules():
        tree = ast.parse(path.read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for fn in functions:
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and imported(name, node):
                    problems.append(f"{name}: imports {node.module} inside {fn.name}()")
        for node in tree.body:
            if not isinstance(node, ast.ImportFrom):
                continue
            for target, names in imported(name, node):
                mod = target.removesuffix(".__init__") or "__init__"
                if mod.startswith("pages") and name.startswith("pages"):
                    pass                                                # pages import each other one way (below)
                elif layer(mod if mod in LAYER or mod.startswith("pages") else "__init__") > layer(name):
                    problems.append(f"{name} (layer {layer(name)}) imports {mod} (layer {layer(mod)})")
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    problems.append(f"{name} imports private {', '.join(private)} from {mod}")
    assert not problems, "\n".join(problems)


def test_no_import_circle():
    graph = {}
    for name, path in modules():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                deps |= {t for t, _ in imported(name, node)}
        graph[name] = {d.removesuffix(".__init__") if d != "__init__" else d for d in deps} - {name}
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
        if n in seen or n not in graph:
            return
        stack.append(n)
        for d in graph[n]:
            visit(d)
        stack.pop()
        seen.add(n)
    for n in graph:
        visit(n)


def test_tests_use_public_names_only():
    """The tests hold the package to its public surface: no private name imported from fmpaper,
    none reached as an attribute of an fmpaper module (monkeypatching one would pin internals)."""
    problems = []
    for path in sorted((PKG.parent / "tests").glob("*.py")):
        tree = ast.parse(path.read_text())
        modules_here = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fmpaper"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        problems.append(f"{path.name}: imports private {a.name} from {node.module}")
                    if (PKG / Path(*node.module.split(".")[1:]) / f"{a.name}.py").exists() or node.module == "fmpaper":
                        modules_here.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                modules_here |= {a.asname or a.name for a in node.names if a.name.startswith("fmpaper")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in modules_here):
                problems.append(f"{path.name}:{node.lineno}: uses private {node.value.id}.{node.attr}")
    assert not problems, "\n".join(problems)
