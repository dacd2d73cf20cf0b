"""Schedulers: parity with diffusers, one XLA-compiled loop, names, configs.

Reference trajectories come from scripts/make_scheduler_fixtures.py (committed:
tests/fixtures/schedulers.npz / .json): diffusers' schedulers driven like its
pipelines with a deterministic toy denoiser (`toy_model`, the same formula as the
script's) from fixed latents, at 20 and 50 steps, for Stable Diffusion's config and
two others (linear betas + "trailing" spacing, "linspace" spacing; both v-prediction).
The stochastic ones (DDPM, Euler ancestral, DDIM eta=1) are given the same noise
draws diffusers consumed. Two drivers are checked against them: the index-based
functional core (`step_fn`, as the pipeline's XLA loop runs it) and diffusers' object
loop with timestep values (`scale_model_input(x, t)`, `step(out, t, x)`), for every
scheduler name, also as diffusers' img2img pipeline starts it part-way. No PyTorch is
needed, except by the live tests (marked `live`).
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
CONFIG_NAMES = sorted({case.split("/")[1] for case in CASES})
CORNER = (slice(None), slice(0, 4), slice(0, 4), slice(None))  # the script's stored corner
ALIASES = {"plms": "pndm", "euler-ancestral": "euler_a"}
# every name `get` accepts, plus DDIM with eta=1 given as diffusers' step argument
LOOP_NAMES = (
    "ddim", "ddim-eta1", "ddpm", "pndm", "plms", "euler", "euler-karras", "euler_a", "euler-ancestral",
    "heun", "heun-karras", "lms", "lms-karras", "dpm++2m", "dpm++2m-karras",
)


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
        out = toy_model(scheduler.scale_model_input_at(x, i), scheduler.model_timestep(i))
        x, state = scheduler.step_fn(out, i, x, state, noise[i] if scheduler.stochastic else None)
    return timesteps, np.asarray(x)


def object_loop(scheduler, x, timesteps, noise=None, step_kwargs=None, after_first=None):
    """diffusers' loop on the object API, with timestep VALUES -> the sample after each step.
    `noise[k]`: the k-th step's draw (None: deterministic); `after_first()` runs right after
    the first step."""
    trajectory = []
    for k, t in enumerate(timesteps):
        kwargs = dict(step_kwargs or {}, noise=None if noise is None else noise[k])
        x = scheduler.step(toy_model(scheduler.scale_model_input(x, t), t), t, x, **kwargs)
        trajectory.append(np.asarray(x))
        if k == 0 and after_first is not None:
            after_first()
    return trajectory


def loop_case(name, config_name):
    """-> (fixture case, scheduler built as a diffusers user would, step kwargs, stochastic)."""
    case = f"{ALIASES.get(name, name)}/{config_name}"
    meta = CASES[case]
    step_kwargs = meta["step_kwargs"]
    config = {k: v for k, v in meta["config"].items() if k not in step_kwargs}
    from diffusion_tf import schedulers

    scheduler = schedulers.get(meta["name"] if name == "ddim-eta1" else name, **config)
    return case, scheduler, step_kwargs, meta["stochastic"]


def run_object(scheduler, steps, latents, noise, step_kwargs, stochastic):
    """The standard diffusers loop from `latents` -> (timesteps, trajectory)."""
    from keras import ops

    scheduler.set_timesteps(steps)
    x = ops.convert_to_tensor(latents) * scheduler.init_noise_sigma
    noise = noise if stochastic else None
    return scheduler.timesteps, object_loop(scheduler, x, scheduler.timesteps, noise, step_kwargs)


def img2img_begin(steps, strength, order):
    """diffusers' img2img pipeline: the index into `timesteps` where the run starts."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0) * order


