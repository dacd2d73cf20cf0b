"""Write the schedulers' reference trajectories (needs torch and diffusers).

    pip install torch==2.13.0 diffusers==0.42.1
    python scripts/make_scheduler_fixtures.py

For every scheduler of diffusion_tf.schedulers (each Karras variant too), two or three
configurations (Stable Diffusion's, plus others with other beta schedules, spacings and
v-prediction) and 20 and 50 steps, it runs diffusers' same-named scheduler the way its
pipelines do (latents * init_noise_sigma; per timestep: scale_model_input, the model,
step) with a fixed deterministic toy denoiser (`toy_model`, written identically with
keras.ops in the tests) from fixed starting latents, and records into
tests/fixtures/schedulers.npz:

    latents                  the starting latents [1, 8, 8, 4] (NHWC; diffusers sees NCHW)
    noise/<steps>            [steps, 1, 8, 8, 4]: the standard-normal draws of the stochastic
                             schedulers, one per step
    <case>/<steps>/timesteps diffusers' `timesteps` after set_timesteps(steps)
    <case>/<steps>/final     the final sample (NHWC)

and, for diffusers' object loop as a diffusers user writes it (driven identically by
diffusion_tf's `step(model_output, t, sample)` / `scale_model_input(sample, t)` in the tests),
at LOOP_STEPS steps; every sample stored is its corner x[:, :4, :4, :] (CORNER; the
schedulers and the toy model are elementwise, so a corner checks the same arithmetic and
keeps the file small):

    loop_steps, img2img/strength         LOOP_STEPS and IMG2IMG_STRENGTH (scalars)
    noise/<LOOP_STEPS>                   [LOOP_STEPS, 1, 8, 8, 4] standard-normal step draws
    <case>/<LOOP_STEPS>/timesteps        `timesteps`
    <case>/<LOOP_STEPS>/trajectory       [len(timesteps), 1, 4, 4, 4]: the sample after each step
    noise/img2img                        [1, 8, 8, 4]: the noise given to add_noise
    <case>/img2img/{start,renoised,final} image-to-image as diffusers' img2img pipeline runs a
                                         scheduler (strength IMG2IMG_STRENGTH): set_begin_index
                                         (where the scheduler has it), start = add_noise(latents,
                                         noise, timesteps[begin:begin + 1]), the loop from there;
                                         renoised = add_noise(latents, noise, timesteps[begin + 1:
                                         begin + 2]) right after the first step (inpainting's
                                         re-noising, which diffusers takes at the step index)

and the cases into tests/fixtures/schedulers.json: {case: {"name": get() name, "diffusers":
class, "config": fields for both, "step_kwargs": extra diffusers step() arguments,
"stochastic": bool}}.

The stochastic schedulers (DDPM, Euler ancestral, DDIM with eta=1) are matched on the
SAME noise: `randn_tensor` of their diffusers modules is replaced by one returning
noise/<steps>[k] at step k, and diffusion_tf's `step_fn` gets the same array as `noise=`.
(DDPM draws nothing at t = 0: its last step under "linspace" spacing then ignores
noise[k], in both.)

Few-step samplers (LCM, TCD) go to their own files, tests/fixtures/schedulers_few_step.npz /
.json (`few_step_main`; `--few-step` writes only these), at FEW_STEPS = 2, 4, 8 steps for the
cases of FEW_STEP_CASES (defaults; v-prediction with "trailing" spacing, which LCM ignores;
sample prediction with another original_inference_steps and timestep_scaling; TCD's gamma
0, 0.3, 0.5, 1):

    noise/<steps>                 [steps, 1, 8, 8, 4] the fresh noise of each step (the last unused)
    <case>/<steps>/timesteps      `timesteps`
    <case>/<steps>/trajectory     [steps, 1, 4, 4, 4] the sample after each step (CORNER)
    <case>/<steps>/denoised       [steps, 1, 4, 4, 4] step()'s second output after each step (CORNER):
                                  LCM's `denoised`, TCD's `pred_noised_sample`
    <case>/<steps>/final          the final sample (NHWC)
    noise/img2img, img2img/...    image-to-image as diffusers' LatentConsistencyModelImg2ImgPipeline
    <case>/img2img/{timesteps,    drives the scheduler (set_timesteps(steps, strength=...), the start
      start,final}                add_noise(latents, noise, timesteps[:1]), every step) for FEW_IMG2IMG_CASES

`--few-step-live OUT STEPS...` writes the same records (whole samples, fresh latents and noise per
step count) for other step counts, for the live test to compare in its own process.
"""

