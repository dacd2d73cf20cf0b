import os

import numpy as np
import pytest

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "prompts")


@pytest.fixture(scope="module")
def prompt_reference():
    import json

    with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
        ref = {k: f[k] for k in f.files}
    with open(os.path.join(FIXTURES, "reference.json"), encoding="utf-8") as f:
        ref["meta"] = json.load(f)
    return ref
