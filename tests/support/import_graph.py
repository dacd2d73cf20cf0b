"""The import graph of the project's packages, read from the sources (nothing is imported):
every import statement at any depth of a file, functions included."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def modules(packages=("diffusion_tf", "weights_port")):
    """{dotted name: path} of every module of `packages` (a package by its own name)."""
    out = {}
    for package in packages:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[dotted.removesuffix(".__init__")] = path
    return out


def import_graph(packages=("diffusion_tf", "weights_port")):
    """{module: set of the packages' modules it imports}: `from a import b` counts as importing
    a.b when that is a module, else a; a module's own name is not counted."""
    known = modules(packages)

    def resolve(name):
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in known.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(resolve(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` levels up
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in known else resolve(base))
        graph[module] = {t for t in targets if t and t != module}
    return graph