import contextlib
import json
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT_NPZ = os.path.join(ROOT, "tests", "fixtures", "schedulers.npz")
OUT_JSON = os.path.join(ROOT, "tests", "fixtures", "schedulers.json")

import diffusers  # noqa: E402
from diffusers.schedulers import (  # noqa: E402
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_euler_ancestral_discrete,
    scheduling_lcm,
    scheduling_tcd,
)

STEPS = (20, 50)
SHAPE_NCHW = (1, 4, 8, 8)
LOOP_STEPS = 10  # below 15: DPM-Solver's lower_order_final and LMS's full order both occur
IMG2IMG_STRENGTH = 0.6
CORNER = (slice(None), slice(0, 4), slice(0, 4), slice(None))  # of an NHWC sample

CONFIGS = {
    # Stable Diffusion 1.x/2.x-base
    "sd": dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    ),
    # DDPM's linear betas, "trailing" spacing (Lin et al. 2023), v-prediction
    "linear_trailing_v": dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0,
    ),
    # SD 2.x's scaled_linear betas, "linspace" spacing, v-prediction
    "linspace_v": dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", timestep_spacing="linspace", steps_offset=0,
    ),
}

# case name -> (diffusers class, extra config fields, diffusers step() kwargs, stochastic);
# diffusion_tf gets the same config fields (+ eta for DDIM's eta, a step() argument in diffusers).
SCHEDULERS = {
    "ddim": ("DDIMScheduler", dict(set_alpha_to_one=False, clip_sample=False), {}, False),
    "ddim-eta1": ("DDIMScheduler", dict(set_alpha_to_one=False, clip_sample=False), {"eta": 1.0}, True),
    "ddpm": ("DDPMScheduler", dict(clip_sample=False), {}, True),
    "pndm": ("PNDMScheduler", dict(set_alpha_to_one=False, skip_prk_steps=True), {}, False),
    "euler": ("EulerDiscreteScheduler", {}, {}, False),
    "euler-karras": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True), {}, False),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, {}, True),
    "heun": ("HeunDiscreteScheduler", {}, {}, False),
    "heun-karras": ("HeunDiscreteScheduler", dict(use_karras_sigmas=True), {}, False),
    "lms": ("LMSDiscreteScheduler", {}, {}, False),
    "lms-karras": ("LMSDiscreteScheduler", dict(use_karras_sigmas=True), {}, False),
    "dpm++2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2), {}, False),
    "dpm++2m-karras": (
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True), {}, False,
    ),
}


def toy_model(x, t):
    """out(x, t) = sqrt(t / 1000) x + 0.2 tanh(0.5 x) (0.3 + t / 1000) + 0.1 sin(x), float32.

    `t` is the float32 timestep. Roughly a denoiser of unit-variance data (eps ~ sqrt(1 - alpha_bar) x)
    plus non-linear terms, so the trajectories stay O(1) for epsilon and v prediction alike.
    """
    t = t.to(torch.float32)
    return torch.sqrt(t / 1000) * x + 0.2 * torch.tanh(0.5 * x) * (0.3 + t / 1000) + 0.1 * torch.sin(x)


def starting_latents(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE_NCHW).astype(np.float32).transpose(0, 2, 3, 1)


def step_noise(steps, seed=1):
    """[steps, 1, 8, 8, 4] standard normal (NHWC)."""
    rng = np.random.default_rng(seed + 1000 * steps)
    return rng.standard_normal((steps,) + SHAPE_NCHW).astype(np.float32).transpose(0, 1, 3, 4, 2)


class _Noise:
    """Stands in for diffusers' randn_tensor: returns the stored draw of the current step."""

    def __init__(self, noise_nhwc):
        self.noise = noise_nhwc
        self.k = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, **kwargs):
        n = torch.from_numpy(np.ascontiguousarray(self.noise[self.k].transpose(0, 3, 1, 2)))
        assert tuple(n.shape) == tuple(shape), (n.shape, shape)
        return n.to(dtype or torch.float32)


