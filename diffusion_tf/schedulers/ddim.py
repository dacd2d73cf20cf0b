"""DDIM: Song et al., "Denoising Diffusion Implicit Models" (2020), eq. (12)."""

import numpy as np
from keras import ops

from diffusion_tf.schedulers.noise_schedule import predicted_original_and_noise
from diffusion_tf.schedulers.scheduler import Scheduler, as_float


class DDIMScheduler(Scheduler):
    """Deterministic for `eta=0`; `eta=1` is DDPM-like ancestral sampling.

    `set_alpha_to_one=False` (Stable Diffusion) uses alpha_bar_0 as the "previous"
    alpha of the last step; True uses 1.
    """

    name = "ddim"

    def __init__(
        self,
        set_alpha_to_one=False,
        eta=0.0,
        **config,
    ):
        super().__init__(**config)
        _check_eta(eta)
        self.set_alpha_to_one = set_alpha_to_one
        self.eta = eta
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])

    @property
    def stochastic(self):
        return self.eta > 0

    def _schedule(self, num_steps):
        timesteps, _ = super()._schedule(num_steps)
        # previous timestep t - Δ, Δ = num_train_timesteps // num_inference_steps (whatever the spacing)
        prev = timesteps - self.num_train_timesteps // num_steps
        a_t = self.alphas_cumprod[timesteps]
        a_prev = np.where(
            prev >= 0, self.alphas_cumprod[np.maximum(prev, 0)], np.float32(self.final_alpha_cumprod)
        ).astype(np.float32)
        return timesteps, {"alpha_bar": a_t, "alpha_bar_prev": a_prev}

    def step_fn(self, model_output, i, sample, state=(), noise=None, tables=None):
        a_t = self.table("alpha_bar", i, tables)
        a_prev = self.table("alpha_bar_prev", i, tables)
        return self._update(model_output, sample, a_t, a_prev, noise, self.eta), state

    def step(self, model_output, timestep, sample, noise=None, eta=None):
        """x_t -> x_{t-1} from timestep VALUE `timestep` (int or scalar tensor), as diffusers':
        stateless, the previous timestep is t - num_train_timesteps // num_steps, so it also
        works off the schedule. `eta` (diffusers' step argument) overrides the configured one
        for this step; `noise` (standard normal) is then needed when eta > 0."""
        self._require_timesteps()
        if eta is None:
            eta = self.eta
        _check_eta(eta)
        prev_t = ops.cast(timestep, "int32") - self.num_train_timesteps // self.num_inference_steps
        a_t = self.alpha_bar(timestep)
        a_prev = ops.where(
            prev_t >= 0, self.alpha_bar(ops.maximum(prev_t, 0)), self.final_alpha_cumprod
        )
        return self._update(model_output, sample, a_t, a_prev, noise, eta)

    def _update(self, model_output, sample, a_t, a_prev, noise, eta):
        model_output, sample = as_float(model_output), as_float(sample)
        # "predicted x_0" and the noise, from the model's parameterisation
        x0, eps = predicted_original_and_noise(self.prediction_type, model_output, sample, a_t)
        # sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)  (eq. 16)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        sigma = eta * variance**0.5
        # "direction pointing to x_t": sqrt(1 - a_prev - sigma^2) * eps
        direction = (1 - a_prev - sigma**2) ** 0.5 * eps
        # x_{t-1} = sqrt(a_prev) x0 + direction + sigma * z  (eq. 12)
        prev = a_prev**0.5 * x0 + direction
        if eta > 0:
            prev = prev + sigma * self._need_noise(noise)
        return prev


def _check_eta(eta):
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.number)) or not np.isfinite(eta) or eta < 0:
        raise ValueError(f"eta={eta!r}; must be a finite number >= 0.")
