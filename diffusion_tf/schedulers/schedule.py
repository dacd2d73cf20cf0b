"""Noise-schedule maths shared by every scheduler (written once, in NumPy, float32 like the reference)."""

import math

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {', '.join(map(repr, allowed))}.")


def make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps):
    """beta_t for t = 0 .. num_train_timesteps - 1, float32.

    linear: evenly spaced betas (DDPM); scaled_linear: evenly spaced sqrt(betas)
    (latent diffusion / Stable Diffusion); squaredcos_cap_v2 = cosine: the
    improved-DDPM cosine alpha_bar, betas capped at 0.999.
    """
    _check("beta_schedule", beta_schedule, BETA_SCHEDULES)
    _check_positive_int("num_train_timesteps", num_train_timesteps, minimum=2)
    n = num_train_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float32)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float32) ** 2
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def alphas_cumprod(betas):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float32."""
    return np.cumprod(1.0 - betas, dtype=np.float32)


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}; must be an integer >= {minimum}.")


def spaced_timesteps(num_steps, num_train_timesteps, spacing, steps_offset=0):
    """The descending inference timesteps (Table 2 of Lin et al. 2023, as diffusers)."""
    _check("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    _check_positive_int("num_steps", num_steps)
    if num_steps > num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} exceeds the {num_train_timesteps} training timesteps."
        )
    n = num_train_timesteps
    if spacing == "linspace":
        t = np.linspace(0, n - 1, num_steps).round()[::-1]
    elif spacing == "leading":
        t = (np.arange(num_steps) * (n // num_steps)).round()[::-1] + steps_offset
    else:
        t = np.round(np.arange(n, 0, -n / num_steps)) - 1
    return t.astype(np.int64).copy()


def predicted_original_and_noise(prediction_type, model_output, sample, alpha_bar):
    """(x0, eps) from the model output, for epsilon, v or sample prediction.

    x_t = sqrt(a) x0 + sqrt(1 - a) eps  and  v = sqrt(a) eps - sqrt(1 - a) x0.
    """
    sqrt_a, sqrt_1ma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_1ma * eps) / sqrt_a
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * sample
    else:
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_1ma
    return x0, eps