def diffusers_scheduler(name, config):
    cls_name, extra, _, _ = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(dict(config, **extra))


@contextlib.contextmanager
def fixed_noise(noise_nhwc):
    """diffusers' randn_tensor replaced by the stored draws (None: left as it is)."""
    patched = _Noise(noise_nhwc) if noise_nhwc is not None else None
    modules = (scheduling_ddim, scheduling_ddpm, scheduling_euler_ancestral_discrete, scheduling_lcm, scheduling_tcd)
    saved = {m: m.randn_tensor for m in modules}
    if patched is not None:
        for m in modules:
            m.randn_tensor = patched
    try:
        yield patched
    finally:
        for m, fn in saved.items():
            m.randn_tensor = fn


def _nchw(x_nhwc):
    return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))


def _nhwc(x):
    return x.numpy().transpose(0, 2, 3, 1)


def run_diffusers(name, config, steps, latents_nhwc, noise_nhwc=None, record=None):
    """diffusers' scheduler loop as in its pipelines -> (timesteps, final sample NHWC); with
    `record` (a list), the sample after every step (NHWC) is appended to it."""
    step_kwargs = SCHEDULERS[name][2]
    sched = diffusers_scheduler(name, config)
    sched.set_timesteps(steps)
    with fixed_noise(noise_nhwc) as patched:
        x = _nchw(latents_nhwc)
        x = x * sched.init_noise_sigma
        for k, t in enumerate(sched.timesteps):
            if patched is not None:
                patched.k = k
            x_in = sched.scale_model_input(x, t)
            out = toy_model(x_in, t)
            x = sched.step(out, t, x, **step_kwargs).prev_sample
            if record is not None:
                record.append(_nhwc(x))
    return sched.timesteps.numpy(), _nhwc(x)