def run_object_img2img(scheduler, steps, strength, image, start_noise, noise, step_kwargs, stochastic):
    """The scheduler as diffusers' img2img pipeline drives it -> (start, renoised, final)."""
    scheduler.set_timesteps(steps)
    begin = img2img_begin(steps, strength, scheduler.order)
    timesteps = scheduler.timesteps[begin:]
    scheduler.set_begin_index(begin)
    start = scheduler.add_noise(image, start_noise, timesteps[:1])
    renoised = []
    trajectory = object_loop(
        scheduler, start, timesteps, noise if stochastic else None, step_kwargs,
        after_first=lambda: renoised.append(scheduler.add_noise(image, start_noise, timesteps[1:2])),
    )
    return np.asarray(start), np.asarray(renoised[0]), trajectory[-1]


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
            out = toy_model(scheduler.scale_model_input_at(x, i, tables), scheduler.model_timestep(i, tables))
            step_noise = noise[i] if scheduler.stochastic else None
            return scheduler.step_fn(out, i, x, state, step_noise, tables)

        steps = ops.shape(tables["model_timesteps"])[0]
        x, _ = ops.fori_loop(0, steps, body, (x, scheduler.init_state(x)))
        return x

    return np.asarray(loop(tf.constant(latents), tf.constant(noise), tables))


def scaled_error(ours, theirs):
    """max |ours - theirs| / max(1, max |theirs|). Intermediate samples of the sigma schedulers
    are x0 + sigma eps with sigma up to ~160 (linear betas), where one float32 ulp is already
    ~1e-5; so a sample along the way is compared at its own scale, and the final sample (of
    order 1, where this is the absolute error) as the existing parity tests do."""
    theirs = np.asarray(theirs)
    return float(np.abs(np.asarray(ours) - theirs).max()) / max(1.0, float(np.abs(theirs).max()))


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
@pytest.mark.compiles
@pytest.mark.parametrize("name", sorted({case.split("/")[0] for case in CASES if "karras" not in case}))
def test_one_xla_compiled_loop_equals_eager(ref, name):
    case = f"{name}/sd"
    steps = 20
    noise = ref[f"noise/{steps}"]
    compiled = run_compiled(make(case), steps, ref["latents"], noise)
    _, eager = run_eager(make(case), steps, ref["latents"], noise)
    assert np.abs(compiled - eager).max() <= TOL
    assert np.abs(compiled - ref[f"{case}/{steps}/final"]).max() <= TOL


@pytest.mark.compiles
def test_compiled_loop_reused_for_another_step_count(ref):
    """Tables are arguments, not constants: a function traced for 20 steps runs 50 correctly."""
    import tensorflow as tf
    from keras import ops

    scheduler = make("dpm++2m-karras/sd")

    @tf.function(jit_compile=True, reduce_retracing=True)
    def loop(x, tables):
        def body(i, carry):
            x, state = carry
            out = toy_model(scheduler.scale_model_input_at(x, i, tables), scheduler.model_timestep(i, tables))
            return scheduler.step_fn(out, i, x, state, None, tables)

        n = ops.shape(tables["model_timesteps"])[0]
        return ops.fori_loop(0, n, body, (x, scheduler.init_state(x)))[0]

    for steps in (20, 50):
        scheduler.set_timesteps(steps)
        tables = {k: tf.constant(v) for k, v in scheduler.tables.items()}
        out = np.asarray(loop(tf.constant(ref["latents"]) * scheduler.init_noise_sigma, tables))
        assert np.abs(out - ref[f"dpm++2m-karras/sd/{steps}/final"]).max() <= TOL


# ---------------------------------------------------------------- diffusers' object loop
@pytest.mark.parametrize("config_name", CONFIG_NAMES)
@pytest.mark.parametrize("name", LOOP_NAMES)
def test_object_loop_matches_diffusers(ref, name, config_name):
    """`for t in s.timesteps: x = s.step(eps(s.scale_model_input(x, t), t), t, x)`: every
    step's sample against diffusers' (the stored corner) at the loop's step count, and the
    whole final sample at 20 steps."""
    steps = int(ref["loop_steps"])
    case, scheduler, step_kwargs, stochastic = loop_case(name, config_name)
    timesteps, trajectory = run_object(scheduler, steps, ref["latents"], ref[f"noise/{steps}"], step_kwargs, stochastic)
    assert_timesteps_equal(timesteps, ref[f"{case}/{steps}/timesteps"])
    expected = ref[f"{case}/{steps}/trajectory"]
    assert len(trajectory) == len(expected) == len(timesteps)
    err = max(scaled_error(x[CORNER], e) for x, e in zip(trajectory, expected))
    assert err <= TOL, f"{name} ({case}) at {steps} steps: max scaled error {err:.2e} > {TOL}"
    err = float(np.abs(trajectory[-1][CORNER] - expected[-1]).max())
    assert err <= TOL, f"{name} ({case}) at {steps} steps: final max error {err:.2e} > {TOL}"
    _, trajectory = run_object(scheduler, 20, ref["latents"], ref["noise/20"], step_kwargs, stochastic)
    err = float(np.abs(trajectory[-1] - ref[f"{case}/20/final"]).max())
    assert err <= TOL, f"{name} ({case}) at 20 steps: max error {err:.2e} > {TOL}"
    if scheduler.step_index is not None:  # index-tracking: one per entry of timesteps (Heun: 2N - 1)
        assert scheduler.step_index == len(scheduler.timesteps)


