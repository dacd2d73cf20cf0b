"""Image-to-image, inpainting and outpainting (diffusion_tf.editing + Text2Image.generate).

Parity: diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline outputs
(scripts/make_editing_fixtures.py: given noise, VAE posterior mean) on tiny-sd1 (4-channel
UNet, latent blending) and tiny-sd1-inpaint (9-channel UNet), compared raw (paste_back=False)
within 2/255. Then behaviour: sizes, strength 0 / 1, the paste-back, outpainting, batches and
seeds, and every bad input.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from support import tiny_models

PROMPT = "a photo of an astronaut riding a horse"


def editing_reference(name):
    folder = tiny_models.fixture_dir(name)
    with np.load(os.path.join(folder, "editing.npz")) as f:
        ref = {k: f[k] for k in f.files}
    with open(os.path.join(folder, "editing.json")) as f:
        ref["meta"] = json.load(f)
    return ref


pytestmark = pytest.mark.xdist_group("tiny-sd1")  # shares the session's tiny pipelines (tests/conftest.py)


@pytest.fixture(scope="module")
def pipes(tiny_pipe, tiny_inpaint_pipe):
    return {"tiny-sd1": tiny_pipe, "tiny-sd1-inpaint": tiny_inpaint_pipe}


@pytest.fixture(scope="module")
def ref():
    return editing_reference("tiny-sd1")


PARITY = [(name, case["name"]) for name in ("tiny-sd1", "tiny-sd1-inpaint")
          for case in editing_reference(name)["meta"]["cases"]]


def run(pipe, ref, **kw):
    meta = ref["meta"]
    args = dict(negative_prompt=meta["negative"], num_steps=meta["steps"],
                unconditional_guidance_scale=meta["guidance"], init_image=ref["image"])
    args.update(kw)
    return pipe.generate(meta["prompt"], **args)


@pytest.mark.parametrize("name,case", PARITY)
def test_parity_with_diffusers(pipes, name, case):
    ref = editing_reference(name)
    spec = next(c for c in ref["meta"]["cases"] if c["name"] == case)
    kw = {"mask": ref["mask"]} if spec["kind"] == "inpaint" else {}
    out = run(pipes[name], ref, strength=spec["strength"], latents=ref[f"{case}_noise"], paste_back=False, **kw)
    expected = ref[f"{case}_image"]
    assert out.shape == expected.shape and out.dtype == np.uint8
    diff = int(np.abs(out.astype(int) - expected.astype(int)).max())
    assert diff <= 2, f"{name} {case}: differs from diffusers by {diff}/255"


def test_start_index_as_diffusers_get_timesteps():
    from diffusion_tf import editing
    from diffusion_tf.schedulers import get

    ddim, heun = get("ddim"), get("heun")
    assert editing.start_index(10, 0.6, ddim) == 4
    assert editing.start_index(10, 1.0, ddim) == 0
    assert editing.start_index(10, 0.0, ddim) == 10
    assert editing.start_index(10, 0.7, ddim) == 3  # int(7.000000000000001) = 7
    assert editing.start_index(100, 0.29, ddim) == 72  # int(28.999999999999996) = 28
    assert editing.start_index(10, 0.6, heun) == 8  # t_start * order


def test_output_has_the_input_size_after_the_crop(pipes, ref):
    image = np.pad(ref["image"], ((0, 7), (0, 5), (0, 0)), mode="edge")  # 71 x 69 -> 64 x 64
    out = run(pipes["tiny-sd1"], ref, init_image=image, strength=0.3, seed=1)
    assert out.shape == (1, 64, 64, 3)


def test_strength_zero_is_the_vae_round_trip(pipes, ref):
    from diffusion_tf.text2image import to_uint8

    pipe = pipes["tiny-sd1"]
    out = run(pipe, ref, strength=0.0, seed=3)
    round_trip = to_uint8(pipe.decode(pipe.encode(ref["image"][None])))
    assert np.abs(out.astype(int) - round_trip.astype(int)).max() <= 1
    # inpainting at strength 0: the round trip inside the mask, the input outside
    out = run(pipe, ref, strength=0.0, mask=ref["mask"], seed=3)
    keep = ref["mask"] < 128
    np.testing.assert_array_equal(out[0][keep], ref["image"][keep])
    assert np.abs(out[0][~keep].astype(int) - round_trip[0][~keep].astype(int)).max() <= 1


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd1-inpaint"])
def test_known_region_is_pasted_back_exactly(pipes, ref, name):
    raw = run(pipes[name], ref, mask=ref["mask"], strength=1.0, seed=5, paste_back=False)
    out = run(pipes[name], ref, mask=ref["mask"], strength=1.0, seed=5)
    keep = ref["mask"] < 128
    np.testing.assert_array_equal(out[0][keep], ref["image"][keep])
    np.testing.assert_array_equal(out[0][~keep], raw[0][~keep])
    assert not np.array_equal(raw[0][keep], ref["image"][keep])  # the paste-back did something


def test_outpaint_keeps_the_old_area_and_fills_the_new(pipes, ref):
    small = ref["image"][16:, 8:56]  # 48 x 48
    out = run(pipes["tiny-sd1"], ref, init_image=small, outpaint={"left": 16, "top": 16}, seed=7)
    assert out.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(out[0, 16:, 16:], small)
    fill = np.pad(small, ((16, 0), (16, 0), (0, 0)), mode="edge")
    new = np.ones((64, 64), bool)
    new[16:, 16:] = False
    assert not np.array_equal(out[0][new], fill[new])  # painted by the model, not the edge fill
    assert out[0][new].std() > 0


@pytest.mark.heavy  # 6-9 s, a variant of a default-run check: with CI's heavy run
def test_batch_and_seeds(pipes, ref):
    pipe = pipes["tiny-sd1"]
    kw = dict(mask=ref["mask"], strength=0.75, num_steps=4)
    both = run(pipe, ref, batch_size=2, seed=11, **kw)
    assert pipe.last_seeds == [11, 12]
    second = run(pipe, ref, seed=12, **kw)
    # image i of a batch is the single run with seed + i (up to batched-convolution rounding)
    assert np.abs(both[1].astype(int) - second[0].astype(int)).max() <= 1
    np.testing.assert_array_equal(run(pipe, ref, seed=12, **kw), second)
    assert not np.array_equal(both[0], both[1])
    # `latents` = the standard-normal noise in place of the seeded one
    noise = np.asarray(pipe.noise([12], (8, 8, 4)))
    np.testing.assert_array_equal(run(pipe, ref, latents=noise, seed=99, **kw), second)
    # negative prompts, one per prompt
    two = pipe.generate(
        [PROMPT, "a cat"], negative_prompt=["blurry", "dark"], init_image=ref["image"], seed=11, **kw)
    assert two.shape == (2, 64, 64, 3)


def test_latents_shape_is_checked_when_editing(pipes, ref):
    with pytest.raises(ValueError, match=r"latents has shape .*expected \(1, 8, 8, 4\)"):
        run(pipes["tiny-sd1"], ref, latents=np.zeros((1, 16, 16, 4), "float32"))


@pytest.mark.parametrize("strength", [-0.1, 1.5, "0.5", True, float("nan"), None])
def test_bad_strength(pipes, ref, strength):
    with pytest.raises(ValueError, match="strength=.*between 0 and 1"):
        run(pipes["tiny-sd1"], ref, strength=strength)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(mask="m"), "mask= needs init_image"),
        (dict(outpaint={"left": 8}), "outpaint= needs init_image"),
    ],
)
def test_editing_inputs_without_image(pipes, kw, match):
    with pytest.raises(ValueError, match=match):
        pipes["tiny-sd1"].generate(PROMPT, **kw)


@pytest.mark.parametrize(
    "outpaint,match",
    [
        ({"left": -8}, r"left=-8; must be an integer >= 0 and a multiple of 8"),
        ({"top": 12}, r"top=12; must be an integer >= 0 and a multiple of 8"),
        ({"up": 8}, r"side\(s\) \['up'\] unknown; allowed: left, right, top, bottom"),
        ({"left": 0}, "at least one margin"),
        ("left=8", "must be a dict"),
        ({"left": 8.0}, "left=8.0"),
    ],
)
def test_bad_outpaint(ref, outpaint, match):
    from diffusion_tf import editing

    with pytest.raises(ValueError, match=match):
        editing.prepare(ref["image"], 0.8, outpaint=outpaint)


def test_outpaint_with_mask(ref):
    from diffusion_tf import editing

    with pytest.raises(ValueError, match="outpaint= and mask= cannot be combined"):
        editing.prepare(ref["image"], 0.8, mask=ref["mask"], outpaint={"left": 8})


def test_bad_image_paths(tmp_path, ref):
    from diffusion_tf import editing

    with pytest.raises(ValueError, match="does not exist"):
        editing.prepare(str(tmp_path / "missing.png"), 0.5)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        editing.prepare(str(junk), 0.5)
    with pytest.raises(ValueError, match="does not exist"):
        editing.prepare(ref["image"], 0.5, mask=str(tmp_path / "missing.png"))


def test_mask_resized_with_warning_binarised_and_cropped(ref):
    from diffusion_tf import editing

    grey = np.full((32, 32), 100, "uint8")
    grey[:, 16:] = 200  # non-binary: < 128 keep, >= 128 repaint
    with pytest.warns(UserWarning, match="resized"):
        edit = editing.prepare(ref["image"], 0.5, mask=grey)
    assert edit.mask.shape == (64, 64) and set(np.unique(edit.mask)) == {0.0, 1.0}
    assert edit.mask[:, :32].max() == 0 and edit.mask[:, 32:].min() == 1
    # an image that is not a multiple of 8: image and mask cropped alike
    image = np.zeros((70, 75, 3), "uint8")
    mask = Image.fromarray(np.full((70, 75), 255, "uint8"))
    edit = editing.prepare(image, 0.5, mask=mask)
    assert edit.image.shape == (64, 72, 3) and edit.mask.shape == (64, 72)


def test_pixel_budget(pipes):
    big = np.zeros((2048, 2048, 3), "uint8")
    with pytest.raises(ValueError, match="pixel budget"):
        pipes["tiny-sd1"].generate(PROMPT, init_image=big, outpaint={"right": 8})


# ---------------------------------------------------------------- command line
def cli(args, capsys):
    import text2image

    try:
        code = text2image.main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--strength", "1.5"], "--strength 1.5: must be a number between 0 and 1"),
        (["--strength", "x"], "--strength x: must be a number between 0 and 1"),
        (["--mask", "{img}"], "--mask needs --init-image"),
        (["--outpaint", "left=8"], "--outpaint needs --init-image"),
        (["--init-image", "{img}", "--outpaint", "left=12"], "left=12 must be a multiple of 8"),
        (["--init-image", "{img}", "--outpaint", "left=-8"], "left=-8 must be a multiple of 8"),
        (["--init-image", "{img}", "--outpaint", "up=8"], "'up=8' is not valid"),
        (["--init-image", "{img}", "--outpaint", "left"], "'left' is not valid"),
        (["--init-image", "{img}", "--outpaint", "left=8,left=16"], "'left=16' is not valid"),
        (["--init-image", "{img}", "--outpaint", "left=0"], "at least one margin"),
        (["--init-image", "{img}", "--mask", "{img}", "--outpaint", "left=8"], "cannot be combined"),
        (["--init-image", "{missing}"], "no such file"),
    ],
)
def test_cli_bad_editing_arguments(tmp_path, capsys, ref, extra, match):
    img = tmp_path / "in.png"
    Image.fromarray(ref["image"]).save(img)
    extra = [a.format(img=img, missing=tmp_path / "missing.png") for a in extra]
    code, err = cli(["--prompt", "x", "--output", str(tmp_path / "o.png")] + extra, capsys)
    assert code == 2, err
    assert match in err and len(err.strip().splitlines()) == 1


def test_cli_inpainting_records_parameters(tmp_path, capsys, ref, pipes):
    from diffusion_tf.png_info import read_parameters

    img, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    Image.fromarray(ref["image"][:, :56]).save(img)  # 64 x 56: the output size
    Image.fromarray(ref["mask"][:, :56]).save(mask)
    code, err = cli(["--prompt", PROMPT, "--model", tiny_models.converted_folder("tiny-sd1"), "--steps", "3",
                     "--seed", "5", "--init-image", str(img), "--mask", str(mask), "--strength", "0.75",
                     "--output", str(out)], capsys)
    assert code == 0, err
    assert "step 2/2" in err  # the callback path runs int(3 * 0.75) = 2 steps
    params = read_parameters(out)
    assert params["denoising_strength"] == 0.75 and (params["width"], params["height"]) == (56, 64)
    result = np.asarray(Image.open(out))
    keep = ref["mask"][:, :56] < 128
    np.testing.assert_array_equal(result[keep], ref["image"][:, :56][keep])
