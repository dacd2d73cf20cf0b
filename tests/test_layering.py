"""The layering of diffusion_tf and weights_port: each module imports only modules of its own
layer or below (imports inside functions counted), so there is no import circle between
packages. Fast tier: reads the sources, imports nothing."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A module belongs to the first entry that is it or one of its parents.
LAYERS = [
    # 0: no network, no model: settings, formats, the tokenizer, the schedulers' maths
    ["diffusion_tf.runtime", "diffusion_tf.compiler_memory", "diffusion_tf.startup_log",
     "diffusion_tf.image_io", "diffusion_tf.png_info", "diffusion_tf.clip_tokenizer", "diffusion_tf.schedulers",
     "diffusion_tf.shapes.dataset", "diffusion_tf.shapes.judge", "diffusion_tf.pipeline.request"],
    # 1: the networks and their weights
    ["diffusion_tf.layers", "diffusion_tf.models", "diffusion_tf.state_dict", "diffusion_tf.model_folder"],
    ["diffusion_tf.components"],  # a model folder's networks
    ["weights_port"],  # checkpoints in, configs in, a model folder out
    ["diffusion_tf.presets"],  # a name -> a model folder (download, convert once)
    ["diffusion_tf.pipeline"],  # request, sampling, editing, Text2Image
    ["diffusion_tf.shapes"],  # the shapes dataset's helpers that generate images
    ["diffusion_tf.training"],
    # programs, and the old import paths (each re-exports what now lives lower)
    ["diffusion_tf.eval", "diffusion_tf.cli", "diffusion_tf.app", "diffusion_tf.__main__", "diffusion_tf",
     "weights_port.__main__", "diffusion_tf.text2image", "diffusion_tf.editing", "diffusion_tf.train",
     "diffusion_tf.schedulers.schedule"],
]


def _modules():
    out = {}
    for package in ("diffusion_tf", "weights_port"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[dotted.removesuffix(".__init__")] = path
    return out


def _layer(module):
    """The layer of `module`: its most specific entry (the longest matching name)."""
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > len(best[1]):
                    best = (i, name)
    assert best is not None, f"{module} is in no layer of tests/test_layering.py"
    return best[0]


def _imports(modules):
    """{module: {imported diffusion_tf / weights_port module}} at any depth of the file."""

    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(resolve(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    targets.add(full if full in modules else resolve(node.module))
        graph[module] = {t for t in targets if t and t != module}
    return graph


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_no_module_imports_one_above_it():
    modules = _modules()
    upward = []
    for module, targets in sorted(_imports(modules).items()):
        for target in sorted(targets):
            # a package's __init__ may import its own submodules (it is their front door)
            if target.startswith(module + "."):
                continue
            if _layer(target) > _layer(module):
                upward.append(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")
    assert not upward, "\n".join(upward)