def img2img_begin(steps, strength, order):
    """diffusers' img2img pipeline: the index into `timesteps` where the run starts."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0) * order


def run_diffusers_img2img(name, config, steps, image_nhwc, start_noise_nhwc, noise_nhwc=None):
    """The scheduler as diffusers' img2img pipeline drives it -> (start, renoised, final), NHWC."""
    step_kwargs = SCHEDULERS[name][2]
    sched = diffusers_scheduler(name, config)
    sched.set_timesteps(steps)
    begin = img2img_begin(steps, IMG2IMG_STRENGTH, sched.order)
    timesteps = sched.timesteps[begin:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(begin)
    image, start_noise = _nchw(image_nhwc), _nchw(start_noise_nhwc)
    x = start = sched.add_noise(image, start_noise, timesteps[:1])
    with fixed_noise(noise_nhwc) as patched:
        for k, t in enumerate(timesteps):
            if patched is not None:
                patched.k = k
            x = sched.step(toy_model(sched.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
            if k == 0:
                renoised = sched.add_noise(image, start_noise, timesteps[1:2])
    return _nhwc(start), _nhwc(renoised), _nhwc(x)


def our_config(name, config):
    """The config for diffusion_tf.schedulers.get(name, ...): the same fields (+ eta)."""
    _, extra, step_kwargs, _ = SCHEDULERS[name]
    return dict(config, **extra, **step_kwargs)


def get_name(name):
    return "ddim" if name == "ddim-eta1" else name


def main():
    latents = starting_latents()
    arrays = {"latents": latents}
    for steps in STEPS + (LOOP_STEPS,):
        arrays[f"noise/{steps}"] = step_noise(steps)
    arrays["noise/img2img"] = step_noise(1, seed=2)[0]
    arrays["loop_steps"] = np.int64(LOOP_STEPS)
    arrays["img2img/strength"] = np.float64(IMG2IMG_STRENGTH)
    cases = {}
    for name, (cls_name, _, step_kwargs, stochastic) in SCHEDULERS.items():
        for cfg_name, config in CONFIGS.items():
            case = f"{name}/{cfg_name}"
            cases[case] = {
                "name": get_name(name), "diffusers": cls_name, "config": our_config(name, config),
                "step_kwargs": step_kwargs,
                "stochastic": stochastic,
            }
            for steps in STEPS:
                noise = arrays[f"noise/{steps}"] if stochastic else None
                timesteps, final = run_diffusers(name, config, steps, latents, noise)
                arrays[f"{case}/{steps}/timesteps"] = timesteps
                arrays[f"{case}/{steps}/final"] = final.astype(np.float32)
                print(f"{case:34s} {steps:3d} steps: {len(timesteps):3d} timesteps, "
                      f"|final| max {np.abs(final).max():.3f}")
            noise = arrays[f"noise/{LOOP_STEPS}"] if stochastic else None
            record = []
            timesteps, _ = run_diffusers(name, config, LOOP_STEPS, latents, noise, record)
            arrays[f"{case}/{LOOP_STEPS}/timesteps"] = timesteps
            arrays[f"{case}/{LOOP_STEPS}/trajectory"] = np.stack([x[CORNER] for x in record]).astype(np.float32)
            for key, x in zip(
                ("start", "renoised", "final"),
                run_diffusers_img2img(name, config, LOOP_STEPS, latents, arrays["noise/img2img"], noise),
            ):
                arrays[f"{case}/img2img/{key}"] = x[CORNER].astype(np.float32)
    np.savez_compressed(OUT_NPZ, **arrays)
    with open(OUT_JSON, "w", encoding="utf-8") as f:
        json.dump({"diffusers_version": diffusers.__version__, "steps": list(STEPS), "cases": cases},
                  f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {OUT_NPZ} ({os.path.getsize(OUT_NPZ) / 1e3:.0f} kB) and {OUT_JSON}")


# ---------------------------------------------------------------- few-step samplers (LCM, TCD)
FEW_OUT_NPZ = os.path.join(ROOT, "tests", "fixtures", "schedulers_few_step.npz")
FEW_OUT_JSON = os.path.join(ROOT, "tests", "fixtures", "schedulers_few_step.json")
FEW_STEPS = (2, 4, 8)
FEW_IMG2IMG = {"steps": 4, "strength": 0.6}
FEW_NOISE_SEED = 3
# case -> (diffusers class, CONFIGS entry, extra config fields (both sides), diffusers step() kwargs,
# our extra config fields); TCD's step argument eta is our config field gamma.
_CUSTOM = dict(prediction_type="sample", original_inference_steps=25)
FEW_STEP_CASES = {
    "lcm/sd": ("LCMScheduler", "sd", {}, {}, {}),
    "lcm/linear_trailing_v": ("LCMScheduler", "linear_trailing_v", {}, {}, {}),
    "lcm-custom/sd": ("LCMScheduler", "sd", dict(_CUSTOM, timestep_scaling=5.0), {}, {}),
    "tcd/sd": ("TCDScheduler", "sd", {}, {}, {}),
    "tcd-gamma0/sd": ("TCDScheduler", "sd", {}, {"eta": 0.0}, {"gamma": 0.0}),
    "tcd-gamma0.5/linear_trailing_v": ("TCDScheduler", "linear_trailing_v", {}, {"eta": 0.5}, {"gamma": 0.5}),
    "tcd-gamma1/linspace_v": ("TCDScheduler", "linspace_v", {}, {"eta": 1.0}, {"gamma": 1.0}),
    "tcd-custom/sd": ("TCDScheduler", "sd", _CUSTOM, {}, {}),
}
FEW_IMG2IMG_CASES = ("lcm/sd", "tcd/sd", "tcd-gamma0.5/linear_trailing_v")


def _few_diffusers(case):
    cls_name, config_name, extra, _, _ = FEW_STEP_CASES[case]
    return getattr(diffusers, cls_name).from_config(dict(CONFIGS[config_name], **extra))


def run_few_step(case, steps, latents_nhwc, noise_nhwc, strength=1.0, start_noise_nhwc=None):
    """diffusers' LCM/TCD loop as its pipelines run it (latents * init_noise_sigma, or image-to-image:
    set_timesteps(..., strength), add_noise at timesteps[0]) -> (timesteps, start, samples, second outputs)."""
    step_kwargs = FEW_STEP_CASES[case][3]
    sched = _few_diffusers(case)
    sched.set_timesteps(steps, strength=strength)
    x = _nchw(latents_nhwc)
    if start_noise_nhwc is None:
        x = x * sched.init_noise_sigma
    else:
        x = sched.add_noise(x, _nchw(start_noise_nhwc), sched.timesteps[:1])
    start = _nhwc(x)
    samples, seconds = [], []
    with fixed_noise(noise_nhwc) as patched:
        for k, t in enumerate(sched.timesteps):
            patched.k = k
            out = toy_model(sched.scale_model_input(x, t), t)
            x, second = sched.step(out, t, x, **step_kwargs, return_dict=False)
            samples.append(_nhwc(x))
            seconds.append(_nhwc(second))
    return sched.timesteps.numpy(), start, samples, seconds


def few_step_cases_meta():
    cases = {}
    for case, (cls_name, config_name, extra, step_kwargs, ours) in FEW_STEP_CASES.items():
        stochastic = cls_name == "LCMScheduler" or step_kwargs.get("eta", 0.3) > 0
        cases[case] = {"name": case.split("/")[0].split("-")[0], "diffusers": cls_name,
                       "config": dict(CONFIGS[config_name], **extra, **ours), "step_kwargs": step_kwargs,
                       "stochastic": stochastic}
    return cases


def few_step_records(steps_list, latents, noise_for, corner=True, img2img=None):
    """{name: array} for every case at every step count of `steps_list`; `noise_for(steps)` -> the
    step noise; `img2img`: (steps, strength, start noise) or None."""
    crop = (lambda x: x[CORNER]) if corner else (lambda x: x)
    arrays = {}
    for case in FEW_STEP_CASES:
        for steps in steps_list:
            timesteps, _, samples, seconds = run_few_step(case, steps, latents, noise_for(steps))
            arrays[f"{case}/{steps}/timesteps"] = timesteps
            arrays[f"{case}/{steps}/trajectory"] = np.stack([crop(x) for x in samples]).astype(np.float32)
            arrays[f"{case}/{steps}/denoised"] = np.stack([crop(x) for x in seconds]).astype(np.float32)
            arrays[f"{case}/{steps}/final"] = samples[-1].astype(np.float32)
            print(f"{case:34s} {steps} steps: timesteps {timesteps.tolist()}, |final| max {np.abs(samples[-1]).max():.3f}")
        if img2img is not None and case in FEW_IMG2IMG_CASES:
            steps, strength, start_noise = img2img
            timesteps, start, samples, _ = run_few_step(case, steps, latents, noise_for(steps), strength, start_noise)
            arrays[f"{case}/img2img/timesteps"] = timesteps
            arrays[f"{case}/img2img/start"] = crop(start).astype(np.float32)
            arrays[f"{case}/img2img/final"] = samples[-1].astype(np.float32)
    return arrays


def few_step_main():
    latents = starting_latents()
    arrays = {"latents": latents, "noise/img2img": step_noise(1, seed=FEW_NOISE_SEED + 1)[0]}
    for steps in FEW_STEPS:
        arrays[f"noise/{steps}"] = step_noise(steps, seed=FEW_NOISE_SEED)
    img2img = (FEW_IMG2IMG["steps"], FEW_IMG2IMG["strength"], arrays["noise/img2img"])
    arrays.update(few_step_records(FEW_STEPS, latents, lambda n: arrays[f"noise/{n}"], img2img=img2img))
    np.savez_compressed(FEW_OUT_NPZ, **arrays)
    with open(FEW_OUT_JSON, "w", encoding="utf-8") as f:
        json.dump({"diffusers_version": diffusers.__version__, "steps": list(FEW_STEPS), "img2img": FEW_IMG2IMG,
                   "img2img_cases": list(FEW_IMG2IMG_CASES), "cases": few_step_cases_meta()},
                  f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {FEW_OUT_NPZ} ({os.path.getsize(FEW_OUT_NPZ) / 1e3:.0f} kB) and {FEW_OUT_JSON}")


def few_step_live(out, steps_list):
    """The few-step records at other step counts, whole samples, latents and noise seeded by the
    step count (stored too), for the live test."""
    arrays = {}
    for steps in steps_list:
        latents = starting_latents(seed=100 + steps)
        noise = step_noise(steps, seed=100 + steps)
        arrays[f"latents/{steps}"], arrays[f"noise/{steps}"] = latents, noise
        for key, value in few_step_records([steps], latents, lambda n: noise, corner=False).items():
            arrays[key] = value
    np.savez(out, **arrays)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--few-step"]:
        few_step_main()
    elif sys.argv[1:2] == ["--few-step-live"]:
        few_step_live(sys.argv[2], [int(n) for n in sys.argv[3:]])
    else:
        main()
        few_step_main()
