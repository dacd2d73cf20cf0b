"""The layering of diffusion_tf and weights_port: each module imports only modules of its own
layer or below (imports inside functions counted), so there is no import circle between
packages. Fast tier: reads the sources, imports nothing."""

from support.import_graph import import_graph, modules

# Lowest first. A module belongs to the first entry that is it or one of its parents.
LAYERS = [
    # 0: no network, no model: settings, formats, the tokenizer, the schedulers' maths
    ["diffusion_tf.runtime", "diffusion_tf.compiler_memory", "diffusion_tf.startup_log",
     "diffusion_tf.image_io", "diffusion_tf.png_info", "diffusion_tf.clip_tokenizer", "diffusion_tf.schedulers",
     "diffusion_tf.shapes.dataset", "diffusion_tf.shapes.judge", "diffusion_tf.pipeline.request",
     "diffusion_tf.prompts.syntax", "diffusion_tf.prompts.chunks", "diffusion_tf.a1111"],
    # 1: the networks and their weights
    ["diffusion_tf.layers", "diffusion_tf.models", "diffusion_tf.state_dict", "diffusion_tf.model_folder"],
    ["diffusion_tf.components"],  # a model folder's networks
    ["weights_port"],  # checkpoints in, configs in, a model folder out
    ["diffusion_tf.prompts"],  # prompts -> context: emphasis, chunks, textual-inversion files
    ["diffusion_tf.lora"],  # LoRA files merged into the networks' weights
    ["diffusion_tf.presets"],  # a name -> a model folder (download, convert once)
    ["diffusion_tf.pipeline"],  # request, sampling, editing, Text2Image
    ["diffusion_tf.shapes"],  # the shapes dataset's helpers that generate images
    ["diffusion_tf.training"],
    # programs, and the old import paths (each re-exports what now lives lower)
    ["diffusion_tf.eval", "diffusion_tf.cli", "diffusion_tf.app", "diffusion_tf.__main__", "diffusion_tf",
     "weights_port.__main__", "diffusion_tf.text2image", "diffusion_tf.editing", "diffusion_tf.train",
     "diffusion_tf.schedulers.schedule"],
]


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


def test_every_module_has_a_layer():
    for module in modules():
        _layer(module)


def test_no_module_imports_one_above_it():
    upward = []
    for module, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            # a package's __init__ may import its own submodules (it is their front door)
            if target.startswith(module + "."):
                continue
            if _layer(target) > _layer(module):
                upward.append(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")
    assert not upward, "\n".join(upward)

