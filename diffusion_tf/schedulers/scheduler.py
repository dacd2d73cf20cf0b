"""Scheduler: the interface every sampling algorithm implements.

The object API is diffusers': `set_timesteps(num_steps)`, `timesteps`,
`init_noise_sigma`, `scale_model_input(sample, t)`, `step(model_output, t, sample, ...)`,
`add_noise(original, noise, timesteps)`, `step_index`, `begin_index`,
`set_begin_index(i)`, `get_config()` / `from_config(config)`. Its methods take timestep
VALUES `t` (entries of `timesteps`), exactly as diffusers' do, and keep the step index and
the multistep / predictor-corrector state on the object:

    scheduler.set_timesteps(20)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x)             # stochastic ones: noise=<standard normal>

`step` returns the previous sample itself (diffusers' `.prev_sample`). The stochastic
schedulers take their fresh noise as `noise=` (standard normal, the shape of the sample)
instead of a torch generator, so a run is reproducible from the arrays alone.

Underneath is a functional core, with its own index-based names, that runs inside one
XLA-compiled denoising loop (`ops.fori_loop`), including the multistep and second-order
algorithms:

    timesteps = scheduler.set_timesteps(n)        # NumPy; also fills scheduler.tables
    x = noise * scheduler.init_noise_sigma
    state = scheduler.init_state(x)               # fixed-shape tuple of tensors
    for i in range(len(timesteps)):               # or ops.fori_loop over (x, state)
        out = model(scheduler.scale_model_input_at(x, i), scheduler.model_timestep(i))
        x, state = scheduler.step_fn(out, i, x, state, noise=None)

`i` is an index into `timesteps` (a tensor inside a loop). Everything that depends
only on the configuration and the step count is precomputed in NumPy at
`set_timesteps` into `tables` (name -> array with one row per index) and gathered
with `ops.take`; the tensor code never branches in Python on tensor values. A
compiled function whose step count can change between calls passes `tables` in as
an argument (`tables=` of `step_fn`, `scale_model_input_at`, `model_timestep`) so they
are not frozen into the graph as constants.
"""

import inspect

import numpy as np
from keras import ops

from diffusion_tf.schedulers import noise_schedule as schedule

# diffusers config fields whose non-default values would change the result and are not
# implemented: `from_config` raises a ValueError for them. Every other field that is not
# a parameter of the class (bookkeeping such as "_class_name", "_diffusers_version",
# "skip_prk_steps", other algorithms' options) is ignored.
UNSUPPORTED = {
    "clip_sample": False,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "trained_betas": None,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "timestep_type": "discrete",
    "interpolation_type": "linear",
    "sigma_min": None,
    "sigma_max": None,
}


