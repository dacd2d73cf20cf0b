"""LCM: multistep consistency sampling, Luo et al., "Latent Consistency Models" (2023), Algorithm 1.

A consistency model f(x_t, t) maps any point of a trajectory to its origin. Sampling with N steps
evaluates it at N timesteps t_0 > ... > t_{N-1} and, between two evaluations, noises the estimate
forward to the next timestep with FRESH noise:

    x0_hat   = the model's estimate of x0 (epsilon, v or sample prediction)
    denoised = c_out(t) x0_hat + c_skip(t) x_t                   (boundary condition, eq. 5)
    x_{next} = sqrt(a_next) denoised + sqrt(1 - a_next) z,  z ~ N(0, I)   (none after the last)

with c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out = s t / sqrt((s t)^2 + sigma_data^2),
sigma_data = 0.5 and s = `timestep_scaling` (10: c_skip ~ 0 already at t = 19, the smallest
timestep of the default schedule). The output of the last step is `denoised` itself.

Timesteps (as diffusers' LCMScheduler): the distillation schedule is `original_inference_steps`
evenly spaced training timesteps k - 1, 2k - 1, ..., with k = num_train_timesteps //
original_inference_steps (19, 39, ..., 999 for 50); N steps take N of them evenly spaced by index
from the top (4 of 50: 999, 759, 499, 259). `timestep_spacing` and `steps_offset` do not enter (as
in diffusers: they are accepted for a config's sake and have no effect). Image-to-image as
diffusers' LatentConsistencyModelImg2ImgPipeline: `set_timesteps(n, strength=s)` keeps the
distillation timesteps below int(original_inference_steps x s) and takes n steps from those.
"""

import math

import numpy as np

from diffusion_tf.schedulers import noise_schedule as schedule
from diffusion_tf.schedulers.scheduler import Scheduler

SIGMA_DATA = 0.5


def check_original_inference_steps(value, num_train_timesteps):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= num_train_timesteps:
        raise ValueError(
            f"original_inference_steps={value!r}; must be an integer between 1 and num_train_timesteps="
            f"{num_train_timesteps} (the length of the schedule the model was distilled on; 50 for LCM).")


def check_strength(strength):
    if (isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer))
            or not math.isfinite(float(strength)) or not 0 < strength <= 1):
        raise ValueError(f"strength={strength!r}; must be a number in (0, 1] (the part of the schedule that runs).")


def consistency_timesteps(num_steps, num_train_timesteps, original_steps, strength=1.0):
    """The N descending timesteps of LCM and TCD (int64), as diffusers' `set_timesteps`: the
    distillation schedule (k - 1, 2k - 1, ... below int(original_steps x strength) x k), then N
    of its entries evenly spaced by index from the top (floor of linspace(0, len, N, endpoint=False))."""
    schedule._check_positive_int("num_steps", num_steps)
    check_original_inference_steps(original_steps, num_train_timesteps)
    check_strength(strength)
    if num_steps > original_steps:
        raise ValueError(
            f"num_steps={num_steps} exceeds original_inference_steps={original_steps}: the steps are a subset of "
            f"the {original_steps}-step distillation schedule; use at most {original_steps} steps (or a config "
            "with a larger original_inference_steps).")
    k = num_train_timesteps // original_steps
    kept = int(original_steps * strength)  # Python float product, as diffusers
    if kept < num_steps:
        raise ValueError(
            f"strength={strength!r} keeps int({original_steps} x {strength!r}) = {kept} of the original_inference_steps="
            f"{original_steps} distillation timesteps, fewer than num_steps={num_steps}; use a strength of at least "
            f"{num_steps / original_steps:g} or at most {kept} steps.")
    origin = (np.arange(1, kept + 1) * k - 1)[::-1]
    indices = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return origin[indices].astype(np.int64).copy()


