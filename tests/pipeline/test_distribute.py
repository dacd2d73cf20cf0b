"""Data-parallel generation: Text2Image(distribute=True) on two logical CPU devices gives the
images of one device (docs/scaling.md). Runs in a fresh process (logical devices must be
configured before TensorFlow initialises)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from support import tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One device runs each kernel on the whole batch, two replicas on halves: oneDNN may then
# sum in another order; the measured difference on the tiny model is at most 1/255.
BOUND = 1

SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from diffusion_tf import Text2Image
    folder = sys.argv[1]
    one = Text2Image(model=folder, img_height=64, img_width=64)
    two = Text2Image(model=folder, img_height=64, img_width=64, distribute=True)
    out = {"replicas": two.strategy.num_replicas_in_sync}
    cases = {
        "batch of 4": dict(prompt=["a cat", "a dog"], batch_size=2),
        "image to image, batch of 3": dict(prompt="a cat", batch_size=3, strength=0.6,
                               init_image=np.full((64, 64, 3), 90, np.uint8)),
    }
    for name, kw in cases.items():
        a = one.generate(num_steps=3, seed=5, **kw)
        b = two.generate(num_steps=3, seed=5, **kw)
        out[name] = {"shape": list(b.shape), "seeds": two.last_seeds,
                     "max_diff": int(np.abs(a.astype(int) - b.astype(int)).max()),
                     "distinct": bool(len({x.tobytes() for x in b}) == len(b))}
    print(json.dumps(out))
''')


@pytest.mark.integration  # not in the default run (about 1.5 minutes); CI runs it with `-m integration`
def test_two_logical_cpus_give_the_images_of_one_device():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny_models.converted_folder("tiny-sd1")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert out["batch of 4"]["shape"] == [4, 64, 64, 3] and out["batch of 4"]["seeds"] == [5, 6, 7, 8]
    assert out["image to image, batch of 3"]["shape"] == [3, 64, 64, 3]  # an uneven split (2 + 1)
    for name in ("batch of 4", "image to image, batch of 3"):
        assert out[name]["max_diff"] <= BOUND, (name, out[name])
        assert out[name]["distinct"], name


def test_bad_distribute_value():
    from diffusion_tf import Text2Image

    with pytest.raises(ValueError, match="distribute='yes'"):
        Text2Image(model=tiny_models.converted_folder("tiny-sd1"), distribute="yes")
