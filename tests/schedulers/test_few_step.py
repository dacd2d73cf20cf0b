"""Few-step samplers (LCM, TCD): parity with diffusers' LCMScheduler / TCDScheduler, one XLA loop,
their options and their errors.

Reference trajectories come from scripts/make_scheduler_fixtures.py (`--few-step`; committed:
tests/fixtures/schedulers_few_step.npz / .json): diffusers' schedulers driven as its pipelines
drive them, with the toy denoiser of test_schedulers.py, at 2, 4 and 8 steps, given the same fresh
noise per step, for the defaults and non-default configs (v-prediction with "trailing" spacing,
sample prediction with original_inference_steps=25 and timestep_scaling=5, TCD's gamma 0, 0.5, 1),
plus image-to-image as diffusers' LatentConsistencyModelImg2ImgPipeline runs it (strength inside
`set_timesteps`). Three drivers are checked against them within 1e-5: the functional core
eagerly, the object API with timestep values, and the core inside one XLA-compiled `ops.fori_loop`.
"""

import json
import os
import subprocess
import sys
import importlib.util

import numpy as np
import pytest

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
ROOT = os.path.dirname(os.path.dirname(FIXTURES))
TOL = 1e-5
CORNER = (slice(None), slice(0, 4), slice(0, 4), slice(None))

with open(os.path.join(FIXTURES, "schedulers_few_step.json"), encoding="utf-8") as _f:
    META = json.load(_f)
CASES = META["cases"]
STEPS = META["steps"]


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(FIXTURES, "schedulers_few_step.npz")) as data:
        return dict(data)


def toy_model(x, t):
    """The fixture script's toy denoiser (test_schedulers.toy_model)."""
    from keras import ops

    t = ops.cast(t, "float32")
    return ops.sqrt(t / 1000) * x + 0.2 * ops.tanh(0.5 * x) * (0.3 + t / 1000) + 0.1 * ops.sin(x)


def make(case):
    from diffusion_tf import schedulers

    return schedulers.get(CASES[case]["name"], **CASES[case]["config"])


def second_output(scheduler, out, i, x):
    """LCM's `denoised` / TCD's `pred_noised_sample` at index i (the functional core)."""
    fn = scheduler.denoised_fn if scheduler.name == "lcm" else scheduler.pred_noised_fn
    return fn(out, i, x)


def run_core(scheduler, steps, x, noise, strength=1.0):
    """The pipeline loop, one eager step_fn at a time -> (timesteps, samples, second outputs)."""
    from keras import ops

    timesteps = scheduler.set_timesteps(steps, strength=strength)
    x = ops.convert_to_tensor(x)
    state = scheduler.init_state(x)
    samples, seconds = [], []
    for i in range(len(timesteps)):
        out = toy_model(scheduler.scale_model_input_at(x, i), scheduler.model_timestep(i))
        seconds.append(np.asarray(second_output(scheduler, out, i, x)))
        x, state = scheduler.step_fn(out, i, x, state, noise[i] if scheduler.stochastic else None)
        samples.append(np.asarray(x))
    return timesteps, samples, seconds


def run_object(scheduler, steps, latents, noise, step_kwargs=None):
    """diffusers' loop on the object API with timestep VALUES; no noise at the last step (none is
    drawn there) -> (timesteps, samples, second outputs)."""
    from keras import ops

    scheduler.set_timesteps(steps)
    x = ops.convert_to_tensor(latents) * scheduler.init_noise_sigma
    flag = "return_denoised" if scheduler.name == "lcm" else "return_pred_noised"
    samples, seconds = [], []
    for k, t in enumerate(scheduler.timesteps):
        last = k == len(scheduler.timesteps) - 1
        out = toy_model(scheduler.scale_model_input(x, t), t)
        x, second = scheduler.step(out, t, x, noise=None if last else noise[k], **(step_kwargs or {}), **{flag: True})
        samples.append(np.asarray(x))
        seconds.append(np.asarray(second))
    return scheduler.timesteps, samples, seconds


def run_compiled(scheduler, steps, latents, noise):
    """The whole schedule as one `ops.fori_loop` inside tf.function(jit_compile=True), tables as arguments."""
    import tensorflow as tf
    from keras import ops

    scheduler.set_timesteps(steps)
    tables = {k: tf.constant(v) for k, v in scheduler.tables.items()}

    @tf.function(jit_compile=True)
    def loop(x, noise, tables):
        def body(i, carry):
            x, state = carry
            out = toy_model(scheduler.scale_model_input_at(x, i, tables), scheduler.model_timestep(i, tables))
            return scheduler.step_fn(out, i, x, state, noise[i] if scheduler.stochastic else None, tables)

        n = ops.shape(tables["model_timesteps"])[0]
        return ops.fori_loop(0, n, body, (x, scheduler.init_state(x)))[0]

    return np.asarray(loop(tf.constant(latents) * scheduler.init_noise_sigma, tf.constant(noise), tables))


