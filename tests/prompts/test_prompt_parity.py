"""Text conditioning against diffusers on the tiny SD 1.x model (fixtures: scripts/make_prompt_fixtures.py),
and the rules diffusers has no counterpart for (emphasis, chunks), checked against their definition.

Tolerances as the core parity tests: 1e-4 relative to the output's scale; images within 2/255."""

import numpy as np
import pytest

from support import tiny_models
from support.parity import assert_close

pytestmark = pytest.mark.xdist_group("tiny-sd1")


@pytest.fixture(scope="module")
def plain_pipe(tiny_folder):
    from diffusion_tf import Text2Image

    return Text2Image(model=tiny_folder, img_height=64, img_width=64, prompt_syntax="plain",
                      long_prompts="truncate")


def test_a_prompt_without_syntax_encodes_bit_for_bit_as_plain_tokens(tiny_pipe):
    ref = tiny_models.reference("tiny-sd1")
    prompts = ref["meta"]["prompts"] + ref["meta"]["bang_prompts"] + ["café 🐱 on the moon", ""]
    plain = np.asarray(tiny_pipe.text_encoder(tiny_pipe.tokenize(prompts)))
    np.testing.assert_array_equal(np.asarray(tiny_pipe.encode_text(prompts)), plain)
    assert_close(plain[:2], ref["text_embeds"][:2], "text encoder")


def test_clip_skip_is_diffusers(tiny_pipe, prompt_reference):
    out = tiny_pipe.encode_text(prompt_reference["meta"]["prompts"], clip_skip=1)
    assert_close(out, prompt_reference["clip1_embeds"], "clip_skip=1")
    assert np.abs(np.asarray(out) - np.asarray(tiny_pipe.encode_text(prompt_reference["meta"]["prompts"]))).max() > 0.1


@pytest.mark.parametrize("bad", [-1, 3, 1.0, True, "1"])
def test_clip_skip_out_of_range_is_an_error_naming_it(tiny_pipe, bad):
    with pytest.raises(ValueError, match=r"clip_skip=.*from 0 to 2"):
        tiny_pipe.encode_text("a cat", clip_skip=bad)
    with pytest.raises(ValueError, match=r"clip_skip"):
        tiny_pipe.generate("a cat", num_steps=1, clip_skip=bad)


def test_truncate_and_plain_options_give_diffusers_embeddings(plain_pipe, prompt_reference):
    meta = prompt_reference["meta"]
    with pytest.warns(UserWarning, match="truncated"):
        long = plain_pipe.encode_text(meta["long_prompt"])
    assert_close(long, prompt_reference["long_embeds"], "long prompt, truncated as diffusers")
    np.testing.assert_array_equal(plain_pipe.tokenize(meta["syntax_prompts"]), prompt_reference["plain_ids"])
    assert_close(plain_pipe.encode_text(meta["syntax_prompts"]), prompt_reference["plain_embeds"],
                 "brackets and BREAK as plain text")


def test_emphasis_scales_token_outputs_and_restores_each_chunks_mean(tiny_pipe):
    from diffusion_tf.prompts.chunks import tokenize_chunks

    prompt = "a (red:1.5) car [in the rain] BREAK ((sunset))"
    chunks = tokenize_chunks(tiny_pipe.tokenizer, prompt)
    z = np.asarray(tiny_pipe.text_encoder(chunks.ids), "float64")  # each chunk alone, weights 1
    expected = []
    for zc, w in zip(z, chunks.weights):
        scaled = zc * w[:, None]
        expected.append(scaled * (zc.mean() / scaled.mean()))
    out = np.asarray(tiny_pipe.encode_text(prompt))
    assert out.shape == (1, 154, 32)
    np.testing.assert_allclose(out[0], np.concatenate(expected), rtol=1e-5, atol=1e-5)
    assert np.abs(out[0] - z.reshape(-1, 32)).max() > 0.05  # the weights did change it


def test_long_prompts_generate_with_their_negatives_padded(tiny_pipe):
    long = ", ".join(["a very detailed photo of a cat"] * 12)
    a = tiny_pipe.generate(long, negative_prompt="blurry", num_steps=2, seed=3)
    b = tiny_pipe.generate(long, negative_prompt="blurry BREAK", num_steps=2, seed=3)
    # "blurry BREAK" is "blurry" plus an empty chunk: the padding the short negative got anyway
    np.testing.assert_array_equal(a, b)
    c = tiny_pipe.generate(long.replace("cat", "dog", 1), negative_prompt="blurry", num_steps=2, seed=3)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0
