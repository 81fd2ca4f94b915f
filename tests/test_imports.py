"""No import cycle among the top-level modules: a reader can take them in an order where each file
uses only what came before (imports inside functions count too). And every function other than a
script's main fits in 60 lines."""

import ast
import glob
import os

from conftest import ROOT


def imports_of(path, modules):
    """The top-level modules of this repository that the file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & modules


def test_no_import_cycle():
    paths = glob.glob(os.path.join(ROOT, "*.py"))
    modules = {os.path.basename(p)[:-3] for p in paths}
    graph = {os.path.basename(p)[:-3]: imports_of(p, modules) for p in paths}
    order, left = [], dict(graph)
    while left:  # peel off the modules whose imports are all placed already
        ready = sorted(m for m, deps in left.items() if deps - {m} <= set(order))
        assert ready, f"an import cycle among {sorted(left)}: {dict(sorted(left.items()))}"
        order += ready
        for m in ready:
            del left[m]
    assert order.index("llama") < order.index("multilora") < order.index("train")
    assert order.index("eval") < order.index("train")  # train.py imports eval, not the reverse


def test_functions_fit_in_60_lines():
    """From def to the end of the body, in every .py at the top level, in tools/ and in data/*/."""
    paths = [
        glob.glob(os.path.join(ROOT, pattern)) for pattern in ("*.py", "tools/*.py", "data/*/*.py")
    ]
    assert all(paths), "a folder of scripts moved: update the globs above"
    long = []
    for path in sorted(p for group in paths for p in group):
        name = os.path.relpath(path, ROOT).replace(os.sep, "/")
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "main":
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines: " + ", ".join(long)


def test_tools_answer_help_from_the_root():
    """Each tool in tools/ runs from the repository root as the docs show it, and --help works."""
    import sys

    from conftest import python

    for path in sorted(glob.glob(os.path.join(ROOT, "tools", "*.py"))):
        script = os.path.relpath(path, ROOT)
        r = python([sys.executable, script, "--help"], cwd=ROOT, timeout=120)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (script, r.stderr[-2000:])
        assert script in r.stdout or "tools/" in r.stdout, (script, r.stdout[:300])
