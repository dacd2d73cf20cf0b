"""Heun: Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models"
(2022), Algorithm 1: an Euler step, then a correction with the average of the slopes
at both ends (trapezoidal rule); the step down to sigma = 0 stays a plain Euler step.

Two model evaluations per step, so for N steps `timesteps` has 2N - 1 entries
(t_0, t_1, t_1, t_2, t_2, ..., t_{N-1}, t_{N-1}), exactly as diffusers'.
"""

import numpy as np
from keras import ops

from diffusion_tf.schedulers.scheduler import SigmaScheduler, as_float


class HeunDiscreteScheduler(SigmaScheduler):
    """The state carries the first-order slope, the sample it started from and a flag
    saying the next call is the correction (diffusers' `prev_derivative`, `sample`, `dt`)."""

    name = "heun"
    karras = True
    order = 2  # `step` runs once per entry of `timesteps`: predictor, then corrector

    def _schedule(self, num_steps):
        timesteps, sigmas = self._sigma_schedule(num_steps)
        # every sigma but the first and the last twice: [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0]
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)]).astype(np.float32)
        # At index k the model sees sigmas[k] in both phases: the predictor's sigma, or the
        # corrector's end point. Predictor: dt = sigmas[k+1] - sigmas[k]; corrector at k: the
        # predictor's dt of index k - 1.
        tables = self._input_tables(sigmas[:-1])
        tables["dt"] = sigmas[1:] - sigmas[:-1]
        tables["dt_prev"] = np.concatenate([[np.float32(0)], tables["dt"][:-1]]).astype(np.float32)
        return timesteps, tables

    def init_state(self, sample):
        z = ops.zeros_like(as_float(sample))
        return (z, z, ops.convert_to_tensor(0.0, "float32"))

    def step_fn(self, model_output, i, sample, state, noise=None, tables=None):
        model_output, sample = as_float(model_output), as_float(sample)
        prev_derivative, prev_sample, correcting = state
        x0 = self._x0(model_output, sample, i, tables)
        derivative = (sample - x0) / self.table("sigma", i, tables)
        # predictor (Euler): x + d * (sigma_next - sigma)
        euler = sample + derivative * self.table("dt", i, tables)
        # corrector: x_prev + (d_prev + d) / 2 * dt_prev
        heun = prev_sample + (prev_derivative + derivative) / 2 * self.table("dt_prev", i, tables)
        correct = correcting > 0.5
        new_state = (
            ops.where(correct, prev_derivative, derivative),
            ops.where(correct, prev_sample, sample),
            ops.where(correct, 0.0, 1.0),
        )
        return ops.where(correct, heun, euler), new_state
