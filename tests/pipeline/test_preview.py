"""Live previews (diffusion_tf.pipeline.preview): the latent-to-RGB map, when a preview is due,
and that previewing changes nothing about the generation."""

import numpy as np
import pytest

from diffusion_tf.pipeline.preview import LATENT_RGB, Preview, approximate_rgb

pytestmark = pytest.mark.xdist_group("tiny-sd1")


@pytest.mark.parametrize("family", sorted(LATENT_RGB))
def test_each_latent_channel_maps_to_its_row_of_the_table(family):
    """Zero latents are the bias (mid-grey for SD); a latent that is 1 in channel c alone is that
    channel's RGB row, mapped from [-1, 1] to [0, 255]."""
    weights, bias = (np.asarray(v, np.float32) for v in LATENT_RGB[family])
    latents = np.zeros((5, 1, 2, 4), np.float32)
    for c in range(4):
        latents[c + 1, 0, :, c] = 1.0
    rgb = approximate_rgb(latents, family, factor=1)
    assert rgb.dtype == np.uint8 and rgb.shape == (5, 1, 2, 3)
    np.testing.assert_array_equal(rgb[0, 0, 0], np.rint((bias + 1) / 2 * 255))
    for c in range(4):
        np.testing.assert_array_equal(rgb[c + 1, 0, 1], np.rint(np.clip((weights[c] + bias + 1) / 2, 0, 1) * 255))
    assert tuple(rgb[0, 0, 0]) == {"sd": (128, 128, 128), "sdxl": (141, 125, 127)}[family]  # mid-grey + bias


def test_each_latent_pixel_becomes_a_block_of_the_output_size():
    latents = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(np.float32)
    small, big = approximate_rgb(latents, "sd", factor=1), approximate_rgb(latents, "sd")
    assert big.shape == (2, 24, 40, 3)
    np.testing.assert_array_equal(big[:, ::8, ::8], small)
    np.testing.assert_array_equal(big[:, 7::8, 7::8], small)


@pytest.mark.parametrize("call, message", [
    (lambda: approximate_rgb(np.zeros((1, 2, 2, 4)), "sd3"), "family='sd3'; allowed: 'sd', 'sdxl'"),
    (lambda: approximate_rgb(np.zeros((1, 2, 2, 16)), "sd"), r"shape \(1, 2, 2, 16\).*\[B, h, w, 4\]"),
    (lambda: Preview(0, print), "every=0; must be an integer >= 1"),
    (lambda: Preview(-2, print), "every=-2; must be an integer >= 1"),
    (lambda: Preview(True, print), "every=True; must be an integer >= 1"),
    (lambda: Preview(2, "out.png"), "sink 'out.png' is not callable"),
])
def test_bad_preview_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_previews_come_every_n_steps_and_change_nothing(pipe):
    seen = []
    preview = Preview(2, lambda k, n, images: seen.append((k, n, images)))
    kwargs = dict(num_steps=5, seed=4, unconditional_guidance_scale=7.5, batch_size=2)
    with_preview = pipe.generate("a red circle", preview=preview, **kwargs)
    steps = []
    plain = pipe.generate("a red circle", callback=lambda k, n, t: steps.append(k), **kwargs)
    np.testing.assert_array_equal(with_preview, plain)
    assert [(k, n) for k, n, _ in seen] == [(1, 5), (3, 5)]  # never after the last step
    for _, _, images in seen:
        assert images.dtype == np.uint8 and images.shape == with_preview.shape
    assert not np.array_equal(seen[0][2], seen[1][2])  # the latents moved between the two


def test_the_last_preview_is_the_map_of_the_latents_it_was_made_from(pipe):
    """Stopping the schedule where a preview was made (denoising_end, output_type="latent")
    gives latents whose latent-to-RGB image is that preview."""
    seen = []
    pipe.generate("a blue square", num_steps=4, seed=2, unconditional_guidance_scale=1.0,
                  preview=Preview(1, lambda k, n, images: seen.append(images)))
    assert len(seen) == 3
    latents = pipe.generate("a blue square", num_steps=4, seed=2, unconditional_guidance_scale=1.0,
                            output_type="latent", callback=lambda *a: None, denoising_end=0.5)
    np.testing.assert_array_equal(approximate_rgb(latents, "sd"), seen[1])


def test_a_preview_that_is_not_a_preview_is_refused(pipe):
    with pytest.raises(ValueError, match=r"preview=2; give a diffusion_tf.pipeline.preview.Preview"):
        pipe.generate("a cat", num_steps=1, preview=2)