@pytest.mark.parametrize("config_name", CONFIG_NAMES)
@pytest.mark.parametrize("name", LOOP_NAMES)
def test_object_loop_img2img_matches_diffusers(ref, name, config_name):
    """As diffusers' img2img pipeline: set_begin_index(begin), add_noise at timesteps[begin],
    the loop from there, and add_noise again after the first step (the step index then)."""
    steps = int(ref["loop_steps"])
    case, scheduler, step_kwargs, stochastic = loop_case(name, config_name)
    got = run_object_img2img(
        scheduler, steps, float(ref["img2img/strength"]), ref["latents"], ref["noise/img2img"],
        ref[f"noise/{steps}"], step_kwargs, stochastic,
    )
    for key, x in zip(("start", "renoised", "final"), got):
        expected = ref[f"{case}/img2img/{key}"]
        err = float(np.abs(x[CORNER] - expected).max()) if key == "final" else scaled_error(x[CORNER], expected)
        assert err <= TOL, f"{name} ({case}) img2img {key}: max error {err:.2e} > {TOL}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_object_loop_equals_functional_core(ref, case):
    """The object API is the functional core driven by timestep values: the same samples at
    every step as `step_fn` at the looked-up indices."""
    from keras import ops

    name = case.split("/")[0]
    _, scheduler, step_kwargs, stochastic = loop_case(name, case.split("/")[1])
    core = make(case)  # DDIM eta=1 from its config here, from the step argument above
    steps = int(ref["loop_steps"])
    noise = ref[f"noise/{steps}"]
    _, trajectory = run_object(scheduler, steps, ref["latents"], noise, step_kwargs, stochastic)
    timesteps = core.set_timesteps(steps)
    x = ops.convert_to_tensor(ref["latents"]) * core.init_noise_sigma
    state = core.init_state(x)
    for i, ours in enumerate(trajectory):
        out = toy_model(core.scale_model_input_at(x, i), core.model_timestep(i))
        x, state = core.step_fn(out, i, x, state, noise[i] if stochastic else None)
        np.testing.assert_array_equal(ours, np.asarray(x), err_msg=f"{case} step {i} (t = {timesteps[i]})")


def test_object_api_step_index_like_diffusers():
    from keras import ops

    from diffusion_tf import schedulers

    x = ops.ones((1, 2, 2, 4))
    heun = schedulers.get("heun")
    t = heun.set_timesteps(4)
    assert heun.step_index is None and heun.begin_index is None and heun.order == 2
    heun.scale_model_input(x, t[0])  # initialises the index from the timestep value
    assert heun.step_index == 0
    for k, tk in enumerate(t):
        heun.step(heun.scale_model_input(x, tk) * 0, tk, x)
        assert heun.step_index == k + 1
    with pytest.raises(ValueError, match="past the last"):
        heun.step(x, t[-1], x)
    heun.set_timesteps(4)
    assert heun.step_index is None
    # a repeated timestep starts at its second occurrence, as diffusers (no skipped sigma)
    heun.scale_model_input(x, t[1])
    assert heun.step_index == 2
    heun.set_timesteps(4)
    heun.set_begin_index(3)
    heun.scale_model_input(x, t[0])  # the begin index wins over the timestep
    assert heun.step_index == 3 and heun.begin_index == 3
    with pytest.raises(ValueError, match="begin_index=-1"):
        heun.set_begin_index(-1)
    # DDIM, DDPM, PNDM work from the timestep value, as diffusers' (no step index)
    for name in ("ddim", "ddpm", "pndm"):
        s = schedulers.get(name)
        t = s.set_timesteps(4)
        s.step(x, t[0], x, noise=np.zeros((1, 2, 2, 4), "float32"))
        assert s.step_index is None
    pndm = schedulers.get("pndm")
    t = pndm.set_timesteps(4)
    assert pndm.counter == 0
    pndm.step(x, t[0], x)
    pndm.step(x, t[1], x)
    assert pndm.counter == 2


