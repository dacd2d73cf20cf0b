"""Euler: Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models"
(2022), Algorithm 2 without churn: dx/dsigma = (x - D(x; sigma)) / sigma, one Euler step."""

from diffusion_tf.schedulers import noise_schedule as schedule
from diffusion_tf.schedulers.scheduler import SigmaScheduler, as_float, reject_integer_timestep


class EulerDiscreteScheduler(SigmaScheduler):
    """Deterministic first-order sampler on the sigma schedule (optionally Karras sigmas).

    `final_sigmas_type`: the noise level after the last step, "zero" or "sigma_min".
    """

    name = "euler"
    karras = True

    def __init__(
        self,
        use_karras_sigmas=False,
        final_sigmas_type="zero",
        **config,
    ):
        super().__init__(use_karras_sigmas=use_karras_sigmas, **config)
        schedule._check("final_sigmas_type", final_sigmas_type, schedule.FINAL_SIGMAS_TYPES)
        self.final_sigmas_type = final_sigmas_type

    def _schedule(self, num_steps):
        timesteps, sigmas = self._sigma_schedule(num_steps, self.final_sigmas_type)
        tables = self._input_tables(sigmas[:-1])
        tables["dt"] = sigmas[1:] - sigmas[:-1]  # sigma_{i+1} - sigma_i
        return timesteps, tables

    def step_fn(self, model_output, i, sample, state=(), noise=None, tables=None):
        model_output, sample = as_float(model_output), as_float(sample)
        x0 = self._x0(model_output, sample, i, tables)
        derivative = (sample - x0) / self.table("sigma", i, tables)
        return sample + derivative * self.table("dt", i, tables), state

    def step(self, model_output, timestep, sample, noise=None):
        reject_integer_timestep(self, timestep)
        return super().step(model_output, timestep, sample, noise)