class ConsistencyScheduler(Scheduler):
    """What LCM and TCD share: their timesteps (`consistency_timesteps`), `strength` in
    `set_timesteps`, and diffusers' index tracking (`step_index`: the step after `timestep`
    is the next entry of `timesteps`, whatever its value). Stochastic: every step but the
    last takes standard-normal `noise`."""

    def __init__(self, original_inference_steps=50, **config):
        super().__init__(**config)
        check_original_inference_steps(original_inference_steps, self.num_train_timesteps)
        self.original_inference_steps = int(original_inference_steps)
        self.strength = 1.0

    @property
    def stochastic(self):
        return True

    def set_timesteps(self, num_steps, strength=1.0):
        """`num_steps` timesteps (NumPy int64) and the tables. `strength` < 1 (image-to-image, as
        diffusers' LatentConsistencyModelImg2ImgPipeline): the steps are taken from the distillation
        timesteps below int(original_inference_steps x strength); all `num_steps` of them run
        (start the loop at index 0 from `add_noise(image, noise, timesteps[:1])`)."""
        check_strength(strength)
        self.strength = float(strength)
        return super().set_timesteps(num_steps)

    def _timesteps(self, num_steps):
        return consistency_timesteps(num_steps, self.num_train_timesteps, self.original_inference_steps,
                                     self.strength)

    def _is_last(self, i, tables=None):
        """Whether `i` is a Python index of the last step (no noise is drawn there); a tensor
        index (inside a loop) is not known to be."""
        if not isinstance(i, (int, np.integer)):
            return False
        self._require_timesteps()
        return int(i) == int((self.tables if tables is None else tables)["model_timesteps"].shape[0]) - 1

    def _step_noise(self, noise, i, tables):
        """The fresh noise of step i, standard normal; None is allowed at a Python index of the
        last step (diffusers draws none there). Inside a loop every step gets noise, and the
        last one's coefficient is 0."""
        if noise is None and self._is_last(i, tables):
            return None
        return self._need_noise(noise)


class LCMScheduler(ConsistencyScheduler):
    """diffusers' LCMScheduler. `original_inference_steps` (50): the distillation schedule's
    length; `timestep_scaling` (10): s of the boundary condition c_skip, c_out (see the module).
    `set_alpha_to_one` has no effect here (the step after the last is never taken), so it is not
    a field. Any UNet runs with it (as in diffusers): it is made for LCM-distilled UNets and
    LCM-LoRA; on other models few steps give blurred images, which is the user's choice.

    The object API's `step(..., return_denoised=True)` also returns the boundary-condition
    output `denoised` (diffusers' `LCMSchedulerOutput.denoised`); after the last step it is the
    sample itself."""

    name = "lcm"

    def __init__(self, original_inference_steps=50, timestep_scaling=10.0, **config):
        super().__init__(original_inference_steps=original_inference_steps, **config)
        if (isinstance(timestep_scaling, bool) or not isinstance(timestep_scaling, (int, float, np.number))
                or not math.isfinite(float(timestep_scaling)) or timestep_scaling <= 0):
            raise ValueError(f"timestep_scaling={timestep_scaling!r}; must be a finite number > 0 (LCM's is 10).")
        self.timestep_scaling = float(timestep_scaling)

    def _schedule(self, num_steps):
        timesteps = self._timesteps(num_steps)
        ac = self.alphas_cumprod
        one = np.float32(1)
        a_t = ac[timesteps]
        # after the last step the sample is `denoised` itself: "previous" alpha 1, no noise
        a_next = np.concatenate([ac[timesteps[1:]], [one]]).astype(np.float32)
        scaled = timesteps.astype(np.float32) * np.float32(self.timestep_scaling)
        s2 = np.float32(SIGMA_DATA**2)
        return timesteps, {
            "sqrt_alpha_bar": np.sqrt(a_t), "sqrt_one_minus_alpha_bar": np.sqrt(one - a_t),
            "c_skip": s2 / (scaled * scaled + s2), "c_out": scaled / np.sqrt(scaled * scaled + s2),
            "next_x0": np.sqrt(a_next), "next_noise": np.sqrt(one - a_next),
        }

    def denoised_fn(self, model_output, i, sample, tables=None):
        """The boundary-condition output at index i: c_out x0_hat + c_skip x_t (diffusers' order)."""
        x0, _, sample = self._original_and_noise_at(model_output, i, sample, tables)
        return self.table("c_out", i, tables) * x0 + self.table("c_skip", i, tables) * sample

    def _renoise(self, denoised, i, noise, tables):
        noise = self._step_noise(noise, i, tables)
        if noise is None:  # the last step, eagerly
            return denoised
        # at the last index next_x0 = 1 and next_noise = 0: exactly `denoised`
        return self.table("next_x0", i, tables) * denoised + self.table("next_noise", i, tables) * noise

    def step_fn(self, model_output, i, sample, state=(), noise=None, tables=None):
        return self._renoise(self.denoised_fn(model_output, i, sample, tables), i, noise, tables), state

    def step(self, model_output, timestep, sample, noise=None, return_denoised=False):
        """One step from timestep VALUE `timestep` (index-tracking, as diffusers) -> the next
        sample, or (next sample, denoised) with `return_denoised`. `noise`: standard normal,
        needed at every step but the last."""
        i = self._current_index(timestep)
        denoised = self.denoised_fn(model_output, i, sample)
        prev = self._renoise(denoised, i, noise, None)
        self._step_index = i + 1
        return (prev, denoised) if return_denoised else prev
