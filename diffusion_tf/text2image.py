"""Text2Image: prompt -> image with Stable Diffusion, the whole loop in one compiled function."""

import os
import warnings

import numpy as np
import tensorflow as tf
from keras import ops

from diffusion_tf import schedulers
from diffusion_tf.components import load_folder
from diffusion_tf.layers.transformer_2d import ATTENTION_TYPES

MAX_SEED = 2**32 - 1
MAX_STEPS = 1000
MAX_PIXELS = 2048 * 2048


def _check_int(name, value, minimum, maximum=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r}; must be an integer >= {minimum}.")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name}={value!r}; must be {bound}.")
    return int(value)


def check_size(height, width):
    """Validates an image size; either may be None (meaning: the model's default)."""
    for name, value in (("img_height", height), ("img_width", width)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value % 8:
            raise ValueError(f"{name}={value!r}; must be a positive multiple of 8.")
    if height is not None and width is not None and height * width > MAX_PIXELS:
        raise ValueError(
            f"img_height x img_width = {height}x{width} exceeds the pixel budget of "
            f"{MAX_PIXELS} pixels (2048x2048)."
        )


def _prompt_list(prompt, name="prompt"):
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"{name}={prompt!r}; must be a str or a non-empty list of str.")


def resolve_model(model, download=True):
    """A model folder path from a folder or a preset name."""
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model={model!r}; must be a model folder or a preset name.")
    model = os.fspath(model)
    if os.path.isdir(model):
        return model
    from diffusion_tf import presets

    if model in presets.list_presets():
        return presets.ensure_preset(model, download=download)
    raise ValueError(
        f"model={model!r} is neither a model folder nor a preset; presets: "
        f"{', '.join(presets.list_presets())} (or convert a checkpoint with "
        "`python -m weights_port SRC DST` and pass model=DST)."
    )


