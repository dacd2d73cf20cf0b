"""Noise-schedule maths shared by every scheduler, in NumPy, float32 like the reference.

Everything that depends only on the configuration and the number of steps is
computed here, once per `set_timesteps`; the per-step tensor work lives in the
schedulers' `step_fn`.
"""

import math

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {', '.join(map(repr, allowed))}.")


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}; must be an integer >= {minimum}.")


def _linspace_f32(start, end, n):
    """float32 `linspace` rounded as PyTorch's CPU kernel does (a fused multiply-add from
    whichever end is nearer), so the betas are bit-identical to the reference's."""
    start, end = np.float32(start), np.float32(end)
    step = np.float64((end - start) / np.float32(n - 1)) if n > 1 else 0.0
    i = np.arange(n, dtype=np.float64)
    from_start = np.float64(start) + i * step
    from_end = np.float64(end) - (n - 1 - i) * step
    return np.where(np.arange(n) < n // 2, from_start, from_end).astype(np.float32)


def make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps):
    """beta_t for t = 0 .. num_train_timesteps - 1, float32.

    linear: evenly spaced betas (DDPM); scaled_linear: evenly spaced sqrt(betas)
    (latent diffusion / Stable Diffusion); squaredcos_cap_v2 = cosine: the
    improved-DDPM cosine alpha_bar (Nichol & Dhariwal 2021, eq. 17), betas capped at 0.999.
    """
    _check("beta_schedule", beta_schedule, BETA_SCHEDULES)
    _check_positive_int("num_train_timesteps", num_train_timesteps, minimum=2)
    n = num_train_timesteps
    if beta_schedule == "linear":
        return _linspace_f32(beta_start, beta_end, n)
    if beta_schedule == "scaled_linear":
        return _linspace_f32(beta_start**0.5, beta_end**0.5, n) ** 2
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def alphas_cumprod(betas):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), accumulated in float64 (as PyTorch), float32."""
    return np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32)


def spaced_timesteps(num_steps, num_train_timesteps, spacing, steps_offset=0, exact_linspace=False):
    """The descending inference timesteps (Table 2 of Lin et al. 2023, as diffusers).

    Integers (int64), except with `exact_linspace`: the sigma schedulers' float32
    timesteps, where "linspace" is not rounded.
    """
    _check("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    _check_positive_int("num_steps", num_steps)
    if num_steps > num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} exceeds the {num_train_timesteps} training timesteps."
        )
    n = num_train_timesteps
    if spacing == "linspace":
        if exact_linspace:
            return np.linspace(0, n - 1, num_steps, dtype=np.float32)[::-1].copy()
        t = np.linspace(0, n - 1, num_steps).round()[::-1]
    elif spacing == "leading":
        t = (np.arange(num_steps) * (n // num_steps)).round()[::-1] + steps_offset
    else:
        t = np.round(np.arange(n, 0, -n / num_steps)) - 1
    return t.astype(np.float32 if exact_linspace else np.int64).copy()


def predicted_original_and_noise(prediction_type, model_output, sample, alpha_bar):
    """(x0, eps) from the model output, for epsilon, v or sample prediction.

    x_t = sqrt(a) x0 + sqrt(1 - a) eps  and  v = sqrt(a) eps - sqrt(1 - a) x0.
    """
    return original_and_noise_from_roots(prediction_type, model_output, sample, alpha_bar**0.5,
                                         (1 - alpha_bar) ** 0.5)


def original_and_noise_from_roots(prediction_type, model_output, sample, sqrt_a, sqrt_1ma):
    """`predicted_original_and_noise` given sqrt(a) and sqrt(1 - a) (a scheduler's precomputed
    tables), in diffusers' arithmetic order."""
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


def model_target(prediction_type, original, noise, alpha_bar):
    """What a denoiser of `prediction_type` is trained to output for
    x_t = sqrt(a) x0 + sqrt(1 - a) eps: eps, v = sqrt(a) eps - sqrt(1 - a) x0, or x0
    (the inverse of `predicted_original_and_noise`)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * original
    return original


# ---------------------------------------------------------------- sigma (variance-exploding) view
def train_sigmas(alphas_cumprod):
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training timestep, float32.

    x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps: the noise level of Karras et al. (2022).
    """
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod).astype(np.float32)


def karras_sigmas(sigma_min, sigma_max, num_steps, rho=7.0):
    """Karras et al. (2022) eq. (5): sigma_i = (max^(1/rho) + i/(N-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = float(sigma_min) ** (1 / rho)
    max_inv_rho = float(sigma_max) ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas, log_sigmas):
    """The (fractional) training timestep of each sigma: linear interpolation in log sigma
    between the two neighbouring training sigmas (diffusers' `_sigma_to_t`)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigmas.shape)


def final_sigma(final_sigmas_type, alphas_cumprod):
    """The noise level after the last step: 0 ("zero") or sigma at t = 0 ("sigma_min")."""
    _check("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    if final_sigmas_type == "zero":
        return 0.0
    a0 = alphas_cumprod[0]
    return float(np.sqrt((1 - a0) / a0))


def sigma_to_alpha_sigma_t(sigma):
    """sigma (VE) -> (alpha_t, sigma_t) of the VP process: alpha_t = 1/sqrt(sigma^2 + 1)."""
    sigma = np.asarray(sigma, dtype=np.float32)
    alpha_t = np.float32(1) / np.sqrt(sigma**2 + np.float32(1))
    return alpha_t, sigma * alpha_t