def test_object_api_rejects_an_index_for_a_timestep():
    from keras import ops

    from diffusion_tf import schedulers

    x = ops.ones((1, 2, 2, 4))
    zeros = np.zeros((1, 2, 2, 4), "float32")
    for name in ("euler", "euler_a", "heun", "lms", "dpm++2m", "ddpm"):
        s = schedulers.get(name)
        s.set_timesteps(20)  # "leading": 951, 901, ..., 1, so 3 (an index) is not a timestep
        with pytest.raises(ValueError, match="timestep 3.0 is not one of"):
            s.step(x, 3.0, x, noise=zeros)
    for name in ("euler", "euler_a", "heun", "lms"):
        s = schedulers.get(name)
        s.set_timesteps(20)
        with pytest.raises(ValueError, match="timestep 3 is not one of"):
            s.scale_model_input(x, 3)
    for name in ("euler", "euler_a"):  # as diffusers: an integer is taken for an index
        s = schedulers.get(name)
        t = s.set_timesteps(20)
        with pytest.raises(ValueError, match=f"timestep {int(t[0])} is an integer"):
            s.step(x, int(t[0]), x, noise=zeros)
    s = schedulers.get("euler")
    with pytest.raises(ValueError, match="set_timesteps"):
        s.scale_model_input(x, 1.0)
    s.set_timesteps(20)
    with pytest.raises(ValueError, match="one value"):
        s.scale_model_input(x, s.timesteps[:2])
    with pytest.raises(ValueError, match="order=2"):
        schedulers.get("lms").step(x, 1.0, x, order=2)
    ddim = schedulers.get("ddim")
    ddim.set_timesteps(20)
    with pytest.raises(ValueError, match="eta=-0.5"):
        ddim.step(x, 1, x, eta=-0.5)
    with pytest.raises(ValueError, match="noise"):
        ddim.step(x, 1, x, eta=1.0)


def test_init_noise_sigma_and_model_input_scale():
    from keras import ops

    from diffusion_tf import schedulers

    euler = schedulers.get("euler")
    euler.set_timesteps(10)
    sigma = float(euler.tables["sigma"][0])
    assert euler.init_noise_sigma == pytest.approx((sigma**2 + 1) ** 0.5)  # "leading" spacing
    x = np.ones((1, 2, 2, 4), "float32")
    np.testing.assert_allclose(
        np.asarray(euler.scale_model_input_at(x, 0)), x / (sigma**2 + 1) ** 0.5, rtol=1e-6
    )
    sigma3 = float(euler.tables["sigma"][3])
    np.testing.assert_allclose(  # the object API takes the timestep value
        np.asarray(euler.scale_model_input(x, euler.timesteps[3])), x / (sigma3**2 + 1) ** 0.5, rtol=1e-6
    )
    trailing = schedulers.get("euler", timestep_spacing="trailing", steps_offset=0)
    trailing.set_timesteps(10)
    assert trailing.init_noise_sigma == pytest.approx(float(trailing.tables["sigma"][0]))
    for name in ("ddim", "ddpm", "pndm", "dpm++2m"):
        s = schedulers.get(name)
        s.set_timesteps(10)
        assert s.init_noise_sigma == 1.0
        x = ops.ones((1, 2))
        assert s.scale_model_input(x, s.timesteps[3]) is x and s.scale_model_input_at(x, 3) is x


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
    # a [B] vector of timestep values: one noise level per sample
    out = np.asarray(euler.add_noise(x0, eps, np.array([euler.timesteps[1], euler.timesteps[6]])))
    np.testing.assert_allclose(out[:, 0, 0, 0], 0.5 + euler.tables["sigma"][[1, 6]], rtol=1e-6)
    # as diffusers: with a begin index, add_noise uses it (image-to-image start), and the step
    # index once a step ran (inpainting), whatever the timestep values
    t = euler.timesteps
    euler.set_begin_index(4)
    np.testing.assert_allclose(np.asarray(euler.add_noise(x0, eps, t[:1])), 0.5 + euler.tables["sigma"][4], rtol=1e-6)
    euler.step(eps, t[4], x0)
    np.testing.assert_allclose(np.asarray(euler.add_noise(x0, eps, t[:1])), 0.5 + euler.tables["sigma"][5], rtol=1e-6)
    for s in (euler, dpm):
        s.set_timesteps(10)
        with pytest.raises(ValueError, match="timestep 500 is not one of"):
            s.add_noise(x0, eps, np.array([500]))


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
        "lcm": "LCMScheduler", "tcd": "TCDScheduler",  # parity: test_few_step.py
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
    assert out.stdout.split() == ["False", "False", "16"]


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


