"""Shared by every test package: `support/` on the path, the fast tier, and the session's
tiny pipelines.

The fast tier (`python -m pytest -q -m fast`) is every test of the files in FAST that is not
marked `compiles`: they need no TensorFlow graph or XLA compilation (formats, readers, rules,
the tokenizer, the schedulers' eager parity, the dataset and judge, the layering).

A session fixture is built once per pytest-xdist worker. The files that use the tiny
pipelines share the xdist group "tiny-sd1", so that `--dist loadgroup` runs them on one
worker: the pipelines, and the functions they compiled, are then built once for all of them.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# No persistent XLA compilation cache in the tests (and the programs they start), so that every
# compile-time assertion sees a compilation; tests/runtime checks the cache in fresh processes.
os.environ.setdefault("DIFFUSION_TF_COMPILE_CACHE", "0")

from support import tiny_models  # noqa: E402

FAST = {
    "test_layering.py", "pipeline/test_request.py", "pipeline/test_png_info.py", "pipeline/test_image_io.py",
    "presets/test_presets.py", "text/test_clip_tokenizer.py", "convert/test_ckpt_reader.py",
    "convert/test_safetensors_reader.py", "convert/test_fuzz_readers.py", "shapes/test_shapes.py",
    "programs/test_main_info.py", "benchmarks/test_peak_memory.py", "runtime/test_runtime.py",
    "schedulers/test_schedulers.py", "schedulers/test_few_step.py", "prompts/test_syntax.py", "prompts/test_chunks.py",
    "prompts/test_fuzz_embeddings.py",
}
HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = os.path.relpath(str(item.path), HERE).replace(os.sep, "/")
        if path in FAST and item.get_closest_marker("compiles") is None:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def tiny_folder():
    """The tiny SD 1.x-like model, converted once."""
    return tiny_models.converted_folder("tiny-sd1")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_folder):
    """Text2Image on the tiny model at 64x64, graph mode (shared: do not change its attributes)."""
    from diffusion_tf import Text2Image

    return Text2Image(model=tiny_folder, img_height=64, img_width=64)


@pytest.fixture(scope="session")
def tiny_jit_pipe(tiny_folder):
    """The same with XLA (shared: do not change its attributes)."""
    from diffusion_tf import Text2Image

    return Text2Image(model=tiny_folder, img_height=64, img_width=64, jit_compile=True)


@pytest.fixture(scope="session")
def tiny_inpaint_pipe():
    """Text2Image on the tiny 9-channel inpainting model at 64x64 (shared)."""
    from diffusion_tf import Text2Image

    return Text2Image(model=tiny_models.converted_folder("tiny-sd1-inpaint"), img_height=64, img_width=64)


@pytest.fixture(scope="session")
def tiny_sdxl_pipes(tmp_path_factory):
    """{(name, source): Text2Image at 64x64} for the tiny SDXL models converted from a diffusers
    folder ("diffusers") and from an SGM single file ("sgm"), prompt_syntax="plain" (diffusers has
    none). Files using it share the xdist group "sdxl"; do not change the pipelines' attributes."""
    from diffusion_tf import Text2Image
    from weights_port.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("sdxl")

    class Pipes(dict):
        """Converted and loaded on first use (the SGM sources only serve the heavy tests)."""

        def __missing__(self, key):
            name, source = key
            if source == "diffusers":
                src, config = tiny_models.write_diffusers_folder(name, str(root / f"{name}-src")), None
            else:  # head counts of the tiny models are not SDXL's 64-channel heads: given, not inferred
                src = tiny_models.write_single_file(name, str(root / f"{name}.safetensors"))
                config = tiny_models.fixture_dir(name)
            folder = convert_checkpoint(src, str(root / f"{name}-{source}"), config=config, log=lambda *_: None)
            self[key] = Text2Image(model=folder, img_height=64, img_width=64, prompt_syntax="plain")
            return self[key]

    return Pipes()