def max_error(ours, theirs):
    return float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())


def check_run(ref_prefix, ref, timesteps, samples, seconds, crop=CORNER):
    np.testing.assert_array_equal(timesteps, ref[f"{ref_prefix}/timesteps"])
    assert np.asarray(timesteps).dtype == np.int64
    expected, expected_seconds = ref[f"{ref_prefix}/trajectory"], ref[f"{ref_prefix}/denoised"]
    assert len(samples) == len(expected) == len(timesteps)
    err = max(max_error(x[crop], e) for x, e in zip(samples, expected))
    err2 = max(max_error(x[crop], e) for x, e in zip(seconds, expected_seconds))
    final = max_error(samples[-1], ref[f"{ref_prefix}/final"])
    assert max(err, err2, final) <= TOL, f"{ref_prefix}: trajectory {err:.2e}, second output {err2:.2e}, final {final:.2e}"
    return max(err, err2, final)


# ---------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_functional_core_matches_diffusers(ref, case, steps):
    scheduler = make(case)
    assert scheduler.stochastic == CASES[case]["stochastic"]
    timesteps, samples, seconds = run_core(scheduler, steps, ref["latents"], ref[f"noise/{steps}"])
    check_run(f"{case}/{steps}", ref, timesteps, samples, seconds)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_object_api_matches_diffusers(ref, case, steps):
    scheduler = make(case)
    timesteps, samples, seconds = run_object(scheduler, steps, ref["latents"], ref[f"noise/{steps}"])
    check_run(f"{case}/{steps}", ref, timesteps, samples, seconds)
    assert scheduler.step_index == steps
    # the last step's sample is the second output itself (LCM: denoised; TCD: x_s)
    np.testing.assert_array_equal(samples[-1], seconds[-1])


def test_tcd_eta_step_argument_is_gamma(ref):
    """diffusers' `step(..., eta=g)` on a default TCD scheduler = our config gamma=g."""
    from diffusion_tf import schedulers

    case = "tcd-gamma0.5/linear_trailing_v"
    config = {k: v for k, v in CASES[case]["config"].items() if k != "gamma"}
    assert CASES[case]["step_kwargs"] == {"eta": 0.5}
    scheduler = schedulers.get("tcd", **config)
    assert scheduler.gamma == 0.3
    timesteps, samples, seconds = run_object(scheduler, 4, ref["latents"], ref["noise/4"], {"eta": 0.5})
    check_run(f"{case}/4", ref, timesteps, samples, seconds)
    # eta=0 needs no noise at all, and is the core of a gamma=0 scheduler
    _, samples, _ = run_object(schedulers.get("tcd", **config), 4, ref["latents"], [None] * 4, {"eta": 0.0})
    _, core, _ = run_core(schedulers.get("tcd", gamma=0, **config), 4, ref["latents"], None)
    np.testing.assert_array_equal(samples[-1], core[-1])
    assert schedulers.get("tcd", eta=0.7).gamma == 0.7  # a config's `eta` is taken as gamma


@pytest.mark.parametrize("case", META["img2img_cases"])
def test_image_to_image_strength_in_set_timesteps(ref, case):
    """As LatentConsistencyModelImg2ImgPipeline: set_timesteps(n, strength) picks n timesteps below
    int(original_inference_steps x strength); the run starts from add_noise at timesteps[0]."""
    steps, strength = META["img2img"]["steps"], META["img2img"]["strength"]
    scheduler = make(case)
    timesteps = scheduler.set_timesteps(steps, strength=strength)
    np.testing.assert_array_equal(timesteps, ref[f"{case}/img2img/timesteps"])
    assert timesteps[0] < 999 and len(timesteps) == steps
    start = scheduler.add_noise(ref["latents"], ref["noise/img2img"], timesteps[:1])
    assert max_error(np.asarray(start)[CORNER], ref[f"{case}/img2img/start"]) <= TOL
    _, samples, _ = run_core(scheduler, steps, np.asarray(start), ref[f"noise/{steps}"], strength=strength)
    assert max_error(samples[-1], ref[f"{case}/img2img/final"]) <= TOL
    assert scheduler.set_timesteps(steps)[0] == 999  # strength is per call: back to the full schedule


