"""No import cycle among the top-level modules: a reader can take them in an order where each file
uses only what came before (imports inside functions count too)."""

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
