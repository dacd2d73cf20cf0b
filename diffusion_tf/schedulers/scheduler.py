"""Scheduler: the interface every sampling algorithm implements.

Close to diffusers' so users feel at home: `set_timesteps(num_steps)`,
`timesteps`, `init_noise_sigma`, `scale_model_input(sample, t)`,
`step(model_output, t, sample, ...)`, `add_noise(original, noise, t)`,
`get_config()` / `from_config(config)`. `step` and `add_noise` are written with
`keras.ops` on float32 tensors so they run eagerly and inside one XLA-compiled
denoising loop; `t` may be a Python int or a scalar tensor.
"""

import inspect

from keras import ops

from diffusion_tf.schedulers import schedule


class Scheduler:
    """Holds the training noise schedule; subclasses add the sampling rule."""

    name = None

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
        schedule._check("prediction_type", prediction_type, schedule.PREDICTION_TYPES)
        schedule._check("timestep_spacing", timestep_spacing, schedule.TIMESTEP_SPACINGS)
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
        self.num_inference_steps = None

    init_noise_sigma = 1.0

    @property
    def stochastic(self):
        """Whether `step` needs fresh noise."""
        return False

    def set_timesteps(self, num_steps):
        self.num_inference_steps = num_steps
        self.timesteps = schedule.spaced_timesteps(
            num_steps, self.num_train_timesteps, self.timestep_spacing, self.steps_offset
        )
        return self.timesteps

    def scale_model_input(self, sample, t):
        return sample

    def alpha_bar(self, t):
        """alpha_bar at integer timestep(s) `t` (tensor or int), float32."""
        return ops.take(ops.convert_to_tensor(self.alphas_cumprod), ops.cast(t, "int32"))

    def add_noise(self, original, noise, t):
        """Forward process q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) eps (DDPM eq. 4)."""
        a = self.alpha_bar(t)
        a = ops.reshape(a, (-1,) + (1,) * (len(original.shape) - 1)) if len(ops.shape(a)) else a
        return a**0.5 * original + (1 - a) ** 0.5 * noise

    def step(self, model_output, t, sample, noise=None):
        raise NotImplementedError

    def get_config(self):
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self"}

    @classmethod
    def from_config(cls, config, **overrides):
        params = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in dict(config).items() if k in params}
        kwargs.update(overrides)
        return cls(**kwargs)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def as_float(x):
    return ops.cast(ops.convert_to_tensor(x), "float32")

