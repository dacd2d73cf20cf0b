"""Schedulers: parity with diffusers, one XLA-compiled loop, names, configs.

Reference trajectories come from scripts/make_scheduler_fixtures.py (committed:
tests/fixtures/schedulers.npz / .json): diffusers' schedulers driven like its
pipelines with a deterministic toy denoiser (`toy_model`, the same formula as the
script's) from fixed latents, at 20 and 50 steps, for Stable Diffusion's config and
two others (linear betas + "trailing" spacing, "linspace" spacing; both v-prediction).
The stochastic ones (DDPM, Euler ancestral, DDIM eta=1) are given the same noise
draws diffusers consumed. No PyTorch is needed, except by the live test at the end.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
ROOT = os.path.dirname(os.path.dirname(FIXTURES))
TOL = 1e-5

with open(os.path.join(FIXTURES, "schedulers.json"), encoding="utf-8") as _f:
    META = json.load(_f)
CASES = META["cases"]
STEPS = META["steps"]


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(FIXTURES, "schedulers.npz")) as data:
        return dict(data)


def toy_model(x, t):
    """out(x, t) = sqrt(t / 1000) x + 0.2 tanh(0.5 x) (0.3 + t / 1000) + 0.1 sin(x) (float32)."""
    from keras import ops

    t = ops.cast(t, "float32")
    return ops.sqrt(t / 1000) * x + 0.2 * ops.tanh(0.5 * x) * (0.3 + t / 1000) + 0.1 * ops.sin(x)


def run_eager(scheduler, steps, latents, noise=None):
    """The diffusers pipeline loop, one eager step_fn at a time -> (timesteps, final sample)."""
    from keras import ops

    timesteps = scheduler.set_timesteps(steps)
    x = ops.convert_to_tensor(latents) * scheduler.init_noise_sigma
    state = scheduler.init_state(x)
    for i in range(len(timesteps)):
        out = toy_model(scheduler.scale_model_input(x, i), scheduler.model_timestep(i))
        x, state = scheduler.step_fn(out, i, x, state, noise[i] if scheduler.stochastic else None)
    return timesteps, np.asarray(x)


def run_compiled(scheduler, steps, latents, noise):
    """The whole schedule as one `ops.fori_loop` inside tf.function(jit_compile=True)."""
    import tensorflow as tf
    from keras import ops

    scheduler.set_timesteps(steps)
    tables = {k: tf.constant(v) for k, v in scheduler.tables.items()}

    @tf.function(jit_compile=True)
    def loop(x, noise, tables):
        x = x * scheduler.init_noise_sigma

        def body(i, carry):
            x, state = carry
            out = toy_model(scheduler.scale_model_input(x, i, tables), scheduler.model_timestep(i, tables))
            step_noise = noise[i] if scheduler.stochastic else None
            return scheduler.step_fn(out, i, x, state, step_noise, tables)

        steps = ops.shape(tables["model_timesteps"])[0]
        x, _ = ops.fori_loop(0, steps, body, (x, scheduler.init_state(x)))
        return x

    return np.asarray(loop(tf.constant(latents), tf.constant(noise), tables))


def make(case):
    from diffusion_tf import schedulers

    return schedulers.get(CASES[case]["name"], **CASES[case]["config"])


def assert_timesteps_equal(ours, theirs):
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert ours.dtype.kind == theirs.dtype.kind, (ours.dtype, theirs.dtype)
    if ours.dtype.kind == "f" and np.any(theirs != np.round(theirs)):
        # fractional (Karras) timesteps: the sigma -> t interpolation works on log sigma of the
        # training table, whose float32 square roots differ from PyTorch's in the last bit for
        # about a fifth of the entries; the timesteps then differ by up to 1 ulp (6e-5 near 1000)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    else:
        np.testing.assert_array_equal(ours, theirs)


# ---------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers(ref, case, steps):
    scheduler = make(case)
    assert scheduler.stochastic == CASES[case]["stochastic"]
    timesteps, final = run_eager(scheduler, steps, ref["latents"], ref[f"noise/{steps}"])
    assert_timesteps_equal(timesteps, ref[f"{case}/{steps}/timesteps"])
    err = float(np.abs(final - ref[f"{case}/{steps}/final"]).max())
    assert err <= TOL, f"{case} at {steps} steps: max error {err:.2e} > {TOL}"


# every algorithm (the Karras variants only change the tables: one is compiled below)
@pytest.mark.parametrize("name", sorted({case.split("/")[0] for case in CASES if "karras" not in case}))
def test_one_xla_compiled_loop_equals_eager(ref, name):
    case = f"{name}/sd"
    steps = 20
    noise = ref[f"noise/{steps}"]
    compiled = run_compiled(make(case), steps, ref["latents"], noise)
    _, eager = run_eager(make(case), steps, ref["latents"], noise)
    assert np.abs(compiled - eager).max() <= TOL
    assert np.abs(compiled - ref[f"{case}/{steps}/final"]).max() <= TOL


def test_compiled_loop_reused_for_another_step_count(ref):
    """Tables are arguments, not constants: a function traced for 20 steps runs 50 correctly."""
    import tensorflow as tf
    from keras import ops

    scheduler = make("dpm++2m-karras/sd")

    @tf.function(jit_compile=True, reduce_retracing=True)
    def loop(x, tables):
        def body(i, carry):
            x, state = carry
            out = toy_model(scheduler.scale_model_input(x, i, tables), scheduler.model_timestep(i, tables))
            return scheduler.step_fn(out, i, x, state, None, tables)

        n = ops.shape(tables["model_timesteps"])[0]
        return ops.fori_loop(0, n, body, (x, scheduler.init_state(x)))[0]

    for steps in (20, 50):
        scheduler.set_timesteps(steps)
        tables = {k: tf.constant(v) for k, v in scheduler.tables.items()}
        out = np.asarray(loop(tf.constant(ref["latents"]) * scheduler.init_noise_sigma, tables))
        assert np.abs(out - ref[f"dpm++2m-karras/sd/{steps}/final"]).max() <= TOL


def test_eager_step_api_like_diffusers(ref):
    """`step(model_output, t, sample)` keeps the index and state on the object."""
    from keras import ops

    for case in ("heun/sd", "pndm/linspace_v", "lms-karras/sd", "dpm++2m/linear_trailing_v"):
        scheduler = make(case)
        timesteps = scheduler.set_timesteps(20)
        x = ops.convert_to_tensor(ref["latents"]) * scheduler.init_noise_sigma
        for i, t in enumerate(timesteps):
            x = scheduler.step(toy_model(scheduler.scale_model_input(x, i), np.float32(t)), t, x)
        assert np.abs(np.asarray(x) - ref[f"{case}/20/final"]).max() <= TOL


def test_init_noise_sigma_and_model_input_scale():
    from keras import ops

    from diffusion_tf import schedulers

    euler = schedulers.get("euler")
    euler.set_timesteps(10)
    sigma = float(euler.tables["sigma"][0])
    assert euler.init_noise_sigma == pytest.approx((sigma**2 + 1) ** 0.5)  # "leading" spacing
    x = np.ones((1, 2, 2, 4), "float32")
    np.testing.assert_allclose(
        np.asarray(euler.scale_model_input(x, 0)), x / (sigma**2 + 1) ** 0.5, rtol=1e-6
    )
    trailing = schedulers.get("euler", timestep_spacing="trailing", steps_offset=0)
    trailing.set_timesteps(10)
    assert trailing.init_noise_sigma == pytest.approx(float(trailing.tables["sigma"][0]))
    for name in ("ddim", "ddpm", "pndm", "dpm++2m"):
        s = schedulers.get(name)
        s.set_timesteps(10)
        assert s.init_noise_sigma == 1.0
        assert s.scale_model_input(ops.ones((1, 2)), 3) is not None
        np.testing.assert_array_equal(np.asarray(s.scale_model_input(np.ones((1, 2), "float32"), 3)), 1)


def test_timesteps_structure():
    from diffusion_tf import schedulers

    heun = schedulers.get("heun")
    t = heun.set_timesteps(5)
    assert len(t) == 9 and t[1] == t[2] and t[3] == t[4]
    pndm = schedulers.get("plms")
    t = pndm.set_timesteps(5)
    assert len(t) == 6 and t[1] == t[2] and list(t[::-1][:2]) == [1, 201]
    assert schedulers.get("dpm++2m-karras").set_timesteps(5).dtype == np.int64
    assert schedulers.get("euler-karras").set_timesteps(5).dtype == np.float32


def test_stochastic_schedulers_need_noise():
    from diffusion_tf import schedulers

    for name, config in (("ddpm", {}), ("euler_a", {}), ("ddim", {"eta": 1.0})):
        s = schedulers.get(name, **config)
        assert s.stochastic
        s.set_timesteps(4)
        x = np.zeros((1, 2, 2, 4), "float32")
        with pytest.raises(ValueError, match="noise"):
            s.step_fn(x, 0, x, s.init_state(x))
    for name in ("ddim", "pndm", "euler", "heun", "lms", "dpm++2m"):
        assert not schedulers.get(name).stochastic


def test_add_noise():
    from diffusion_tf import schedulers

    x0 = np.full((2, 2, 2, 4), 0.5, "float32")
    eps = np.ones_like(x0)
    ddim = schedulers.get("ddim")
    ddim.set_timesteps(10)
    a = float(ddim.alphas_cumprod[500])
    np.testing.assert_allclose(np.asarray(ddim.add_noise(x0, eps, 500)), a**0.5 * 0.5 + (1 - a) ** 0.5, rtol=1e-6)
    out = np.asarray(ddim.add_noise(x0, eps, np.array([0, 999])))
    assert out[0, 0, 0, 0] != out[1, 0, 0, 0]
    euler = schedulers.get("euler")
    t = euler.set_timesteps(10)
    sigma = float(euler.tables["sigma"][3])
    np.testing.assert_allclose(np.asarray(euler.add_noise(x0, eps, t[3])), 0.5 + sigma, rtol=1e-6)
    dpm = schedulers.get("dpm++2m")
    t = dpm.set_timesteps(10)
    a_t, s_t = float(dpm.tables["alpha_t"][2]), float(dpm.tables["sigma_t"][2])
    np.testing.assert_allclose(np.asarray(dpm.add_noise(x0, eps, t[2])), a_t * 0.5 + s_t, rtol=1e-6)


# ---------------------------------------------------------------- names and configs
def test_get_names_aliases_and_karras():
    from diffusion_tf import schedulers

    expected = {
        "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
        "plms": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler", "euler-ancestral": "EulerAncestralDiscreteScheduler",
        "heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler",
        "dpm++2m": "DPMSolverMultistepScheduler",
        "euler-karras": "EulerDiscreteScheduler", "heun-karras": "HeunDiscreteScheduler",
        "lms-karras": "LMSDiscreteScheduler", "dpm++2m-karras": "DPMSolverMultistepScheduler",
    }
    assert set(schedulers.NAMES) == set(expected) == set(schedulers.SCHEDULERS)
    for name, cls in expected.items():
        s = schedulers.get(name)
        assert type(s).__name__ == cls and schedulers.SCHEDULERS[name] is type(s)
        assert s.use_karras_sigmas if name.endswith("-karras") else not getattr(s, "use_karras_sigmas", False)
        if name.endswith("-karras"):
            assert s.name == name
    assert schedulers.get("plms").name == "pndm"
    assert schedulers.get("euler", use_karras_sigmas=True).name == "euler-karras"
    with pytest.raises(ValueError) as e:
        schedulers.get("k_euler")
    assert "'k_euler'" in str(e.value) and "dpm++2m-karras" in str(e.value) and "plms" in str(e.value)


def test_names_module_does_not_import_keras():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from diffusion_tf.schedulers.names import NAMES, resolve\n"
        "assert resolve('plms') == ('pndm', {})\n"
        "print('keras' in sys.modules, 'tensorflow' in sys.modules, len(NAMES))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "14"]


@pytest.mark.parametrize(
    "name,config,needle",
    [
        ("ddim", dict(beta_schedule="quadratic"), "beta_schedule='quadratic'"),
        ("euler", dict(timestep_spacing="uniform"), "timestep_spacing='uniform'"),
        ("heun", dict(prediction_type="x0"), "prediction_type='x0'"),
        ("pndm", dict(prediction_type="sample"), "prediction_type='sample'"),
        ("ddim", dict(clip_sample=True), "clip_sample=True"),
        ("ddpm", dict(thresholding=True), "thresholding=True"),
        ("euler", dict(use_exponential_sigmas=True), "use_exponential_sigmas=True"),
        ("dpm++2m", dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver++'"),
        ("dpm++2m", dict(solver_order=3), "solver_order=3"),
        ("lms", dict(final_sigmas_type="max"), None),
        ("euler", dict(final_sigmas_type="max"), "final_sigmas_type='max'"),
        ("ddpm", dict(variance_type="learned"), "variance_type='learned'"),
        ("ddim", dict(eta=-1), "eta=-1"),
        ("ddim", dict(num_train_timesteps=0), "num_train_timesteps=0"),
    ],
)
def test_bad_config(name, config, needle):
    from diffusion_tf import schedulers

    if needle is None:  # a field of another algorithm: ignored
        schedulers.get(name, **config)
        return
    with pytest.raises(ValueError) as e:
        schedulers.get(name, **config)
    assert needle in str(e.value)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, 1001])
def test_bad_num_steps(steps):
    from diffusion_tf import schedulers

    for name in ("ddim", "euler", "heun", "pndm", "dpm++2m", "lms"):
        with pytest.raises(ValueError) as e:
            schedulers.get(name).set_timesteps(steps)
        assert str(steps) in str(e.value)


def test_diffusers_config_fields_accepted_and_round_trip():
    from diffusion_tf import schedulers

    folder_config = {  # a model folder's scheduler config, as diffusers writes it
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.42.1", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
        "thresholding": False, "sample_max_value": 1.0,
    }
    for name in schedulers.NAMES:
        s = schedulers.get(name, **folder_config)
        assert s.prediction_type == "v_prediction" and s.steps_offset == 1
        config = s.get_config()
        again = type(s).from_config(config)
        assert again.get_config() == config
        np.testing.assert_array_equal(again.set_timesteps(7), s.set_timesteps(7))
        assert repr(s).startswith(type(s).__name__ + "(")
    dpm = schedulers.get("dpm++2m-karras", solver_type="heun", final_sigmas_type="sigma_min")
    assert dpm.get_config()["use_karras_sigmas"] and dpm.get_config()["solver_type"] == "heun"


# ---------------------------------------------------------------- live comparison
def _reference_script():
    spec = importlib.util.spec_from_file_location(
        "make_scheduler_fixtures", os.path.join(ROOT, "scripts", "make_scheduler_fixtures.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "case,steps",
    [("dpm++2m-karras/sd", 7), ("heun/linear_trailing_v", 33), ("pndm/sd", 33), ("euler_a/linspace_v", 7)],
)
def test_live_against_diffusers(case, steps):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    script = _reference_script()
    name, config = case.split("/")
    latents = script.starting_latents(seed=steps)
    noise = script.step_noise(steps, seed=steps)
    stochastic = script.SCHEDULERS[name][3]
    timesteps, final = script.run_diffusers(
        name, script.CONFIGS[config], steps, latents, noise if stochastic else None
    )
    ours_t, ours = run_eager(make(case), steps, latents, noise)
    assert_timesteps_equal(ours_t, timesteps)
    assert np.abs(ours - final).max() <= TOL


def test_model_target_is_the_inverse_of_predicted_original_and_noise():
    from diffusion_tf.schedulers.schedule import PREDICTION_TYPES, model_target, predicted_original_and_noise

    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 3, 4, 4))
    a = np.array([0.9, 0.3, 0.01])[:, None, None]
    sample = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    for kind in PREDICTION_TYPES:
        got_x0, got_eps = predicted_original_and_noise(kind, model_target(kind, x0, eps, a), sample, a)
        np.testing.assert_allclose(got_x0, x0, atol=1e-9)
        np.testing.assert_allclose(got_eps, eps, atol=1e-9)
    np.testing.assert_allclose(model_target("v_prediction", x0, eps, a), a**0.5 * eps - (1 - a) ** 0.5 * x0)
