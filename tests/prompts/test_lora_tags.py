"""`<lora:NAME:SCALE>` in a prompt: resolved in lora_dir, merged for the calls that name it, taken
out when a later prompt does not, never seen by the text encoder."""

import os
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("tiny-sd1")
LORA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "lora",
                    "kohya_locon.safetensors")
KW = dict(num_steps=2, seed=7)


@pytest.fixture(scope="module")
def setup(tiny_folder, tmp_path_factory):
    from diffusion_tf import Text2Image

    folder = tmp_path_factory.mktemp("loras")
    shutil.copy(LORA, folder / "Paper-Cut.safetensors")
    pipe = Text2Image(model=tiny_folder, img_height=64, img_width=64, lora_dir=str(folder),
                      embedding_dir=str(tmp_path_factory.mktemp("no-embeddings")))
    return pipe, folder


def _weights(pipe):
    return [np.array(v) for v in pipe.unet.weights + pipe.text_encoder.weights]


def test_a_tag_merges_its_lora_for_that_call_only(setup):
    pipe, folder = setup
    pipe.unload_loras()
    base = pipe.generate("a red circle", **KW)
    tagged = pipe.generate("a red circle <lora:Paper-Cut:0.7>", **KW)
    assert [e.name for e in pipe.loras] and pipe.loras[0].scale == 0.7
    pipe.unload_loras()
    pipe.load_lora(str(folder / "Paper-Cut.safetensors"), 0.7)
    np.testing.assert_array_equal(tagged, pipe.generate("a red circle", **KW))  # the tag is not text
    pipe.unload_loras()
    assert np.abs(tagged.astype(int) - base.astype(int)).max() > 0
    # the next prompt without the tag takes it out: the first image again, bit for bit
    pipe.generate("a red circle <lora:paper-cut>", **KW)  # case-insensitive file match
    np.testing.assert_array_equal(pipe.generate("a red circle", **KW), base)
    assert pipe.loras == []


def test_a_new_scale_does_not_read_the_file_again(setup, tmp_path):
    pipe, folder = setup
    pipe.unload_loras()
    shutil.copy(folder / "Paper-Cut.safetensors", folder / "once.safetensors")
    a = pipe.generate("a cat <lora:once:0.5>", **KW)
    os.remove(folder / "once.safetensors")
    b = pipe.generate("a cat <lora:once:1.0>", **KW)  # re-scaled from the factors in memory
    assert pipe.loras[0].scale == 1.0 and np.abs(a.astype(int) - b.astype(int)).max() > 0
    pipe.unload_loras()


def test_a_missing_lora_is_an_error_naming_it_and_changes_nothing(setup):
    pipe, folder = setup
    pipe.unload_loras()
    before = _weights(pipe)
    with pytest.raises(ValueError, match=r"<lora:missing>.*no LoRA file named 'missing'.*Paper-Cut"):
        pipe.generate("a cat <lora:missing:1>", **KW)
    with pytest.raises(ValueError, match="same <lora"):
        pipe.generate(["a cat <lora:Paper-Cut:1>", "a dog"], **KW)
    with pytest.raises(ValueError, match="not a finite number"):
        pipe.generate("a cat <lora:Paper-Cut:nan>", **KW)
    assert pipe.loras == []
    for a, b in zip(before, _weights(pipe)):
        np.testing.assert_array_equal(a, b)
