"""Text2Image behaviour on the tiny model: compilation, determinism, batching, bad input."""

import numpy as np
import pytest

# One worker runs every file of the group, so the session's pipelines are built (and their
# functions compiled) once for all of them.
pytestmark = pytest.mark.xdist_group("tiny-sd1")


def test_defaults_to_native_size(folder):
    from diffusion_tf import Text2Image

    p = Text2Image(model=folder)
    assert (p.img_height, p.img_width) == (64, 64)  # sample_size 8 x VAE factor 8


def test_xla_function_is_built_once_and_matches_graph(pipe, jit_pipe):
    kwargs = dict(num_steps=4, seed=3, unconditional_guidance_scale=7.5)
    before = jit_pipe.tracing_count
    first = jit_pipe.generate("a cat", **kwargs)
    traces = jit_pipe.tracing_count
    second = jit_pipe.generate("a dog", negative_prompt="blurry", **dict(kwargs, seed=4))
    assert traces - before <= 1 and jit_pipe.tracing_count == traces, "second call recompiled"
    assert first.shape == second.shape == (1, 64, 64, 3)
    graph = pipe.generate("a cat", **kwargs)
    assert np.abs(first.astype(int) - graph.astype(int)).max() <= 1


def test_same_seed_same_image_and_batch_equals_single_runs(pipe):
    a = pipe.generate("a cat", num_steps=3, seed=11, batch_size=2)
    b = pipe.generate("a cat", num_steps=3, seed=11, batch_size=2)
    np.testing.assert_array_equal(a, b)
    single = pipe.generate("a cat", num_steps=3, seed=12)
    # Same start noise; kernels may sum in another order at another batch size, so
    # a few pixels can round the other way: the bound is 1/255.
    assert np.abs(a[1].astype(int) - single[0].astype(int)).max() <= 1
    assert pipe.last_seeds == [12]
    assert not np.array_equal(a[0], a[1])


def test_prompt_list_and_per_prompt_negatives(pipe):
    out = pipe.generate(["a cat", "a dog"], negative_prompt=["x", "y"], num_steps=2, seed=1, batch_size=2)
    assert out.shape == (4, 64, 64, 3)
    assert pipe.last_seeds == [1, 2, 3, 4]


def test_callback_path_equals_fused_path(pipe):
    seen = []
    stepped = pipe.generate("a cat", num_steps=3, seed=7, callback=lambda i, n, t: seen.append((i, n, t)))
    fused = pipe.generate("a cat", num_steps=3, seed=7)
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] == 3
    assert [s[2] for s in seen] == list(pipe.scheduler.timesteps)
    assert np.abs(stepped.astype(int) - fused.astype(int)).max() <= 1


def test_guidance_at_most_one_skips_the_unconditional_pass(pipe):
    a = pipe.generate("a cat", negative_prompt="a dog", num_steps=2, seed=1, unconditional_guidance_scale=1.0)
    b = pipe.generate("a cat", negative_prompt="something else", num_steps=2, seed=1, unconditional_guidance_scale=1.0)
    np.testing.assert_array_equal(a, b)


@pytest.mark.heavy  # 6-9 s, a variant of a default-run check: with CI's heavy run
def test_eta_noise_and_temperature(folder):
    from diffusion_tf import Text2Image
    from diffusion_tf.schedulers import DDIMScheduler

    p = Text2Image(model=folder, img_height=64, img_width=64)
    p.scheduler = DDIMScheduler.from_config(p.config["scheduler"], eta=1.0)
    hot = p.generate("a cat", num_steps=3, seed=2, temperature=1.0)
    cold = p.generate("a cat", num_steps=3, seed=2, temperature=0.0)
    again = p.generate("a cat", num_steps=3, seed=2, temperature=1.0)
    np.testing.assert_array_equal(hot, again)
    assert not np.array_equal(hot, cold)


def test_components_shapes(pipe):
    ctx = pipe.encode_text(["a", "b"])
    assert tuple(ctx.shape) == (2, 77, 32)
    lat = np.zeros((2, 8, 8, 4), "float32")
    assert tuple(pipe.predict_noise(lat, np.array([10, 10]), ctx).shape) == (2, 8, 8, 4)
    img = np.asarray(pipe.decode(lat[:1]))
    assert img.shape == (1, 64, 64, 3) and img.dtype == np.float32
    enc = pipe.encode(np.zeros((1, 64, 64, 3), np.uint8))
    assert tuple(enc.shape) == (1, 8, 8, 4)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(prompt=None), "prompt=None"),
        (dict(prompt=[]), "prompt=[]"),
        (dict(prompt=["ok", 3]), "str"),
        (dict(num_steps=0), "num_steps=0"),
        (dict(num_steps=-1), "num_steps=-1"),
        (dict(num_steps=1001), "num_steps=1001"),
        (dict(num_steps=2.5), "num_steps=2.5"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(unconditional_guidance_scale=-1), "unconditional_guidance_scale=-1"),
        (dict(unconditional_guidance_scale=float("nan")), "unconditional_guidance_scale=nan"),
        (dict(seed=-1), "seed=-1"),
        (dict(seed=2**32), "seed=4294967296"),
        (dict(seed=1.5), "seed=1.5"),
        (dict(latents=np.zeros((1, 4, 4, 4))), "latents has shape"),
        (dict(latents=np.full((1, 8, 8, 4), np.nan)), "NaN"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries"),
    ],
)
def test_bad_generate_arguments(pipe, kwargs, needle):
    args = dict(prompt="a cat", num_steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError) as e:
        pipe.generate(**args)
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(img_height=500), "img_height=500"),
        (dict(img_width=0), "img_width=0"),
        (dict(img_height=-64), "img_height=-64"),
        (dict(img_height=8192, img_width=8192), "pixel budget"),
        (dict(attention="fast"), "attention='fast'"),
        (dict(scheduler="nope"), "scheduler='nope'"),
    ],
)
def test_bad_constructor_arguments(folder, kwargs, needle):
    from diffusion_tf import Text2Image

    with pytest.raises(ValueError) as e:
        Text2Image(model=folder, **kwargs)
    assert needle in str(e.value)