class Text2Image:
    """Stable Diffusion text-to-image.

    Args:
        model: a folder written by `weights_port`, or a preset name ("sd-v1-5",
            "sd-v2-1-base", "sd-v2-1"; downloaded and converted once if missing).
        img_height, img_width: output size in pixels, multiples of 8; default:
            the model's native size (512 for SD 1.x, 768 for SD 2.1).
        jit_compile: compile the generation with XLA (else a TensorFlow graph).
        attention: "standard" (softmax) or "linear" (LinearAttention in the UNet's
            self-attention; an approximation with softmax-trained weights).
        scheduler: a name from `diffusion_tf.schedulers.NAMES` ("ddim", "dpm++2m-karras",
            "euler_a", ...), built with the model folder's scheduler config.
        dtype: Keras dtype policy of the networks (default float32).
    """

    def __init__(
        self,
        model="sd-v1-5",
        img_height=None,
        img_width=None,
        jit_compile=False,
        attention="standard",
        scheduler="ddim",
        dtype=None,
        download=True,
    ):
        if attention not in ATTENTION_TYPES:
            raise ValueError(f"attention={attention!r}; allowed: {sorted(ATTENTION_TYPES)}.")
        _check_scheduler_name(scheduler)
        check_size(img_height, img_width)
        self.model_path = resolve_model(model, download)
        parts = load_folder(self.model_path, attention=attention, dtype=dtype)
        self.config = parts["config"]
        self.tokenizer = parts["tokenizer"]
        self.text_encoder = parts["text_encoder"]
        self.unet = parts["unet"]
        self.vae = parts["vae"]
        self._schedulers = {}
        self.scheduler = self.get_scheduler(scheduler)
        native = self.unet.sample_size * self.vae.downsampling_factor
        self.img_height = img_height if img_height is not None else (img_width or native)
        self.img_width = img_width if img_width is not None else (img_height or native)
        check_size(self.img_height, self.img_width)
        self.jit_compile = bool(jit_compile)
        self.attention = attention
        self.last_seeds = None
        self._functions = {}

    # ------------------------------------------------------------ components
    @property
    def latent_shape(self):
        f = self.vae.downsampling_factor
        return (self.img_height // f, self.img_width // f, self.vae.latent_channels)

    def tokenize(self, prompts):
        return self.tokenizer(_prompt_list(prompts))

    def encode_text(self, prompts):
        """Prompts -> the cross-attention context [B, 77, D]."""
        return self.text_encoder(ops.convert_to_tensor(self.tokenize(prompts)))

    def predict_noise(self, latents, timesteps, context):
        """The raw UNet output [B, h, w, 4] (noise, or v for v-prediction models)."""
        return self.unet(latents, timesteps, context)

    def decode(self, latents):
        """Sampler-space latents -> images in about [-1, 1], float [B, H, W, 3]."""
        return self.vae.decode(ops.cast(latents, "float32") / self.vae.scaling_factor)

    def encode(self, images):
        """Images [B, H, W, 3] (uint8 0..255 or float in [-1, 1]) -> latents (mean x scaling factor)."""
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype("float32") / 127.5 - 1.0
        return self.vae.encode(images) * self.vae.scaling_factor

    # ------------------------------------------------------------ sampling
    def get_scheduler(self, name):
        """The scheduler `name` with this model's scheduler config (one instance per name)."""
        _check_scheduler_name(name)
        if name not in self._schedulers:
            self._schedulers[name] = schedulers.get(name, **self.config["scheduler"])
        return self._schedulers[name]

    def initial_latents(self, seeds, scheduler=None):
        """Standard-normal latents, one independent stream per seed (a batch equals single runs),
        times the scheduler's `init_noise_sigma` (call its `set_timesteps` first)."""
        scheduler = self.scheduler if scheduler is None else scheduler
        shape = self.latent_shape
        noise = [tf.random.stateless_normal(shape, seed=[int(s), 0]) for s in seeds]
        return tf.stack(noise) * scheduler.init_noise_sigma

    def _denoise(self, latents, i, context, guidance, use_guidance, scheduler, tables):
        """One guided UNet evaluation at step index i: conditional and unconditional passes in one batch."""
        t = scheduler.model_timestep(i, tables)  # float32; fractional with Karras sigmas
        if use_guidance:
            x = ops.concatenate([latents, latents], axis=0)
            x = scheduler.scale_model_input(x, i, tables)
            out = ops.cast(self.unet(x, t, context), "float32")
            uncond, cond = ops.split(out, 2, axis=0)
            return uncond + guidance * (cond - uncond)
        x = scheduler.scale_model_input(latents, i, tables)
        return ops.cast(self.unet(x, t, context), "float32")

    def _context(self, cond_ids, uncond_ids, use_guidance):
        ids = ops.concatenate([uncond_ids, cond_ids], axis=0) if use_guidance else cond_ids
        return self.text_encoder(ids)

    def _step_noise(self, latents, seed, i, temperature, scheduler):
        """Fresh noise for stochastic samplers (None for deterministic ones)."""
        if not scheduler.stochastic:
            return None
        seed_pair = tf.stack([seed, tf.cast(i, "int64") + 1])
        return tf.random.stateless_normal(tf.shape(latents), seed=seed_pair) * temperature

    def _compiled(self, key, fn):
        if key not in self._functions:
            self._functions[key] = tf.function(fn, jit_compile=self.jit_compile, reduce_retracing=True)
        return self._functions[key]

    def _generate_fn(self, use_guidance, scheduler=None):
        """encode text -> fori_loop over the denoising steps -> decode, as one function.

        The loop carries (latents, scheduler state); the scheduler's per-step tables come
        in as an argument, so another step count reuses the function."""
        scheduler = self.scheduler if scheduler is None else scheduler

        def generate(cond_ids, uncond_ids, latents, tables, guidance, temperature, seed):
            context = self._context(cond_ids, uncond_ids, use_guidance)

            def body(i, carry):
                latents, state = carry
                out = self._denoise(latents, i, context, guidance, use_guidance, scheduler, tables)
                noise = self._step_noise(latents, seed, i, temperature, scheduler)
                return scheduler.step_fn(out, i, latents, state, noise=noise, tables=tables)

            steps = ops.shape(tables["model_timesteps"])[0]
            latents, _ = ops.fori_loop(0, steps, body, (latents, scheduler.init_state(latents)))
            return self.decode(latents)

        # keyed by the scheduler object itself (kept alive by the key, so never confused)
        return self._compiled(("generate", use_guidance, scheduler), generate)

    def _step_fn(self, use_guidance, scheduler=None):
        scheduler = self.scheduler if scheduler is None else scheduler

        def step(latents, state, i, context, tables, guidance, temperature, seed):
            out = self._denoise(latents, i, context, guidance, use_guidance, scheduler, tables)
            noise = self._step_noise(latents, seed, i, temperature, scheduler)
            return scheduler.step_fn(out, i, latents, state, noise=noise, tables=tables)

        return self._compiled(("step", use_guidance, scheduler), step)

    # ------------------------------------------------------------ API
    def generate(
        self,
        prompt,
        negative_prompt=None,
        num_steps=50,
        unconditional_guidance_scale=7.5,
        temperature=1.0,
        batch_size=1,
        seed=None,
        latents=None,
        callback=None,
        scheduler=None,
    ):
        """Generate images; returns uint8 [len(prompts) * batch_size, H, W, 3].

        `negative_prompt` replaces the empty unconditional prompt of classifier-free
        guidance (used when the guidance scale is above 1). `seed` makes runs
        repeatable: image i of the batch uses seed + i. `latents` [B, h, w, 4] (NHWC)
        replaces the random start (it is multiplied by the scheduler's `init_noise_sigma`).
        `temperature` scales the fresh noise of stochastic samplers (DDPM, Euler ancestral,
        DDIM with eta > 0); deterministic ones ignore it. `callback(i, n, t)` is called
        after every model evaluation, n = len(timesteps) (2 * num_steps - 1 for Heun,
        num_steps + 1 for PNDM); the loop then runs step by step on the host.
        `scheduler`: a scheduler name for this call only (e.g. "dpm++2m-karras"; default:
        the constructor's).
        """
        sched = self.scheduler if scheduler is None else self.get_scheduler(scheduler)
        prompts = _prompt_list(prompt)
        num_steps = _check_int("num_steps", num_steps, 1, MAX_STEPS)
        batch_size = _check_int("batch_size", batch_size, 1)
        guidance = unconditional_guidance_scale
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.number)) or not np.isfinite(guidance) or guidance < 0:
            raise ValueError(
                f"unconditional_guidance_scale={guidance!r}; must be a finite number >= 0."
            )
        if not isinstance(temperature, (int, float, np.number)) or not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature={temperature!r}; must be a finite number >= 0.")
        negatives = [""] * len(prompts) if negative_prompt is None else _prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; "
                "give one negative prompt, or one per prompt."
            )
        prompts = [p for p in prompts for _ in range(batch_size)]
        negatives = [n for n in negatives for _ in range(batch_size)]
        batch = len(prompts)
        if seed is None:
            seed = int(np.random.default_rng().integers(0, MAX_SEED))
        seed = _check_int("seed", seed, 0, MAX_SEED)
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(batch)]
        self.last_seeds = seeds

        timesteps = sched.set_timesteps(num_steps)  # before init_noise_sigma (it may depend on it)
        if latents is None:
            latents = self.initial_latents(seeds, sched)
        else:
            latents = np.asarray(latents, dtype="float32")
            expected = (batch,) + self.latent_shape
            if latents.shape != expected:
                raise ValueError(
                    f"latents has shape {latents.shape}; expected {expected} (NHWC, batch "
                    f"{batch} = prompts x batch_size, size {self.img_height}x{self.img_width})."
                )
            if not np.all(np.isfinite(latents)):
                raise ValueError("latents contain NaN or Inf values.")
            latents = tf.constant(latents * np.float32(sched.init_noise_sigma))

        use_guidance = guidance > 1.0
        tables = {k: tf.constant(v) for k, v in sched.tables.items()}
        args = dict(
            cond_ids=tf.constant(self.tokenizer(prompts)),
            uncond_ids=tf.constant(self.tokenizer(negatives)),
            guidance=tf.constant(guidance, "float32"),
            temperature=tf.constant(temperature, "float32"),
            seed=tf.constant(seed, "int64"),
        )
        if callback is None:
            images = self._generate_fn(use_guidance, sched)(
                args["cond_ids"], args["uncond_ids"], latents,
                tables, args["guidance"], args["temperature"], args["seed"],
            )
        else:
            context = self._compiled(("context", use_guidance), lambda c, u: self._context(c, u, use_guidance))(
                args["cond_ids"], args["uncond_ids"]
            )
            step = self._step_fn(use_guidance, sched)
            state = sched.init_state(latents)
            for i, t in enumerate(timesteps):
                latents, state = step(
                    latents, state, tf.constant(i, "int32"), context, tables,
                    args["guidance"], args["temperature"], args["seed"],
                )
                callback(i, len(timesteps), t.item())
            images = self._compiled("decode", self.decode)(latents)
        return to_uint8(images)


def _check_scheduler_name(name):
    if not isinstance(name, str) or name not in schedulers.NAMES:
        raise ValueError(f"scheduler={name!r}; allowed: {', '.join(schedulers.NAMES)}.")


def to_uint8(images):
    """Decoder output in about [-1, 1] -> uint8, as diffusers: round(clip(x / 2 + 0.5) * 255)."""
    images = np.asarray(images, dtype="float32")
    if not np.all(np.isfinite(images)):
        warnings.warn("the decoded image contains NaN or Inf values; they are saved as 0.")
        images = np.nan_to_num(images, nan=-1.0, posinf=1.0, neginf=-1.0)
    return (np.clip(images / 2 + 0.5, 0, 1) * 255).round().astype("uint8")