@pytest.mark.compiles
@pytest.mark.parametrize("case", ["lcm/sd", "tcd/sd", "tcd-gamma0/sd", "lcm-custom/sd"])
def test_one_xla_compiled_loop_matches_diffusers(ref, case):
    for steps in (4, 8):  # one function per step count here; the tables are its arguments
        out = run_compiled(make(case), steps, ref["latents"], ref[f"noise/{steps}"])
        err = max_error(out, ref[f"{case}/{steps}/final"])
        assert err <= TOL, f"{case} at {steps} steps, XLA: {err:.2e}"


@pytest.mark.compiles
def test_compiled_loop_reused_for_another_step_count(ref):
    """The tables are arguments: one function runs 2, 4 and 8 steps correctly, with
    the noise of every step given (the last one's coefficient is 0)."""
    import tensorflow as tf
    from keras import ops

    scheduler = make("lcm/sd")

    @tf.function(jit_compile=True, reduce_retracing=True)
    def loop(x, noise, tables):
        def body(i, carry):
            x, state = carry
            out = toy_model(scheduler.scale_model_input_at(x, i, tables), scheduler.model_timestep(i, tables))
            return scheduler.step_fn(out, i, x, state, noise[i], tables)

        return ops.fori_loop(0, ops.shape(tables["model_timesteps"])[0], body, (x, scheduler.init_state(x)))[0]

    for steps in STEPS:
        scheduler.set_timesteps(steps)
        tables = {k: tf.constant(v) for k, v in scheduler.tables.items()}
        out = loop(tf.constant(ref["latents"]), tf.constant(ref[f"noise/{steps}"]), tables)
        assert max_error(out, ref[f"lcm/sd/{steps}/final"]) <= TOL
    # the first shape, then one trace relaxed to any step count (reduce_retracing) for the other two
    assert loop.experimental_get_tracing_count() == 2


# ---------------------------------------------------------------- behaviour and errors
def test_timesteps_ignore_spacing_and_offset_as_diffusers():
    from diffusion_tf import schedulers

    for spacing, offset in (("leading", 1), ("trailing", 0), ("linspace", 0)):
        for name in ("lcm", "tcd"):
            s = schedulers.get(name, timestep_spacing=spacing, steps_offset=offset)
            assert s.set_timesteps(4).tolist() == [999, 759, 499, 259]
    lcm = schedulers.get("lcm", original_inference_steps=10)  # k = 100: 99, 199, ..., 999
    assert lcm.set_timesteps(3).tolist() == [999, 699, 399]
    assert lcm.set_timesteps(10).tolist() == list(range(999, 0, -100))
    assert schedulers.get("lcm").set_timesteps(1).tolist() == [999]


def test_noise_is_needed_except_at_the_last_step():
    from diffusion_tf import schedulers

    x = np.zeros((1, 2, 2, 4), "float32")
    for name, config in (("lcm", {}), ("tcd", {}), ("tcd", {"gamma": 1.0})):
        s = schedulers.get(name, **config)
        assert s.stochastic and s.init_noise_sigma == 1.0
        t = s.set_timesteps(3)
        with pytest.raises(ValueError, match="noise"):
            s.step_fn(x, 0, x, s.init_state(x))
        with pytest.raises(ValueError, match="noise"):
            s.step(x, t[0], x)
        s.step_fn(x, 2, x, ())  # the last step draws nothing
        s.set_timesteps(3)
        for k, tk in enumerate(t):
            s.step(x, tk, x, noise=None if k == 2 else x)
        with pytest.raises(ValueError, match="past the last"):
            s.step(x, t[-1], x)
    deterministic = schedulers.get("tcd", gamma=0)
    assert not deterministic.stochastic
    deterministic.set_timesteps(3)
    deterministic.step_fn(x, 0, x, ())