class Scheduler:
    """Holds the training noise schedule; subclasses add the sampling rule.

    Defaults are Stable Diffusion's (scaled_linear 0.00085..0.012, "leading" spacing,
    steps_offset 1), not diffusers' per-class defaults: pass the model's scheduler
    config to get the same schedule as diffusers with that config.
    """

    name = None
    order = 1  # model evaluations per step; diffusers' pipelines slice `timesteps` by it

    def __init__(
        self,
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    ):
        schedule._check("prediction_type", prediction_type, self.prediction_types())
        schedule._check("timestep_spacing", timestep_spacing, schedule.TIMESTEP_SPACINGS)
        schedule._check_positive_int("steps_offset", steps_offset, minimum=0)
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.betas = schedule.make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
        self.alphas_cumprod = schedule.alphas_cumprod(self.betas)
        self.timesteps = None
        self.tables = {}
        self.num_inference_steps = None
        self._begin_index = None
        self._step_index = None
        self._state = None

    @classmethod
    def prediction_types(cls):
        return schedule.PREDICTION_TYPES

    # ------------------------------------------------------------ schedule (NumPy)
    def set_timesteps(self, num_steps):
        """Computes `timesteps` (returned, NumPy) and the per-index `tables` for `num_steps` steps."""
        schedule._check_positive_int("num_steps", num_steps)
        timesteps, tables = self._schedule(int(num_steps))
        self.num_inference_steps = int(num_steps)
        self.timesteps = timesteps
        tables = {k: np.asarray(v) for k, v in tables.items()}
        tables["model_timesteps"] = np.asarray(timesteps, dtype=np.float32)
        self.tables = tables
        self._begin_index = None
        self._step_index = None
        self._state = None
        return timesteps

    def _schedule(self, num_steps):
        """-> (timesteps, {name: per-index table}); subclasses add their tables."""
        return (
            schedule.spaced_timesteps(
                num_steps, self.num_train_timesteps, self.timestep_spacing, self.steps_offset
            ),
            {},
        )

    def _require_timesteps(self):
        if self.timesteps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_steps) first.")

    @property
    def init_noise_sigma(self):
        """Standard deviation of the starting noise."""
        return 1.0

    @property
    def stochastic(self):
        """Whether `step_fn` needs fresh standard-normal `noise` at every step."""
        return False

    def set_begin_index(self, begin_index=0):
        """Index of the first step run (image-to-image starts part-way), as diffusers: the
        index-tracking schedulers (sigma ones, DPM-Solver) then start there instead of
        looking the first timestep up, and `add_noise` uses it."""
        schedule._check_positive_int("begin_index", begin_index, minimum=0)
        self._begin_index = int(begin_index)

    @property
    def begin_index(self):
        """The index set by `set_begin_index` (None until then; `set_timesteps` clears it)."""
        return self._begin_index

    @property
    def step_index(self):
        """Index into `timesteps` of the next `step` (None before the first one), as diffusers;
        it grows by one per `step`. Only the schedulers whose diffusers namesake tracks one
        (sigma ones, DPM-Solver) set it: DDIM, DDPM and PNDM work from the timestep value."""
        return self._step_index

    def index_for_timestep(self, t):
        """Index of timestep value `t` in `timesteps`: the second one where it repeats (Heun,
        PNDM), as diffusers, so that a run started part-way does not skip a noise level."""
        hits = self._hits(t)
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _hits(self, t):
        """Positions of the timestep value `t` (a scalar) in `timesteps`; ValueError if none."""
        self._require_timesteps()
        value = _to_numpy(t)
        if value.size != 1:
            raise ValueError(f"timestep {t!r}: expected one value, got shape {value.shape}.")
        value = value.reshape(()).item()
        hits = np.nonzero(self.timesteps == value)[0]
        if not len(hits):
            raise ValueError(
                f"timestep {value!r} is not one of this scheduler's timesteps (pass an entry of "
                f"`timesteps`, not its index; the index-based core is step_fn/scale_model_input_at)."
            )
        return hits

    def _init_step_index(self, t):
        """diffusers' `_init_step_index`: the begin index if one is set, else that of `t`."""
        begin = self._begin_index
        self._step_index = begin if begin is not None else self.index_for_timestep(t)

    def _current_index(self, t):
        """The step index, initialised from timestep value `t` if no step ran yet."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(t)
        if self._step_index >= len(self.timesteps):
            raise ValueError(
                f"step index {self._step_index} is past the last of the {len(self.timesteps)} "
                f"timesteps; call set_timesteps again to start another run."
            )
        return self._step_index

    def _add_noise_indices(self, timesteps):
        """Step indices for `add_noise` as diffusers picks them: each timestep's index when no
        begin index is set (training, or a pipeline without one); else the current step index
        (inpainting re-noises after the first step) or the begin index (the image-to-image start).
        -> (int32 indices, whether `timesteps` was a scalar)."""
        self._require_timesteps()
        values = _to_numpy(timesteps)
        scalar = values.ndim == 0
        values = values.reshape(-1)
        if self._begin_index is None:
            indices = [self.index_for_timestep(v) for v in values]
        elif self._step_index is not None:
            indices = [self._step_index] * len(values)
        else:
            indices = [self._begin_index] * len(values)
        return np.asarray(indices, dtype=np.int32), scalar

    # ------------------------------------------------------------ tensor core
    def table(self, name, i, tables=None):
        """Row `i` of the per-index table `name` (float32 tensor; `i` may be a tensor)."""
        if tables is None:
            self._require_timesteps()
            tables = self.tables
        table = tables[name]
        if isinstance(i, (int, np.integer)) and isinstance(table, np.ndarray):
            return ops.convert_to_tensor(table[i])  # eager fast path: the same value as the gather
        return ops.take(ops.convert_to_tensor(table), ops.cast(i, "int32"), axis=0)

    def model_timestep(self, i, tables=None):
        """The timestep the denoising model gets at index `i`, float32 (fractional for Karras sigmas)."""
        return self.table("model_timesteps", i, tables)

    def init_state(self, sample):
        """The algorithm's carried state before the first step: a tuple of tensors of fixed shape."""
        return ()

    def scale_model_input_at(self, sample, i, tables=None):
        """The model's input at index `i` (identity except for the sigma schedulers)."""
        return sample

    def scale_model_input(self, sample, timestep=None):
        """diffusers' `scale_model_input(sample, timestep)`: the sample unchanged here; the sigma
        schedulers divide by sqrt(sigma^2 + 1) at the step index of timestep VALUE `timestep`."""
        return sample

    def step_fn(self, model_output, i, sample, state, noise=None, tables=None):
        """x at index i -> (x at index i + 1, new state). `noise`: standard normal, for stochastic ones."""
        raise NotImplementedError

    def _original_and_noise_at(self, model_output, i, sample, tables=None):
        """(x0, eps, sample) at index i from the model output, through the "sqrt_alpha_bar" and
        "sqrt_one_minus_alpha_bar" tables of the schedulers that keep them (DDPM, LCM, TCD)."""
        model_output, sample = as_float(model_output), as_float(sample)
        x0, eps = schedule.original_and_noise_from_roots(
            self.prediction_type, model_output, sample, self.table("sqrt_alpha_bar", i, tables),
            self.table("sqrt_one_minus_alpha_bar", i, tables))
        return x0, eps, sample

    def _need_noise(self, noise):
        if noise is None:
            raise ValueError(f"{type(self).__name__} is stochastic: step needs `noise` (standard normal).")
        return as_float(noise)

    # ------------------------------------------------------------ diffusers' object API
    def step(self, model_output, timestep, sample, noise=None):
        """One step from timestep VALUE `timestep` (an entry of `timesteps`) -> the previous
        (less noisy) sample, as diffusers' `step(...).prev_sample`. Index-tracking form (the
        sigma schedulers and DPM-Solver): the step index is initialised from `timestep` on the
        first call (or is the begin index), then grows by one per call; the algorithm's state
        lives on the object. `noise`: standard normal, for the stochastic schedulers."""
        sample = as_float(sample)
        i = self._current_index(timestep)
        if self._state is None:
            self._state = self.init_state(sample)
        prev, self._state = self.step_fn(model_output, i, sample, self._state, noise)
        self._step_index = i + 1
        return prev

    def alpha_bar(self, t):
        """alpha_bar at integer timestep(s) `t` (tensor or int), float32."""
        return ops.take(ops.convert_to_tensor(self.alphas_cumprod), ops.cast(t, "int32"))

    def add_noise(self, original, noise, t):
        """Forward process q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) eps (DDPM eq. 4), at
        integer timestep value(s) `t` (scalar or [B]; any training timestep, as diffusers')."""
        original, noise = as_float(original), as_float(noise)
        a = self.alpha_bar(t)
        a = _per_sample(a, original)
        return a**0.5 * original + (1 - a) ** 0.5 * noise

    # ------------------------------------------------------------ config
    @classmethod
    def config_fields(cls):
        """{field: default} of the class's config: the keyword parameters of its `__init__` and
        of its bases' (a subclass names only its own fields and passes the rest on)."""
        fields = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for name, p in inspect.signature(init).parameters.items():
                if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    fields[name] = p.default
        return fields

    def get_config(self):
        return {k: getattr(self, k) for k in self.config_fields()}

    @classmethod
    def from_config(cls, config, **overrides):
        """Built from a diffusers-style config: its own fields are used, bookkeeping and
        other algorithms' fields ignored; an unsupported feature switched on is a ValueError."""
        params = cls.config_fields()
        config = dict(config)
        config.update(overrides)
        for key, default in UNSUPPORTED.items():
            if key in config and key not in params and config[key] != default:
                if key == "clip_sample" and config[key] is None:
                    continue
                raise ValueError(
                    f"{key}={config[key]!r} is not supported by {cls.__name__} "
                    f"(only {default!r})."
                )
        variance_type = config.get("variance_type")
        if variance_type in ("learned", "learned_range") and "variance_type" not in params:
            raise ValueError(f"variance_type={variance_type!r} is not supported.")
        return cls(**{k: v for k, v in config.items() if k in params})

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class SigmaScheduler(Scheduler):
    """Base of the algorithms of Karras et al. (2022) that work on x / sqrt(alpha_bar) with noise
    level sigma (Euler, Euler ancestral, Heun, LMS): timesteps as float32, the model input
    scaled by 1 / sqrt(sigma^2 + 1), the start noise by sigma_max."""

    karras = False  # whether the algorithm offers use_karras_sigmas

    def __init__(self, use_karras_sigmas=False, **config):
        super().__init__(**config)
        if use_karras_sigmas and not self.karras:
            raise ValueError(f"use_karras_sigmas=True is not offered by {type(self).__name__}.")
        self.use_karras_sigmas = bool(use_karras_sigmas)
        if self.use_karras_sigmas:
            self.name = f"{type(self).name}-karras"
        self.train_sigmas = schedule.train_sigmas(self.alphas_cumprod)

    @classmethod
    def config_fields(cls):
        fields = super().config_fields()
        if not cls.karras:  # not offered: another algorithm's field, ignored as such by from_config
            del fields["use_karras_sigmas"]
        return fields

    def _sigma_schedule(self, num_steps, final_sigmas_type="zero"):
        """(timesteps float32, sigmas float32 with the final sigma appended), as diffusers."""
        timesteps = schedule.spaced_timesteps(
            num_steps, self.num_train_timesteps, self.timestep_spacing, self.steps_offset,
            exact_linspace=True,
        )
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        if self.use_karras_sigmas:
            sigmas = schedule.karras_sigmas(sigmas[-1], sigmas[0], num_steps)
            timesteps = schedule.sigma_to_t(sigmas, np.log(self.train_sigmas))
        last = schedule.final_sigma(final_sigmas_type, self.alphas_cumprod)
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return timesteps.astype(np.float32), sigmas

    def _sigma_max(self):
        sigmas = self.tables.get("sigma") if self.tables else None
        return np.float32(np.max(sigmas) if sigmas is not None else np.max(self.train_sigmas))

    @property
    def init_noise_sigma(self):
        """sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing (as diffusers)."""
        s = self._sigma_max()
        if self.timestep_spacing in ("linspace", "trailing"):
            return float(s)
        return float(np.sqrt(s * s + np.float32(1)))

    @staticmethod
    def _input_tables(sigma):
        """Per-index constants of scale_model_input and of x0 for v-prediction, float32."""
        sigma = np.asarray(sigma, dtype=np.float32)
        s2p1 = sigma * sigma + np.float32(1)
        return {
            "sigma": sigma,
            "input_scale": np.sqrt(s2p1),  # model input = x / sqrt(sigma^2 + 1)
            "v_out": -sigma / np.sqrt(s2p1),  # x0 = v * (-sigma / sqrt(s^2+1)) + x / (s^2+1)
            "v_skip": s2p1,
        }

    def scale_model_input_at(self, sample, i, tables=None):
        return as_float(sample) / self.table("input_scale", i, tables)

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1) at the step index, initialised from timestep VALUE `timestep`
        if no step ran yet (diffusers: `if self.step_index is None: self._init_step_index(t)`)."""
        return self.scale_model_input_at(sample, self._current_index(timestep))

    def _x0(self, model_output, sample, i, tables):
        """The denoised estimate at index i from the model output (diffusers' arithmetic order)."""
        if self.prediction_type == "epsilon":
            return sample - self.table("sigma", i, tables) * model_output
        if self.prediction_type == "v_prediction":
            return model_output * self.table("v_out", i, tables) + sample / self.table("v_skip", i, tables)
        return model_output

    def add_noise(self, original, noise, timesteps):
        """x0 + sigma * noise, sigma at the step index of each timestep VALUE (scalar or [B]),
        picked as diffusers does (see `_add_noise_indices`). Eager: the look-up is NumPy."""
        original, noise = as_float(original), as_float(noise)
        sigma = _gather(self.tables["sigma"], *self._add_noise_indices(timesteps))
        return original + noise * _per_sample(sigma, original)


def as_float(x):
    return ops.cast(ops.convert_to_tensor(x), "float32")


def _to_numpy(x):
    """A timestep argument (Python number, NumPy value or array, tensor) as a NumPy array."""
    if isinstance(x, (int, float, list, tuple, np.ndarray, np.generic)):
        return np.asarray(x)
    return np.asarray(ops.convert_to_numpy(x))


def reject_integer_timestep(scheduler, timestep):
    """diffusers' Euler and Euler ancestral refuse an integer `timestep` in `step`: their
    timesteps are floats, so an integer is most likely an index from `enumerate(timesteps)`."""
    value = _to_numpy(timestep)
    if value.dtype.kind in "biu":
        shown = value.item() if value.size == 1 else value.tolist()
        raise ValueError(
            f"timestep {shown!r} is an integer: {type(scheduler).__name__}.step takes an entry "
            f"of `timesteps` (float32), not its index."
        )


def _gather(table, indices, scalar):
    """table[indices] as a float32 tensor: a scalar for a scalar timestep, else [B]."""
    values = np.asarray(table, dtype=np.float32)[indices]
    return ops.convert_to_tensor(values[0] if scalar else values)


def _per_sample(value, like):
    """A scalar stays a scalar; a [B] vector is shaped [B, 1, 1, ...] to broadcast over `like`."""
    if len(ops.shape(value)):
        return ops.reshape(value, (-1,) + (1,) * (len(like.shape) - 1))
    return value
