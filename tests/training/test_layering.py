"""The package's layering: no import cycle among diffusion_tf's modules (imports inside
functions counted), the training modules import only lower ones and never
`diffusion_tf.eval`, `diffusion_tf.train` re-exports the package's names, and the two
command lines still run."""

import os
import subprocess
import sys

import pytest

from support.import_graph import import_graph

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# diffusion_tf.training's modules, lowest first: each may import only those before it.
TRAINING_ORDER = ("files", "options", "imagefolder", "checkpoint", "plan", "data", "trainers", "lora", "pictures",
                  "vae", "refine", "session", "stages", "run", "cli")


def _import_graph():
    return import_graph(("diffusion_tf",))


def _cycles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_the_modules():
    graph = _import_graph()
    assert {"diffusion_tf.eval", "diffusion_tf.training.run", "diffusion_tf.shapes.judge"} <= set(graph)
    assert _cycles(graph) == []
    # and the checker sees one: a -> b -> c -> a
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_training_modules_import_only_lower_ones():
    graph = _import_graph()
    names = {f"diffusion_tf.training.{m}" for m in TRAINING_ORDER}
    assert {m for m in graph if m.startswith("diffusion_tf.training.")} == names  # the order lists them all
    for i, module in enumerate(TRAINING_ORDER):
        imported = graph[f"diffusion_tf.training.{module}"]
        above = {f"diffusion_tf.training.{m}" for m in TRAINING_ORDER[i:]} | {"diffusion_tf.training"}
        assert not imported & above, (module, sorted(imported & above))
        assert "diffusion_tf.eval" not in imported and "diffusion_tf.train" not in imported, module
    assert "diffusion_tf.eval" not in set().union(*(graph[m] for m in graph if m.startswith("diffusion_tf.shapes")))


def test_train_module_reexports_the_package():
    import importlib

    from diffusion_tf import train

    assert train.__all__ and len(set(train.__all__)) == len(train.__all__)
    for name in train.__all__:
        value = getattr(train, name)
        homes = [m for m in TRAINING_ORDER
                 if getattr(importlib.import_module(f"diffusion_tf.training.{m}"), name, None) is value]
        assert homes, name
    for name in ("train", "TrainOptions", "main", "plan", "PRESETS", "TrainingRun", "read_checkpoint_meta",
                 "checkpoint_path", "batch_indices", "phased_batch_indices", "DiffusionTrainer",
                 "reverse_process_frames", "load_vae_from", "vae_roundtrip", "GENERATION_DEFAULTS"):
        assert name in train.__all__, name


def _walk(model, public_only):
    """ids of `model` and the layers reachable through its attributes (lists, tuples, dicts)."""
    import keras

    seen, stack = set(), [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        pending = [v for k, v in vars(layer).items() if not (public_only and k.startswith("_"))]
        while pending:
            value = pending.pop()
            if isinstance(value, keras.Layer):
                stack.append(value)
            elif isinstance(value, (list, tuple)):
                pending.extend(value)
            elif isinstance(value, dict):
                pending.extend(value.values())
    return seen


@pytest.mark.parametrize("name", ["vae", "text_encoder", "unet"])
def test_all_layers_finds_every_layer_of_the_real_models(name):
    """`all_layers` (public attributes only) finds what a walk through every attribute,
    Keras' private ones included, finds: each layer once."""
    from diffusion_tf.components import build_model
    from diffusion_tf.training.options import PRESETS
    from diffusion_tf.training.trainers import VAEDecoderPart, all_layers

    model = build_model(name, PRESETS["tiny"][name])
    found = all_layers(model)
    assert len({id(layer) for layer in found}) == len(found) > 10
    assert {id(layer) for layer in found} == _walk(model, public_only=False)
    if name == "vae":  # the decoder stage's model: the VAE's decoding half
        part = VAEDecoderPart(model)
        assert {id(layer) for layer in all_layers(part)} == _walk(part, public_only=False)


@pytest.mark.heavy  # two fresh processes importing TensorFlow; CI's second step
def test_both_command_lines_still_run():
    """`python -m diffusion_tf.train` and the root train.py: the same parser, a flag for
    every option of TrainOptions but the GIF's guidance."""
    import dataclasses

    from diffusion_tf.training.cli import build_parser
    from diffusion_tf.training.options import TrainOptions

    expected = build_parser().format_help()
    flags = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainOptions) if f.name != "gif_guidance"]
    assert len(flags) == 51 and all(flag in expected for flag in flags)
    for argv in (["-m", "diffusion_tf.train", "--help"], [os.path.join(ROOT, "train.py"), "--help"]):
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, COLUMNS="80"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout == expected, argv
