"""Text2Image: prompt -> image with Stable Diffusion, the whole loop in one compiled function."""

import os
import sys
import warnings

import numpy as np
import tensorflow as tf
from keras import ops

from diffusion_tf import compiler_memory, editing, schedulers
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


def resolve_model(model, download=True, log=None):
    """A model folder path from a folder, a preset name, "shapes" (the built-in model) or
    None (the default: `presets.default_model()`, whose one-line note goes to `log`)."""
    from diffusion_tf import presets

    if model is None:
        model, note = presets.default_model()
        if log is not None:
            log(note)
        if model == presets.DEFAULT_PRESET:
            return presets.ensure_preset(model, download=download)
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model={model!r}; must be a model folder, a preset name or None (the default).")
    model = os.fspath(model)
    if os.path.isdir(model):
        return model
    if model == presets.BUILTIN_MODEL:
        if not presets.builtin_available():
            raise ValueError(
                f"model={model!r}: the built-in shapes model's weights are not installed in "
                f"{presets.builtin_folder()!r}; train one with `python -m diffusion_tf.train` and pass its folder."
            )
        return presets.builtin_folder()
    if model in presets.list_presets():
        return presets.ensure_preset(model, download=download)
    raise ValueError(
        f"model={model!r} is neither a model folder nor a preset; presets: "
        f"{', '.join([presets.BUILTIN_MODEL] + presets.list_presets())} (or convert a checkpoint with "
        "`python -m weights_port SRC DST` and pass model=DST)."
    )


def _stderr_line(line):
    print(line, file=sys.stderr, flush=True)


# Generation defaults, unless a model folder's config.json has a "defaults" section.
DEFAULTS = {"num_steps": 50, "guidance": 7.5, "scheduler": "ddim"}


def _folder_defaults(config, folder):
    """The validated "defaults" section of a model folder's config ({} when absent)."""
    d = config.get("defaults", {})
    where = f"{os.path.join(folder, 'config.json')!r}: defaults"
    if not isinstance(d, dict) or set(d) - set(DEFAULTS):
        raise ValueError(f"{where}={d!r}; must be an object with keys among {sorted(DEFAULTS)}.")
    if "num_steps" in d and (isinstance(d["num_steps"], bool) or not isinstance(d["num_steps"], int)
                             or d["num_steps"] < 1):
        raise ValueError(f"{where}.num_steps={d['num_steps']!r}; must be an integer >= 1.")
    if "guidance" in d and (isinstance(d["guidance"], bool) or not isinstance(d["guidance"], (int, float))
                            or d["guidance"] < 0):
        raise ValueError(f"{where}.guidance={d['guidance']!r}; must be a number >= 0.")
    if "scheduler" in d:
        _check_scheduler_name(d["scheduler"])
    return d


