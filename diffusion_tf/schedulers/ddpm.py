"""DDPM: Ho et al., "Denoising Diffusion Probabilistic Models" (2020), ancestral sampling.

With fewer inference steps than training steps the "previous" timestep is the next
one of the schedule and beta is the effective one between them (as diffusers).
"""

import numpy as np

from diffusion_tf.schedulers.scheduler import Scheduler

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


class DDPMScheduler(Scheduler):
    """Stochastic: every step adds `sqrt(variance) * noise` (none at t = 0).

    variance_type: "fixed_small" (posterior variance, eq. 7: beta~_t), "fixed_small_log"
    (the same through exp(log)), "fixed_large" (beta_t).
    """

    name = "ddpm"

    def __init__(
        self,
        variance_type="fixed_small",
        **config,
    ):
        super().__init__(**config)
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"variance_type={variance_type!r}; allowed: {', '.join(map(repr, VARIANCE_TYPES))}."
            )
        self.variance_type = variance_type

    @property
    def stochastic(self):
        return True

    def _schedule(self, num_steps):
        timesteps, _ = super()._schedule(num_steps)
        one = np.float32(1)
        a_t = self.alphas_cumprod[timesteps]
        # the previous timestep is the next one of the schedule; after the last: alpha_bar = 1
        a_prev = np.concatenate([self.alphas_cumprod[timesteps[1:]], [one]]).astype(np.float32)
        beta_prod_t = one - a_t
        beta_prod_prev = one - a_prev
        current_alpha = a_t / a_prev
        current_beta = one - current_alpha
        # eq. (7): mu~ = sqrt(a_prev) beta_t / (1 - a_t) x0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t
        x0_coeff = np.sqrt(a_prev) * current_beta / beta_prod_t
        sample_coeff = np.sqrt(current_alpha) * beta_prod_prev / beta_prod_t
        variance = np.maximum(beta_prod_prev / beta_prod_t * current_beta, np.float32(1e-20))
        if self.variance_type == "fixed_small":
            std = np.sqrt(variance)
        elif self.variance_type == "fixed_small_log":
            std = np.exp(np.float32(0.5) * np.log(variance))
        else:
            std = np.sqrt(current_beta)
        std = np.where(timesteps > 0, std, np.float32(0)).astype(np.float32)
        return timesteps, {
            "sqrt_alpha_bar": np.sqrt(a_t), "sqrt_one_minus_alpha_bar": np.sqrt(beta_prod_t),
            "x0_coeff": x0_coeff, "sample_coeff": sample_coeff, "std": std,
        }

    def step_fn(self, model_output, i, sample, state=(), noise=None, tables=None):
        x0, _, sample = self._original_and_noise_at(model_output, i, sample, tables)
        prev = self.table("x0_coeff", i, tables) * x0 + self.table("sample_coeff", i, tables) * sample
        return prev + self.table("std", i, tables) * self._need_noise(noise), state

    def step(self, model_output, timestep, sample, noise=None):
        """x_t -> the sample at the next timestep of the schedule, from timestep VALUE `timestep`.
        Stateless, as diffusers': every call looks `timestep` up (its first occurrence) in
        `timesteps`, so `step_index` stays None. `noise`: standard normal (unused at t = 0)."""
        i = int(self._hits(timestep)[0])
        return self.step_fn(model_output, i, sample, (), noise)[0]
