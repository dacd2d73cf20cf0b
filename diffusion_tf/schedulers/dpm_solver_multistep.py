"""DPM-Solver++(2M): Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models" (2022), Algorithm 2 (multistep, data prediction).

With lambda = log(alpha_t / sigma_t) and h = lambda_{i+1} - lambda_i:
  first order (DDIM):  x_{i+1} = sigma_{i+1}/sigma_i x_i - alpha_{i+1} (e^{-h} - 1) x0_i
  second order:        ... - 1/2 alpha_{i+1} (e^{-h} - 1) D1,  D1 = (x0_i - x0_{i-1}) / r,
                       r = h_{i-1} / h_i   ("midpoint"; "heun" weighs D1 differently).
"""

import numpy as np
from keras import ops

from diffusion_tf.schedulers import noise_schedule as schedule
from diffusion_tf.schedulers.scheduler import Scheduler, _gather, _per_sample, as_float

SOLVER_TYPES = ("midpoint", "heun")


def dpm_timesteps(num_steps, num_train_timesteps, spacing, steps_offset, last_timestep):
    """DPM-Solver's own spacing (N + 1 points with the final 0 dropped for linspace/leading)."""
    schedule._check("timestep_spacing", spacing, schedule.TIMESTEP_SPACINGS)
    schedule._check_positive_int("num_steps", num_steps)
    if num_steps > num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} exceeds the {num_train_timesteps} training timesteps.")
    if spacing == "linspace":
        t = np.linspace(0, last_timestep - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = last_timestep // (num_steps + 1)
        t = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1] + steps_offset
    else:
        t = np.arange(last_timestep, 0, -num_train_timesteps / num_steps).round() - 1
    return t.astype(np.int64).copy()


class DPMSolverMultistepScheduler(Scheduler):
    """Deterministic; the state carries the previous data prediction x0 and whether there is one.

    Only `algorithm_type="dpmsolver++"` with `solver_order` 1 or 2. `lower_order_final`:
    first order for the last step below 15 steps (and always when the final sigma is
    zero, as diffusers); `final_sigmas_type` "zero" (default) or "sigma_min".
    """

    name = "dpm++2m"

    def __init__(
        self,
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"),
        **config,
    ):
        super().__init__(**config)
        schedule._check("algorithm_type", algorithm_type, ("dpmsolver++",))
        schedule._check("solver_order", solver_order, (1, 2))
        schedule._check("solver_type", solver_type, SOLVER_TYPES)
        schedule._check("final_sigmas_type", final_sigmas_type, schedule.FINAL_SIGMAS_TYPES)
        self.solver_order = solver_order
        self.algorithm_type = algorithm_type
        self.solver_type = solver_type
        self.lower_order_final = bool(lower_order_final)
        self.euler_at_final = bool(euler_at_final)
        self.use_karras_sigmas = bool(use_karras_sigmas)
        self.final_sigmas_type = final_sigmas_type
        self.lambda_min_clipped = lambda_min_clipped
        if self.use_karras_sigmas:
            self.name = f"{type(self).name}-karras"
        self.train_sigmas = schedule.train_sigmas(self.alphas_cumprod)

    def _schedule(self, num_steps):
        ac = self.alphas_cumprod
        lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
        clipped = np.searchsorted(lambda_t[::-1], self.lambda_min_clipped)
        last_timestep = self.num_train_timesteps - int(clipped)
        timesteps = dpm_timesteps(
            num_steps, self.num_train_timesteps, self.timestep_spacing, self.steps_offset, last_timestep
        )
        sigmas = self.train_sigmas
        if self.use_karras_sigmas:
            k = schedule.karras_sigmas(sigmas[0], sigmas[-1], num_steps)
            timesteps = schedule.sigma_to_t(k, np.log(sigmas))
            if self.beta_schedule not in ("squaredcos_cap_v2", "cosine"):
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
            sigmas = k
        else:
            sigmas = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
        last = schedule.final_sigma(self.final_sigmas_type, ac)
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return timesteps, self._coefficients(sigmas, len(timesteps))

    def _coefficients(self, sigmas, n):
        """Per-step scalars of the updates, float32 in the reference's order of operations."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            alpha, sigma = schedule.sigma_to_alpha_sigma_t(sigmas)
            lam = np.log(alpha) - np.log(sigma)  # +inf at sigma = 0
            k = np.arange(n)
            s1 = np.maximum(k - 1, 0)
            h = lam[k + 1] - lam[k]
            h0 = lam[k] - lam[s1]
            r0 = h0 / h
            em1 = np.exp(-h) - np.float32(1)
            a = sigma[k + 1] / sigma[k]  # x_i's weight
            b = alpha[k + 1] * em1  # x0_i's weight (subtracted)
            if self.solver_type == "midpoint":
                c = np.float32(0.5) * b
            else:
                c = -(alpha[k + 1] * (em1 / h + np.float32(1)))
            d1_scale = np.float32(1) / r0
        last = k == n - 1
        first = np.zeros(n, dtype=bool)
        if self.solver_order == 1:
            first[:] = True
        first |= last & (
            self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
        )
        first[0] = True
        finite = lambda x: np.where(np.isfinite(x), x, 0).astype(np.float32)  # noqa: E731
        return {
            "sigma": sigmas[:-1],
            "alpha_t": alpha[:-1].astype(np.float32),
            "sigma_t": sigma[:-1].astype(np.float32),
            "a": finite(a), "b": finite(b), "c": finite(np.where(first, 0, c)),
            "d1_scale": finite(np.where(first, 0, d1_scale)),
            "first_order": first.astype(np.float32),
        }

    def init_state(self, sample):
        return (ops.zeros_like(as_float(sample)), ops.convert_to_tensor(0.0, "float32"))

    def _x0(self, model_output, sample, i, tables):
        if self.prediction_type == "sample":
            return model_output
        alpha_t, sigma_t = self.table("alpha_t", i, tables), self.table("sigma_t", i, tables)
        if self.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output

    def step_fn(self, model_output, i, sample, state, noise=None, tables=None):
        model_output, sample = as_float(model_output), as_float(sample)
        prev_x0, have_prev = state
        x0 = self._x0(model_output, sample, i, tables)
        a, b = self.table("a", i, tables), self.table("b", i, tables)
        first_order = a * sample - b * x0
        d1 = self.table("d1_scale", i, tables) * (x0 - prev_x0)
        second_order = a * sample - b * x0 - self.table("c", i, tables) * d1
        use_first = ops.logical_or(self.table("first_order", i, tables) > 0.5, have_prev < 0.5)
        prev = ops.where(use_first, first_order, second_order)
        return prev, (x0, ops.convert_to_tensor(1.0, "float32"))

    def add_noise(self, original, noise, timesteps):
        """alpha_t x0 + sigma_t noise at the step index of each timestep VALUE (scalar or [B]),
        picked as diffusers does (see `Scheduler._add_noise_indices`). Eager: the look-up is NumPy.

        A timestep that is not in `timesteps` is a ValueError (diffusers silently takes the
        last index for it)."""
        original, noise = as_float(original), as_float(noise)
        indices, scalar = self._add_noise_indices(timesteps)
        alpha_t = _per_sample(_gather(self.tables["alpha_t"], indices, scalar), original)
        sigma_t = _per_sample(_gather(self.tables["sigma_t"], indices, scalar), original)
        return alpha_t * original + sigma_t * noise
