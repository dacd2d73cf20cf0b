"""PNDM / PLMS: Liu et al., "Pseudo Numerical Methods for Diffusion Models on Manifolds" (2022).

Stable Diffusion's PLMS: the pseudo linear multistep method (eq. 12) with the
Runge-Kutta warm-up skipped (diffusers' `skip_prk_steps=True`, the only mode here).
Its warm-up instead evaluates the model twice around the second timestep
(a pseudo improved-Euler step), so `timesteps` has N + 1 entries for N steps, the
second one repeated, exactly as diffusers'.
"""

import numpy as np
from keras import ops

from diffusion_tf.schedulers.scheduler import Scheduler, as_float


class PNDMScheduler(Scheduler):
    """The state carries the step counter, the last three noise predictions and the
    sample of the first step (as diffusers' `counter`, `ets`, `cur_sample`)."""

    name = "pndm"

    def __init__(
        self,
        set_alpha_to_one=False,
        **config,
    ):
        super().__init__(**config)
        self.set_alpha_to_one = set_alpha_to_one
        self.final_alpha_cumprod = np.float32(1.0 if set_alpha_to_one else self.alphas_cumprod[0])

    @classmethod
    def prediction_types(cls):
        return ("epsilon", "v_prediction")

    def _schedule(self, num_steps):
        t = super()._schedule(num_steps)[0][::-1]  # ascending
        # PLMS timesteps: t_{N-1}, t_{N-2}, t_{N-2}, t_{N-3}, ..., t_0
        timesteps = np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1].astype(np.int64).copy()
        ratio = self.num_train_timesteps // num_steps  # δ, whatever the spacing (as diffusers)
        return timesteps, {
            "t": timesteps.astype(np.int32),
            "t_minus": (timesteps - ratio).astype(np.int32),
            "t_plus": (timesteps + ratio).astype(np.int32),
        }

    def init_state(self, sample):
        z = ops.zeros_like(as_float(sample))
        return (ops.convert_to_tensor(0, "int32"), z, z, z, z)

    def _alpha(self, t):
        """alpha_bar at integer timestep tensor `t`; the final alpha for t < 0."""
        table = ops.convert_to_tensor(
            np.concatenate([self.alphas_cumprod, [self.alphas_cumprod[-1]]]).astype(np.float32)
        )
        a = ops.take(table, ops.clip(t, 0, self.num_train_timesteps))
        return ops.where(t >= 0, a, self.final_alpha_cumprod)

    def step_fn(self, model_output, i, sample, state, noise=None, tables=None):
        t = self.table("t", i, tables)
        return self._plms(
            model_output, sample, state, t, self.table("t_plus", i, tables), self.table("t_minus", i, tables)
        )

    def step(self, model_output, timestep, sample, noise=None):
        """One PLMS step from timestep VALUE `timestep`, as diffusers' `step_plms`: the step
        counter and the noise history live on the object (`counter`), and the transfer runs
        between `timestep` and timestep -/+ num_train_timesteps // num_steps, so a run that
        starts part-way (image-to-image) warms up there exactly as diffusers'. `step_index`
        stays None (diffusers' PNDM has none)."""
        self._require_timesteps()
        sample = as_float(sample)
        if self._state is None:
            self._state = self.init_state(sample)
        t = ops.cast(ops.reshape(ops.convert_to_tensor(timestep), ()), "int32")
        ratio = self.num_train_timesteps // self.num_inference_steps
        prev, self._state = self._plms(model_output, sample, self._state, t, t + ratio, t - ratio)
        return prev

    @property
    def counter(self):
        """diffusers' `counter`: the number of steps run since `set_timesteps`."""
        return 0 if self._state is None else int(self._state[0])

    def _plms(self, model_output, sample, state, t, t_plus, t_minus):
        """One step from the integer timestep tensor `t` (t_plus, t_minus: t -/+ the stride)."""
        model_output, sample = as_float(model_output), as_float(sample)
        counter, e1, e2, e3, cur_sample = state
        second = ops.equal(counter, 1)  # the repeated timestep: the warm-up's corrector
        t_from = ops.where(second, t_plus, t)
        t_to = ops.where(second, t, t_minus)
        # the combined noise prediction (Adams-Bashforth weights of eq. 12 once warm)
        eps = ops.where(
            counter == 0, model_output,
            ops.where(
                second, (model_output + e1) / 2,
                ops.where(
                    counter == 2, (3 * model_output - e1) / 2,
                    ops.where(
                        counter == 3, (23 * model_output - 16 * e1 + 5 * e2) / 12,
                        1 / 24 * (55 * model_output - 59 * e1 + 37 * e2 - 9 * e3),
                    ),
                ),
            ),
        )
        x = ops.where(second, cur_sample, sample)
        prev = self._prev_sample(x, t_from, t_to, eps)
        # history: every model output but the corrector's is kept; step 0's sample for step 1
        new_state = (
            counter + 1,
            ops.where(second, e1, model_output),
            ops.where(second, e2, e1),
            ops.where(second, e3, e2),
            ops.where(counter == 0, sample, cur_sample),
        )
        return prev, new_state

    def _prev_sample(self, sample, t, prev_t, eps):
        """Eq. (9) of the paper: the transfer x_t -> x_{t-δ} along the predicted noise."""
        a_t = self._alpha(t)
        a_prev = self._alpha(prev_t)
        b_t = 1 - a_t
        b_prev = 1 - a_prev
        if self.prediction_type == "v_prediction":
            eps = a_t**0.5 * eps + b_t**0.5 * sample
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return sample_coeff * sample - (a_prev - a_t) * eps / denom