def test_unknown_model_and_missing_weights(folder, tmp_path):
    import shutil

    from diffusion_tf import Text2Image

    with pytest.raises(ValueError, match="neither a model folder nor a preset"):
        Text2Image(model="sd-v9")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "vae.weights.h5").unlink()
    with pytest.raises(ValueError, match="missing vae.weights.h5"):
        Text2Image(model=str(broken))
    with open(broken / "unet.weights.h5", "r+b") as f:
        f.truncate(1000)
    shutil.copy(f"{folder}/vae.weights.h5", broken / "vae.weights.h5")
    with pytest.raises(ValueError, match="corrupt or for another model") as e:
        Text2Image(model=str(broken))
    assert "unet.weights.h5" in str(e.value)


@pytest.mark.heavy  # 10-20 s: with CI's heavy run, out of the default suite's time
def test_generate_with_other_schedulers_each_built_once(pipe):
    """`scheduler=` overrides the constructor's choice for one call; each is traced once (every
    algorithm inside one XLA loop: tests/schedulers; the XLA pipeline: the test above)."""
    import warnings

    images = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("dpm++2m-karras", "euler_a", "heun"):
            before = pipe.tracing_count
            images[name] = pipe.generate("a cat", num_steps=4, seed=5, scheduler=name)
            again = pipe.generate("a cat", num_steps=4, seed=5, scheduler=name)
            np.testing.assert_array_equal(images[name], again)
            assert pipe.tracing_count - before <= 1
    # no overflow warning (a NaN or Inf would raise NonFiniteOutputError)
    assert not [w for w in caught if "NaN" in str(w.message)]
    images["ddim"] = pipe.generate("a cat", num_steps=4, seed=5)
    assert pipe.scheduler.name == "ddim"
    names = sorted(images)
    for i, a in enumerate(names):
        assert images[a].shape == (1, 64, 64, 3)
        for b in names[i + 1:]:
            assert not np.array_equal(images[a], images[b]), (a, b)
    other_seed = pipe.generate("a cat", num_steps=4, seed=6, scheduler="euler_a")
    assert not np.array_equal(other_seed, images["euler_a"])


@pytest.mark.heavy  # 6-9 s, a variant of a default-run check: with CI's heavy run
def test_scheduler_override_on_the_callback_path(pipe):
    seen = []
    stepped = pipe.generate("a cat", num_steps=3, seed=7, scheduler="heun", callback=lambda *a: seen.append(a))
    fused = pipe.generate("a cat", num_steps=3, seed=7, scheduler="heun")
    heun = pipe.get_scheduler("heun")
    assert [s[2] for s in seen] == list(heun.timesteps) and len(seen) == 5 and seen[0][1] == 5
    assert np.abs(stepped.astype(int) - fused.astype(int)).max() <= 1
    with pytest.raises(ValueError) as e:
        pipe.generate("a cat", num_steps=2, scheduler="k_lms")
    assert "scheduler='k_lms'" in str(e.value) and "dpm++2m-karras" in str(e.value)


@pytest.mark.parametrize("callback", [False, pytest.param(True, marks=pytest.mark.heavy)], ids=["fused", "step-by-step"])
def test_another_size_after_the_first_keeps_static_shapes(pipe, callback):
    """A pipeline used at one size and then at another (an init image, or a request's size as
    the web UI gives it) traces a function per size; a relaxed trace with unknown spatial
    dimensions would fail in the VAE's attention reshape."""
    cb = (lambda *a: None) if callback else None
    assert pipe.generate("a cat", num_steps=2, seed=1, callback=cb).shape == (1, 64, 64, 3)
    wide = pipe.generate("a cat", num_steps=2, seed=1, callback=cb, strength=0.5,
                         init_image=np.full((64, 128, 3), 100, np.uint8))
    assert wide.shape == (1, 64, 128, 3)
    assert pipe.generate("a cat", num_steps=2, seed=1, callback=cb, width=128).shape == (1, 64, 128, 3)
    assert (pipe.img_height, pipe.img_width) == (64, 64)  # a request's size leaves the pipeline's
