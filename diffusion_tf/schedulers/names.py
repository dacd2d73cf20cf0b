"""The scheduler names `diffusion_tf.schedulers.get` accepts (plain Python: no Keras import).

The command line reads these for --help without importing TensorFlow.
"""

# Canonical name -> one-line description (README and --help wording).
BASE = {
    "ddim": "DDIM (Song et al. 2020); deterministic, eta > 0 adds noise",
    "ddpm": "DDPM ancestral sampling (Ho et al. 2020); stochastic",
    "pndm": "PNDM / PLMS linear multistep (Liu et al. 2022), PRK steps skipped as in Stable Diffusion",
    "euler": "Euler (Karras et al. 2022, Algorithm 2 without churn)",
    "euler_a": "Euler ancestral; stochastic",
    "heun": "Heun second order (Karras et al. 2022); two model evaluations per step",
    "lms": "linear multistep, order 4 (k-diffusion's LMS)",
    "dpm++2m": "DPM-Solver++ 2M (Lu et al. 2022), second-order multistep",
    "lcm": "LCM multistep consistency sampling (Luo et al. 2023), 2-8 steps; for LCM-distilled models and LCM-LoRA",
    "tcd": "TCD (Zheng et al. 2024), LCM's timesteps, gamma (default 0.3) sets the fresh noise; for TCD/LCM models",
}

# Algorithms that offer Karras sigmas (rho = 7): "<name>-karras" sets use_karras_sigmas=True.
KARRAS = ("euler", "heun", "lms", "dpm++2m")

# Other spellings of the canonical names.
ALIASES = {"plms": "pndm", "euler-ancestral": "euler_a"}

# Every accepted name, in display order.
NAMES = tuple(BASE) + tuple(f"{n}-karras" for n in KARRAS) + tuple(ALIASES)


def resolve(name):
    """name -> (canonical algorithm name, config overrides); ValueError listing the valid names."""
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"Unknown scheduler {name!r}; allowed: {', '.join(NAMES)}.")
    if name in ALIASES:
        return ALIASES[name], {}
    if name.endswith("-karras"):
        return name[: -len("-karras")], {"use_karras_sigmas": True}
    return name, {}
