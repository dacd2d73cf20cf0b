"""Determinism across processes: the same seed and parameters give byte-identical PNGs
in two fresh processes, with the TensorFlow graph and with XLA; graph and XLA images
differ by at most a documented bound (docs/security.md, "Determinism")."""

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from support import tiny_models

# Not in the default run (two fresh processes, about 1.5 minutes); CI runs it with
# `-m integration`. Its module-scoped fixture is built once: every test goes to one worker.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("determinism")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Graph vs XLA: different kernels and fusion orders; measured max 1/255 on the tiny model.
GRAPH_XLA_BOUND = 2

SCRIPT = textwrap.dedent('''
    import sys
    from diffusion_tf import Text2Image
    from diffusion_tf.png_info import save_png
    folder, out = sys.argv[1], sys.argv[2]
    for mode, jit in (("graph", False), ("xla", True)):
        t2i = Text2Image(model=folder, img_height=64, img_width=64, jit_compile=jit)
        images = t2i.generate(["a cat", "a dog"], num_steps=4, seed=11, batch_size=1)
        for k, image in enumerate(images):
            save_png(f"{out}/{mode}_{k}.png", image, {"prompt": "x", "seed": 11 + k})
''')


def _run_pair(tmp_path, folder):
    """Two fresh processes at once (one per core); their output folders."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    outs, procs = [], []
    for n in range(2):
        out = tmp_path / f"run{n}"
        out.mkdir()
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, folder, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
    return outs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _run_pair(tmp_path_factory.mktemp("determinism"), tiny_models.converted_folder("tiny-sd1"))


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_two_processes_write_identical_pngs(runs, mode):
    for k in range(2):
        a, b = (run / f"{mode}_{k}.png" for run in runs)
        assert _digest(a) == _digest(b), (mode, k)


def test_graph_and_xla_differ_by_at_most_the_documented_bound(runs):
    from PIL import Image

    for k in range(2):
        graph = np.asarray(Image.open(runs[0] / f"graph_{k}.png"), np.int16)
        xla = np.asarray(Image.open(runs[0] / f"xla_{k}.png"), np.int16)
        assert np.abs(graph - xla).max() <= GRAPH_XLA_BOUND