class Text2Image:
    """Stable Diffusion text-to-image.

    Args:
        model: a folder written by `weights_port` or `diffusion_tf.train`, a preset name
            ("sd-v1-5", "sd-v2-1-base", "sd-v2-1"; downloaded and converted once if
            missing), "shapes" (the built-in model), or None (the default): Stable
            Diffusion v1.5 if it is already cached, else "shapes"; a line on stderr says
            which.
        img_height, img_width: output size in pixels, multiples of 8; default:
            the model's native size (512 for SD 1.x, 768 for SD 2.1).
        jit_compile: compile the generation with XLA (else a TensorFlow graph).
        attention: "standard" (softmax) or "linear" (LinearAttention in the UNet's
            self-attention; an approximation with softmax-trained weights); None (the
            default): the model's own (linear for "shapes", standard for Stable Diffusion).
        scheduler: a name from `diffusion_tf.schedulers.NAMES` ("ddim", "dpm++2m-karras",
            "euler_a", ...), built with the model folder's scheduler config; None: the
            model folder's default ("ddim" unless its config.json says otherwise).
        dtype: Keras dtype policy of the networks (default float32).
        distribute: generate a batch data-parallel across devices: True for a
            `tf.distribute.MirroredStrategy` over every visible GPU (or every logical CPU
            when there are several and no GPU), or a `tf.distribute.Strategy` (e.g.
            `TPUStrategy`). The networks are built in its scope (mirrored weights) and each
            replica denoises a contiguous share of the batch; with a deterministic sampler
            the images are those of one device. None/False: one device.
    """

    def __init__(
        self,
        model=None,
        img_height=None,
        img_width=None,
        jit_compile=False,
        attention=None,
        scheduler=None,
        dtype=None,
        download=True,
        distribute=None,
    ):
        if attention is not None and attention not in ATTENTION_TYPES:
            raise ValueError(f"attention={attention!r}; allowed: {sorted(ATTENTION_TYPES)} or None.")
        if scheduler is not None:
            _check_scheduler_name(scheduler)
        check_size(img_height, img_width)
        self.model_path = resolve_model(model, download, log=_stderr_line)
        self.strategy = _strategy(distribute)
        with self.strategy.scope():
            parts = load_folder(self.model_path, attention=attention, dtype=dtype)
        self.config = parts["config"]
        # Generation defaults of the model folder ("defaults" in its config.json).
        self.defaults = dict(DEFAULTS)
        self.defaults.update(_folder_defaults(self.config, self.model_path))
        if scheduler is None:
            scheduler = self.defaults["scheduler"]
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
        self.attention = self.unet.attention
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

    def initial_latents(self, seeds, scheduler=None, shape=None):
        """Standard-normal latents, one independent stream per seed (a batch equals single runs),
        times the scheduler's `init_noise_sigma` (call its `set_timesteps` first).
        `shape`: latent [h, w, c] (default: `latent_shape`)."""
        scheduler = self.scheduler if scheduler is None else scheduler
        return self.noise(seeds, shape) * scheduler.init_noise_sigma

    def noise(self, seeds, shape=None):
        """The standard-normal start noise [B, h, w, c], one stream per seed."""
        shape = tuple(self.latent_shape if shape is None else shape)
        return tf.stack([tf.random.stateless_normal(shape, seed=[int(s), 0]) for s in seeds])

    def _denoise(self, latents, i, context, guidance, use_guidance, scheduler, tables, extra=None):
        """One guided UNet evaluation at step index i: conditional and unconditional passes in one batch.
        `extra` [B, h, w, 5]: mask + masked-image latents appended to the (scaled) input of a
        9-channel inpainting UNet."""
        t = scheduler.model_timestep(i, tables)  # float32; fractional with Karras sigmas
        if use_guidance:
            x = ops.concatenate([latents, latents], axis=0)
            x = scheduler.scale_model_input_at(x, i, tables)
            if extra is not None:
                x = ops.concatenate([x, ops.concatenate([extra, extra], axis=0)], axis=-1)
            out = ops.cast(self.unet(x, t, context), "float32")
            uncond, cond = ops.split(out, 2, axis=0)
            return uncond + guidance * (cond - uncond)
        x = scheduler.scale_model_input_at(latents, i, tables)
        if extra is not None:
            x = ops.concatenate([x, extra], axis=-1)
        return ops.cast(self.unet(x, t, context), "float32")

    def _step(self, latents, state, i, context, tables, guidance, temperature, seed, cond, use_guidance, scheduler):
        """One denoising step at index i: the body of both the fused loop and the callback path.

        `cond` (editing): {"extra"} for 9-channel UNets (mask + masked-image latents), or
        {"mask", "image_latents", "noise"} for the known-region blending of 4-channel UNets."""
        out = self._denoise(latents, i, context, guidance, use_guidance, scheduler, tables, cond.get("extra"))
        noise = self._step_noise(latents, seed, i, temperature, scheduler)
        latents, state = scheduler.step_fn(out, i, latents, state, noise=noise, tables=tables)
        if "mask" in cond:  # the known region follows the image, noised to the next timestep
            steps = ops.shape(tables["model_timesteps"])[0]
            nxt = ops.minimum(i + 1, steps - 1)
            noised = editing.add_noise_at(scheduler, cond["image_latents"], cond["noise"], nxt, tables)
            known = ops.where(i + 1 < steps, noised, cond["image_latents"])
            latents = (1.0 - cond["mask"]) * known + cond["mask"] * latents
        return latents, state

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

    def _generate_fn(self, use_guidance, scheduler=None, mode=(), size=None):
        """encode text -> fori_loop over the denoising steps -> decode, as one function.

        The loop carries (latents, scheduler state) and runs from index `start` (0, or
        part-way for image-to-image); the scheduler's per-step tables and the editing inputs
        `cond` come in as arguments, so another step count or strength reuses the function.
        `mode`: the keys of `cond` (one function per kind of editing). `size`: the latents'
        (h, w), default the pipeline's: one function per size, so that a function traced for
        one size is never relaxed to unknown spatial dimensions by a call with another."""
        scheduler = self.scheduler if scheduler is None else scheduler

        def generate(cond_ids, uncond_ids, latents, tables, guidance, temperature, seed, start, cond):
            context = self._context(cond_ids, uncond_ids, use_guidance)

            def body(i, carry):
                latents, state = carry
                return self._step(latents, state, i, context, tables, guidance, temperature, seed, cond,
                                  use_guidance, scheduler)

            steps = ops.shape(tables["model_timesteps"])[0]
            latents, _ = ops.fori_loop(start, steps, body, (latents, scheduler.init_state(latents)))
            return self.decode(latents), latents

        # keyed by the scheduler object itself (kept alive by the key, so never confused)
        return self._compiled(("generate", use_guidance, scheduler, mode, self._size_key(size)), generate)

    def _size_key(self, size):
        return tuple(int(d) for d in (size if size is not None else self.latent_shape[:2]))

    def _step_fn(self, use_guidance, scheduler=None, mode=(), size=None):
        scheduler = self.scheduler if scheduler is None else scheduler

        def step(latents, state, i, context, tables, guidance, temperature, seed, cond):
            return self._step(latents, state, i, context, tables, guidance, temperature, seed, cond,
                              use_guidance, scheduler)

        return self._compiled(("step", use_guidance, scheduler, mode, self._size_key(size)), step)

    # ------------------------------------------------------------ API
    def generate(
        self,
        prompt,
        negative_prompt=None,
        num_steps=None,
        unconditional_guidance_scale=None,
        temperature=1.0,
        batch_size=1,
        seed=None,
        latents=None,
        callback=None,
        scheduler=None,
        init_image=None,
        strength=0.8,
        mask=None,
        outpaint=None,
        paste_back=True,
    ):
        """Generate images; returns uint8 [len(prompts) * batch_size, H, W, 3].

        `negative_prompt` replaces the empty unconditional prompt of classifier-free
        guidance (used when the guidance scale is above 1). `seed` makes runs
        repeatable: image i of the batch uses seed + i. `latents` [B, h, w, 4] (NHWC)
        replaces the random start (it is multiplied by the scheduler's `init_noise_sigma`;
        when editing it is the standard-normal noise used in place of the seeded one).
        `temperature` scales the fresh noise of stochastic samplers (DDPM, Euler ancestral,
        DDIM with eta > 0); deterministic ones ignore it. `callback(k, n, t)` is called
        after every model evaluation, n = the number of evaluations that run (len(timesteps):
        2 * num_steps - 1 for Heun, num_steps + 1 for PNDM; fewer when editing with
        strength < 1); the loop then runs step by step on the host.
        `scheduler`: a scheduler name for this call only (e.g. "dpm++2m-karras"; default:
        the constructor's). `num_steps` and `unconditional_guidance_scale` default to the
        model's (`self.defaults`: 50 and 7.5 unless the model folder's config.json says
        otherwise; the built-in shapes model has its own).

        Editing (see `diffusion_tf.editing` for every choice): `init_image` (path, PIL image
        or uint8 array; its size, cropped to a multiple of 8, is the output size) with
        `strength` in [0, 1] (the part of the schedule that runs) is image-to-image; with
        `mask` (white = repaint) inpainting; with `outpaint={"left": 128, "top": 64, ...}`
        (pixels, multiples of 8) the canvas grows and the new area is painted (strength 1).
        With a mask (or outpaint) the pixels outside it are the input's exactly, unless
        `paste_back=False` (the raw decoded output, as diffusers returns it).
        """
        sched = self.scheduler if scheduler is None else self.get_scheduler(scheduler)
        prompts = _prompt_list(prompt)
        if num_steps is None:
            num_steps = self.defaults["num_steps"]
        num_steps = _check_int("num_steps", num_steps, 1, MAX_STEPS)
        batch_size = _check_int("batch_size", batch_size, 1)
        guidance = unconditional_guidance_scale
        if guidance is None:
            guidance = self.defaults["guidance"]
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
        edit = editing.prepare(init_image, strength, mask, outpaint)
        f = self.vae.downsampling_factor
        if edit is None:
            height, width = self.img_height, self.img_width
        else:
            height, width = edit.image.shape[:2]
            check_size(height, width)
        shape = (height // f, width // f, self.vae.latent_channels)
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
            noise = self.noise(seeds, shape)
        else:
            latents = np.asarray(latents, dtype="float32")
            expected = (batch,) + shape
            if latents.shape != expected:
                raise ValueError(
                    f"latents has shape {latents.shape}; expected {expected} (NHWC, batch "
                    f"{batch} = prompts x batch_size, size {height}x{width})."
                )
            if not np.all(np.isfinite(latents)):
                raise ValueError("latents contain NaN or Inf values.")
            noise = tf.constant(latents)

        tables = {k: tf.constant(v) for k, v in sched.tables.items()}
        start, cond = 0, {}
        if edit is None:
            latents = noise * np.float32(sched.init_noise_sigma)
            if self.unet.in_channels == 9:  # an inpainting UNet: everything is to be painted
                cond = self._inpaint_inputs(np.zeros((height, width, 3), "uint8"), None, batch)
        else:
            start = editing.start_index(num_steps, edit.strength, sched)
            image_latents = tf.tile(self.encode(edit.image[None]), [batch, 1, 1, 1])
            inpainting = edit.inpainting or self.unet.in_channels == 9
            if start >= len(timesteps):  # strength 0: no step, the VAE round trip
                latents = image_latents
            elif inpainting and start == 0 and edit.strength == 1.0:  # diffusers' is_strength_max
                latents = noise * np.float32(sched.init_noise_sigma)
            else:
                latents = editing.add_noise_at(sched, image_latents, noise, start, tables)
            if self.unet.in_channels == 9:
                cond = self._inpaint_inputs(edit.image, edit.mask, batch)
            elif edit.inpainting:
                m = editing.latent_mask(edit.mask, f)
                cond = {"mask": tf.constant(m[None]), "image_latents": image_latents, "noise": noise}
        mode = tuple(sorted(cond))

        use_guidance = guidance > 1.0
        size = tuple(latents.shape[1:3])
        args = dict(
            cond_ids=tf.constant(self.tokenizer(prompts)),
            uncond_ids=tf.constant(self.tokenizer(negatives)),
            guidance=tf.constant(guidance, "float32"),
            temperature=tf.constant(temperature, "float32"),
            seed=tf.constant(seed, "int64"),
        )
        replicas = self.strategy.num_replicas_in_sync
        # The whole generation (or, with a callback, one step) as one compiled function. Its first
        # call traces and compiles it: give the compiler's freed memory back as it goes
        # (compiler_memory), so that it does not add to the generation's peak.
        fn = (self._generate_fn if callback is None else self._step_fn)(use_guidance, sched, mode, size)
        with compiler_memory.released(fn.experimental_get_tracing_count() == 0):
            if callback is None and replicas > 1:
                images, latents = self._distributed_generate(fn, replicas, args, latents, tables, start, cond)
            elif callback is None:
                images, latents = fn(
                    args["cond_ids"], args["uncond_ids"], latents,
                    tables, args["guidance"], args["temperature"], args["seed"],
                    tf.constant(start, "int32"), cond,
                )
            else:
                context = self._compiled(("context", use_guidance), lambda c, u: self._context(c, u, use_guidance))(
                    args["cond_ids"], args["uncond_ids"]
                )
                state = sched.init_state(latents)
                run = len(timesteps) - start
                for k, t in enumerate(timesteps[start:]):
                    latents, state = fn(
                        latents, state, tf.constant(start + k, "int32"), context, tables,
                        args["guidance"], args["temperature"], args["seed"], cond,
                    )
                    callback(k, run, t.item())
                images = self._compiled(("decode", self._size_key(size)), self.decode)(latents)
        images = self._finite_images(images, latents)
        images = to_uint8(images)
        if edit is not None and edit.mask is not None and paste_back:
            images = editing.paste_back(images, edit.image, edit.mask)
        return images

    def _distributed_generate(self, fn, replicas, args, latents, tables, start, cond):
        """`fn` on each replica with its contiguous share of the batch (shares differ by at most
        one; a replica may get none); the results concatenated in order."""
        batch = int(latents.shape[0])
        bounds = np.linspace(0, batch, replicas + 1).round().astype(int)
        # The conditioning tensors with one row per image are split; the others are shared.
        split_cond = {k: v for k, v in cond.items() if int(v.shape[0]) == batch}
        shared_cond = {k: v for k, v in cond.items() if k not in split_cond}
        per_image = {"cond_ids": args["cond_ids"], "uncond_ids": args["uncond_ids"], "latents": latents,
                     "cond": split_cond}

        def share(ctx):
            r = ctx.replica_id_in_sync_group
            return tf.nest.map_structure(lambda v: v[bounds[r]:bounds[r + 1]], per_image)

        values = self.strategy.experimental_distribute_values_from_function(share)
        key = ("distributed", fn)
        if key not in self._functions:
            def run(values, tables, guidance, temperature, seed, start, shared_cond):
                def replica_fn(v):
                    return fn(v["cond_ids"], v["uncond_ids"], v["latents"], tables, guidance, temperature,
                              seed, start, {**shared_cond, **v["cond"]})

                return self.strategy.run(replica_fn, args=(values,))

            self._functions[key] = tf.function(run)
        images, out = self._functions[key](
            values, tables, args["guidance"], args["temperature"], args["seed"], tf.constant(start, "int32"),
            shared_cond,
        )
        local = self.strategy.experimental_local_results
        return (np.concatenate([np.asarray(x) for x in local(images)]),
                np.concatenate([np.asarray(x) for x in local(out)]))

    def _finite_images(self, images, latents):
        """The decoded images, checked: a NaN or Inf (half precision overflowing) never becomes
        a silently black image. Finite latents with a non-float32 VAE are decoded again by a
        float32 copy of the VAE (with a warning); anything else raises NonFiniteOutputError."""
        images = np.asarray(images, "float32")
        if np.all(np.isfinite(images)):
            return images
        latents = np.asarray(latents, "float32")
        if not np.all(np.isfinite(latents)):
            raise NonFiniteOutputError(
                "the denoising loop produced NaN or Inf latents (the UNet overflowed"
                + ("" if self.unet.compute_dtype == "float32" else f" in {self.unet.compute_dtype}")
                + "); nothing was saved. Try dtype=None (float32), fewer steps or a lower guidance scale."
            )
        if self.vae.compute_dtype == "float32":
            raise NonFiniteOutputError(
                "the VAE decoder produced NaN or Inf pixels in float32 (corrupt VAE weights?); nothing was saved."
            )
        warnings.warn(
            f"the VAE decoder overflowed in {self.vae.compute_dtype} (NaN or Inf pixels); decoding again in float32.",
            stacklevel=3,
        )
        images = np.asarray(self._float32_vae().decode(latents / self.vae.scaling_factor), "float32")
        if not np.all(np.isfinite(images)):
            raise NonFiniteOutputError("the VAE decoder produced NaN or Inf pixels even in float32; nothing was saved.")
        return images

    def _float32_vae(self):
        """A float32 copy of the VAE (built once, on the first overflow)."""
        if getattr(self, "_vae32", None) is None:
            from diffusion_tf.components import build_model

            vae = build_model("vae", self.config["vae"], "float32")
            for target, source in zip(vae.weights, self.vae.weights):
                target.assign(ops.cast(source, "float32"))
            self._vae32 = vae
        return self._vae32

    def _inpaint_inputs(self, image, mask, batch):
        """{"extra": [B, h, w, 1 + 4]}: the latent mask and the masked-image latents of a
        9-channel UNet (mask None: all white, i.e. everything repainted)."""
        f = self.vae.downsampling_factor
        if mask is None:
            mask = np.ones(image.shape[:2], "float32")
        masked = self.encode(editing.masked_image(image, mask)[None])
        extra = ops.concatenate([ops.convert_to_tensor(editing.latent_mask(mask, f)[None]), masked], axis=-1)
        return {"extra": tf.tile(extra, [batch, 1, 1, 1])}


def _strategy(distribute):
    """The tf.distribute strategy of `Text2Image(distribute=...)`."""
    if distribute is None or distribute is False:
        return tf.distribute.get_strategy()
    if distribute is True:
        gpus = tf.config.list_logical_devices("GPU")
        pool = gpus if gpus else tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in pool])
    if isinstance(distribute, tf.distribute.Strategy):
        return distribute
    raise ValueError(f"distribute={distribute!r}; allowed: None, False, True or a tf.distribute.Strategy.")


class NonFiniteOutputError(ValueError):
    """A generation produced NaN or Inf values that could not be recovered; no image is returned."""


def _check_scheduler_name(name):
    if not isinstance(name, str) or name not in schedulers.NAMES:
        raise ValueError(f"scheduler={name!r}; allowed: {', '.join(schedulers.NAMES)}.")


def to_uint8(images):
    """Decoder output in about [-1, 1] -> uint8, as diffusers: round(clip(x / 2 + 0.5) * 255)."""
    images = np.asarray(images, dtype="float32")
    if not np.all(np.isfinite(images)):
        raise NonFiniteOutputError("the decoded image contains NaN or Inf values.")
    return (np.clip(images / 2 + 0.5, 0, 1) * 255).round().astype("uint8")
