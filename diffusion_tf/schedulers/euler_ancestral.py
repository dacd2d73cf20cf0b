"""Euler ancestral (k-diffusion's `sample_euler_ancestral`): an Euler step down to
sigma_down, then fresh noise of standard deviation sigma_up, where
sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 and
sigma_down^2 = sigma_next^2 - sigma_up^2 (the DDPM posterior, eq. 7 of Ho et al., in sigma form)."""

import numpy as np

from diffusion_tf.schedulers.scheduler import SigmaScheduler, as_float, reject_integer_timestep


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Stochastic: every step needs standard-normal `noise`."""

    name = "euler_a"

    @property
    def stochastic(self):
        return True

    def _schedule(self, num_steps):
        timesteps, sigmas = self._sigma_schedule(num_steps)
        s_from, s_to = sigmas[:-1], sigmas[1:]
        sigma_up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        sigma_down = np.sqrt(s_to**2 - sigma_up**2)
        tables = self._input_tables(s_from)
        tables["dt"] = (sigma_down - s_from).astype(np.float32)
        tables["sigma_up"] = sigma_up.astype(np.float32)
        return timesteps, tables

    def step_fn(self, model_output, i, sample, state=(), noise=None, tables=None):
        model_output, sample = as_float(model_output), as_float(sample)
        x0 = self._x0(model_output, sample, i, tables)
        derivative = (sample - x0) / self.table("sigma", i, tables)
        prev = sample + derivative * self.table("dt", i, tables)
        return prev + self._need_noise(noise) * self.table("sigma_up", i, tables), state

    def step(self, model_output, timestep, sample, noise=None):
        reject_integer_timestep(self, timestep)
        return super().step(model_output, timestep, sample, noise)
