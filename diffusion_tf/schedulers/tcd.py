"""TCD: Zheng et al., "Trajectory Consistency Distillation" (2024), strategic stochastic sampling (eq. 9).

The timesteps are LCM's (`lcm.consistency_timesteps`). At step t -> t' (the next timestep; 0 after
the last) the model's x0 and noise estimates are combined at the intermediate timestep
s = floor((1 - gamma) t'):

    x_s   = sqrt(a_s) x0_hat + sqrt(1 - a_s) eps_hat                ("pred_noised_sample")
    x_t'  = sqrt(a_t' / a_s) x_s + sqrt(1 - a_t' / a_s) z,  z ~ N(0, I)   (forward from s to t')

gamma = 0 is deterministic (s = t': a DDIM step between the timesteps), gamma = 1 goes through
x0 (s = 0) and is as stochastic as LCM; 0.3 is the authors' default. After the last step no noise
is added: the output is x_s with s = floor((1 - gamma) x 0) = 0, i.e. noised to training timestep 0.

`gamma` is diffusers' `TCDScheduler.step(..., eta=0.3)` argument; here it is a config field, and
`step(..., eta=...)` overrides it for one step, as diffusers' argument does.
"""

import math

import numpy as np

from diffusion_tf.schedulers.lcm import ConsistencyScheduler


def check_gamma(gamma, name="gamma"):
    if (isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.floating, np.integer))
            or not math.isfinite(float(gamma)) or not 0 <= gamma <= 1):
        raise ValueError(
            f"{name}={gamma!r}; must be a number in [0, 1] (TCD's stochasticity: 0 deterministic, 1 as LCM; "
            "default 0.3).")


class TCDScheduler(ConsistencyScheduler):
    """diffusers' TCDScheduler. `original_inference_steps` (50) as LCM's; `gamma` in [0, 1]
    (default 0.3): stochastic when above 0. `set_alpha_to_one` and `timestep_scaling` have no
    effect on TCD (as in diffusers), so they are not fields. A config's `eta` (diffusers' step
    argument's name) is taken as `gamma` when `gamma` is not given.

    The object API's `step(..., return_pred_noised=True)` also returns x_s (diffusers'
    `TCDSchedulerOutput.pred_noised_sample`)."""

    name = "tcd"

    def __init__(self, original_inference_steps=50, gamma=0.3, **config):
        super().__init__(original_inference_steps=original_inference_steps, **config)
        check_gamma(gamma)
        self.gamma = float(gamma)

    @classmethod
    def from_config(cls, config, **overrides):
        config = dict(config, **overrides)
        if "eta" in config and "gamma" not in config:
            config["gamma"] = config["eta"]
        return super().from_config(config)

    @property
    def stochastic(self):
        return self.gamma > 0

    def _schedule(self, num_steps):
        timesteps = self._timesteps(num_steps)
        return timesteps, self._tables(timesteps, self.gamma)

    def _tables(self, timesteps, gamma):
        ac = self.alphas_cumprod
        one = np.float32(1)
        nxt = np.concatenate([timesteps[1:], [0]]).astype(np.int64)
        # s = floor((1 - gamma) t') in float32, as torch computes it from the long timestep
        s = np.floor(np.float32(1.0 - gamma) * nxt.astype(np.float32)).astype(np.int64)
        a_t, a_next, a_s = ac[timesteps], ac[nxt], ac[s]
        ratio = a_next / a_s
        # the last step, and every step with gamma = 0, is x_s itself
        fresh = (np.arange(len(timesteps)) < len(timesteps) - 1) & (gamma > 0)
        return {
            "sqrt_alpha_bar": np.sqrt(a_t), "sqrt_one_minus_alpha_bar": np.sqrt(one - a_t),
            "sqrt_alpha_s": np.sqrt(a_s), "sqrt_one_minus_alpha_s": np.sqrt(one - a_s),
            "keep": np.where(fresh, np.sqrt(ratio), one).astype(np.float32),
            "fresh": np.where(fresh, np.sqrt(one - ratio), np.float32(0)).astype(np.float32),
            "s": s.astype(np.float32),
            "model_timesteps": timesteps.astype(np.float32),
        }

    def pred_noised_fn(self, model_output, i, sample, tables=None):
        """x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s) eps_hat at index i (diffusers' arithmetic order)."""
        x0, eps, _ = self._original_and_noise_at(model_output, i, sample, tables)
        return self.table("sqrt_alpha_s", i, tables) * x0 + self.table("sqrt_one_minus_alpha_s", i, tables) * eps

    def _renoise(self, pred_noised, i, noise, tables, gamma):
        if gamma == 0:
            return pred_noised
        noise = self._step_noise(noise, i, tables)
        if noise is None:  # the last step, eagerly
            return pred_noised
        # at the last index keep = 1 and fresh = 0: exactly x_s
        return self.table("keep", i, tables) * pred_noised + self.table("fresh", i, tables) * noise

    def step_fn(self, model_output, i, sample, state=(), noise=None, tables=None):
        pred_noised = self.pred_noised_fn(model_output, i, sample, tables)
        return self._renoise(pred_noised, i, noise, tables, self.gamma), state

    def step(self, model_output, timestep, sample, noise=None, eta=None, return_pred_noised=False):
        """One step from timestep VALUE `timestep` (index-tracking, as diffusers) -> the next
        sample, or (next sample, x_s) with `return_pred_noised`. `eta` (diffusers' argument):
        gamma for this step (default: the configured one). `noise`: standard normal, needed at
        every step but the last when gamma > 0."""
        gamma = self.gamma if eta is None else eta
        check_gamma(gamma, "eta")
        i = self._current_index(timestep)
        tables = None if gamma == self.gamma else self._tables(self.timesteps, gamma)
        pred_noised = self.pred_noised_fn(model_output, i, sample, tables)
        prev = self._renoise(pred_noised, i, noise, tables, gamma)
        self._step_index = i + 1
        return (prev, pred_noised) if return_pred_noised else prev
