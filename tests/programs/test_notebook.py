"""notebooks/text2image.ipynb runs top to bottom on a CPU (the cells that need a GPU or a download
are skipped by its RUN_HEAVY flag), so it cannot silently rot. It runs with the built-in shapes
model when that is installed, else with the tiny random-weight SD 1.x test model (every cell runs
the same code; only the pictures differ)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Not in the default run (about 3.5 minutes); CI runs it with `-m integration`.
pytestmark = pytest.mark.integration

NOTEBOOK = os.path.join(ROOT, "notebooks", "text2image.ipynb")


def test_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="needs nbformat, nbclient and ipykernel (the test extra)")
    nbclient = pytest.importorskip("nbclient", reason="needs nbformat, nbclient and ipykernel (the test extra)")
    pytest.importorskip("ipykernel", reason="needs nbformat, nbclient and ipykernel (the test extra)")
    from diffusion_tf import presets
    from support import tiny_models

    model = "shapes" if presets.builtin_available() else tiny_models.converted_folder("tiny-sd1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_keys = ("DIFFUSION_TF_NOTEBOOK_HEAVY", "DIFFUSION_TF_NOTEBOOK_MODEL", "DIFFUSION_TF_HOME", "PYTHONPATH",
                "TF_CPP_MIN_LOG_LEVEL")
    saved = {k: os.environ.get(k) for k in env_keys}
    os.environ.pop("DIFFUSION_TF_NOTEBOOK_HEAVY", None)
    os.environ["DIFFUSION_TF_NOTEBOOK_MODEL"] = model
    os.environ["DIFFUSION_TF_HOME"] = str(tmp_path / "home")  # nothing cached: no SD download is possible
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + (saved["PYTHONPATH"] or "")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    try:
        client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("name") == "stdout"
    )
    assert "GPU/download cells: skipped" in outputs and f"model: {model}" in outputs
    assert outputs.count("skipped (RUN_HEAVY is false)") == 3  # SD 1.5, SDXL, the 1024 px attention
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}) or "image/gif" in o.get("data", {}))
    assert images >= 7  # a generation, the edits, both attentions, the loss plot and the two GIFs
    assert os.path.isfile(tmp_path / "runs" / "tiny" / "forward.gif")