@pytest.mark.live
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


LIVE_STEPS = 13  # another step count than the fixtures' (odd; Heun: 25 calls)


@pytest.mark.live
@pytest.mark.parametrize("config_name", CONFIG_NAMES)
@pytest.mark.parametrize("name", LOOP_NAMES)
def test_live_object_loop_against_diffusers(name, config_name):
    """diffusers' scheduler and ours in the same loop, `step(eps(scale_model_input(x, t), t), t, x)`,
    fresh latents and noise: every step's whole sample, and the img2img start part-way."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    script = _reference_script()
    case, scheduler, step_kwargs, stochastic = loop_case(name, config_name)
    algorithm = case.split("/")[0]
    latents = script.starting_latents(seed=LIVE_STEPS)
    noise = script.step_noise(LIVE_STEPS, seed=LIVE_STEPS)
    theirs = []
    timesteps, _ = script.run_diffusers(
        algorithm, script.CONFIGS[config_name], LIVE_STEPS, latents, noise if stochastic else None, theirs
    )
    ours_t, ours = run_object(scheduler, LIVE_STEPS, latents, noise, step_kwargs, stochastic)
    assert_timesteps_equal(ours_t, timesteps)
    assert len(ours) == len(theirs)
    err = max(scaled_error(a, b) for a, b in zip(ours, theirs))
    assert err <= TOL, f"{name} ({case}): max scaled error {err:.2e} > {TOL}"
    err = float(np.abs(ours[-1] - theirs[-1]).max())
    assert err <= TOL, f"{name} ({case}): final max error {err:.2e} > {TOL}"
    start_noise = script.step_noise(1, seed=LIVE_STEPS)[0]
    theirs = script.run_diffusers_img2img(
        algorithm, script.CONFIGS[config_name], LIVE_STEPS, latents, start_noise, noise if stochastic else None
    )
    ours = run_object_img2img(
        scheduler, LIVE_STEPS, script.IMG2IMG_STRENGTH, latents, start_noise, noise, step_kwargs, stochastic
    )
    for key, a, b in zip(("start", "renoised", "final"), ours, theirs):
        err = float(np.abs(a - b).max()) if key == "final" else scaled_error(a, b)
        assert err <= TOL, f"{name} ({case}) img2img {key}: max error {err:.2e} > {TOL}"


def test_model_target_is_the_inverse_of_predicted_original_and_noise():
    from diffusion_tf.schedulers.noise_schedule import PREDICTION_TYPES, model_target, predicted_original_and_noise

    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 3, 4, 4))
    a = np.array([0.9, 0.3, 0.01])[:, None, None]
    sample = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    for kind in PREDICTION_TYPES:
        got_x0, got_eps = predicted_original_and_noise(kind, model_target(kind, x0, eps, a), sample, a)
        np.testing.assert_allclose(got_x0, x0, atol=1e-9)
        np.testing.assert_allclose(got_eps, eps, atol=1e-9)
    np.testing.assert_allclose(model_target("v_prediction", x0, eps, a), a**0.5 * eps - (1 - a) ** 0.5 * x0)