@pytest.mark.parametrize(
    "name,config,needle",
    [
        ("lcm", dict(original_inference_steps=0), "original_inference_steps=0"),
        ("lcm", dict(original_inference_steps=-5), "original_inference_steps=-5"),
        ("lcm", dict(original_inference_steps=2.5), "original_inference_steps=2.5"),
        ("lcm", dict(original_inference_steps=True), "original_inference_steps=True"),
        ("tcd", dict(original_inference_steps=1001), "original_inference_steps=1001"),
        ("lcm", dict(timestep_scaling=0), "timestep_scaling=0"),
        ("lcm", dict(timestep_scaling=float("nan")), "timestep_scaling=nan"),
        ("tcd", dict(gamma=1.5), "gamma=1.5"),
        ("tcd", dict(gamma=-0.1), "gamma=-0.1"),
        ("tcd", dict(gamma="0.3"), "gamma='0.3'"),
        ("tcd", dict(eta=2.0), "gamma=2.0"),
        ("lcm", dict(clip_sample=True), "clip_sample=True"),
        ("tcd", dict(thresholding=True), "thresholding=True"),
        ("lcm", dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True"),
        ("lcm", dict(prediction_type="x0"), "prediction_type='x0'"),
        ("tcd", dict(timestep_spacing="uniform"), "timestep_spacing='uniform'"),
    ],
)
def test_bad_config(name, config, needle):
    from diffusion_tf import schedulers

    with pytest.raises(ValueError) as e:
        schedulers.get(name, **config)
    assert needle in str(e.value)
    if "gamma" in needle:
        assert "[0, 1]" in str(e.value)
    if "original_inference_steps" in needle:
        assert "between 1 and num_train_timesteps=1000" in str(e.value)


def test_bad_steps_and_strength():
    from diffusion_tf import schedulers

    for name in ("lcm", "tcd"):
        s = schedulers.get(name)
        with pytest.raises(ValueError) as e:
            s.set_timesteps(51)
        assert "num_steps=51" in str(e.value) and "original_inference_steps=50" in str(e.value)
        for steps in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match=f"num_steps={steps!r}"):
                s.set_timesteps(steps)
        for strength in (0, -0.5, 1.5, float("nan"), "1"):
            with pytest.raises(ValueError, match=f"strength={strength!r}"):
                s.set_timesteps(4, strength=strength)
        with pytest.raises(ValueError) as e:  # int(50 x 0.05) = 2 timesteps left for 4 steps
            s.set_timesteps(4, strength=0.05)
        assert "strength=0.05" in str(e.value) and "= 2" in str(e.value) and "at least 0.08" in str(e.value)
        assert len(s.set_timesteps(2, strength=0.05)) == 2
    tcd = schedulers.get("tcd")
    tcd.set_timesteps(4)
    x = np.zeros((1, 2, 2, 4), "float32")
    with pytest.raises(ValueError, match=r"eta=1.5; must be a number in \[0, 1\]"):
        tcd.step(x, tcd.timesteps[0], x, noise=x, eta=1.5)


def test_config_round_trip_and_model_folder_config():
    from diffusion_tf import schedulers

    folder = {  # an LCM model folder's scheduler_config.json (LCM_Dreamshaper_v7's fields)
        "_class_name": "LCMScheduler", "_diffusers_version": "0.22.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
        "original_inference_steps": 50, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
        "sample_max_value": 1.0, "set_alpha_to_one": True, "steps_offset": 1, "thresholding": False,
        "timestep_scaling": 10.0, "timestep_spacing": "leading", "trained_betas": None,
    }
    for name in ("lcm", "tcd"):
        s = schedulers.get(name, **folder)
        again = type(s).from_config(s.get_config())
        assert again.get_config() == s.get_config()
        np.testing.assert_array_equal(again.set_timesteps(4), s.set_timesteps(4))
        for key, value in s.tables.items():
            np.testing.assert_array_equal(again.tables[key], value, err_msg=key)
    assert schedulers.get("lcm", timestep_scaling=5).get_config()["timestep_scaling"] == 5.0
    assert schedulers.get("tcd", gamma=0.5).get_config()["gamma"] == 0.5


# ---------------------------------------------------------------- live comparison
@pytest.mark.live
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("torch", "diffusers")),
                    reason="the live check needs torch and diffusers")
def test_live_against_diffusers(tmp_path):
    """diffusers run now (in its own process: PyTorch and TensorFlow are never in one) at step counts
    the fixtures do not have, fresh latents and noise, every case: whole samples of every step."""
    out = tmp_path / "live.npz"
    script = os.path.join(ROOT, "scripts", "make_scheduler_fixtures.py")
    proc = subprocess.run([sys.executable, script, "--few-step-live", str(out), "3", "6"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        live = {k: f[k] for k in f.files}
    everything = (slice(None),) * 4
    for steps in (3, 6):
        for case in CASES:
            scheduler = make(case)
            timesteps, samples, seconds = run_core(scheduler, steps, live[f"latents/{steps}"], live[f"noise/{steps}"])
            check_run(f"{case}/{steps}", live, timesteps, samples, seconds, crop=everything)
            timesteps, samples, seconds = run_object(make(case), steps, live[f"latents/{steps}"], live[f"noise/{steps}"])
            check_run(f"{case}/{steps}", live, timesteps, samples, seconds, crop=everything)
