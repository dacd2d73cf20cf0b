"""Text2Image: prompt -> image with Stable Diffusion, the whole loop in one compiled function.

`generate` reads as diffusers' pipeline does, in numbered sections over small helpers:
1. check inputs (one `GenerationRequest`, `diffusion_tf.pipeline.request`), 2. encode the
prompt, 3. prepare the latents (text-to-image, image-to-image, inpainting, outpainting),
4. denoise (`diffusion_tf.pipeline.sampling`, the one loop), 5. decode. Steps 2-5 run as one
compiled function (or step by step on the host when a callback wants every step).
"""

import os
import sys
import warnings

import numpy as np
import tensorflow as tf
from keras import ops

from diffusion_tf import a1111, compiler_memory, schedulers
from diffusion_tf.components import load_folder, load_vae_folder
from diffusion_tf.model_folder import TOKENIZERS, pipeline_flags
from diffusion_tf.models.autoencoder_tiny import AutoencoderTiny
from diffusion_tf.pipeline.preview import Preview, approximate_rgb
from diffusion_tf.pipeline import editing, sampling, sdxl, vae_swap
from diffusion_tf.prompts import syntax, textual_inversion
from diffusion_tf.prompts.conditioning import TextConditioning
from diffusion_tf.presets.resolve import resolve_model
from diffusion_tf.pipeline.request import (  # noqa: F401  (MAX_*: public constants of this module)
    MAX_PIXELS, MAX_SEED, MAX_STEPS, MICRO_CONDITIONING, GenerationRequest, check_attention, check_scheduler,
    check_size,
    negative_list, prompt_list,
)

OUTPUT_TYPES = ("np", "latent")


def _stderr_line(line):
    print(line, file=sys.stderr, flush=True)


# Generation defaults, unless a model folder's config.json has a "defaults" section.
DEFAULTS = {"num_steps": 50, "guidance": 7.5, "scheduler": "ddim"}
# ... and for a guidance-distilled UNet (time_cond_proj_dim: an LCM model), diffusers'
# LatentConsistencyModelPipeline's: its few steps are what it was distilled for.
DISTILLED_DEFAULTS = {"num_steps": 4, "guidance": 8.5, "scheduler": "lcm"}


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
        check_scheduler(d["scheduler"])
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
        clip_skip: the text encoder's last layers to leave out, as diffusers' `clip_skip`
            (1 = the penultimate layer's output, A1111's "Clip skip: 2"); None: none.
            `generate(clip_skip=...)` overrides it for one call.
        loras: LoRA files merged at start, each a path or (path, scale); see `load_lora`.
        embeddings: textual-inversion files loaded at start, each a path or (path, token);
            see `load_textual_inversion`.
        lora_dir: where `<lora:NAME:SCALE>` in a prompt finds NAME.safetensors (.pt, .ckpt,
            .bin); default `$DIFFUSION_TF_HOME/loras` (~/.cache/diffusion_tf/loras).
        embedding_dir: a folder whose embedding files' names work as words in prompts (loaded
            when a prompt uses them, as A1111's embeddings folder); default
            `$DIFFUSION_TF_HOME/embeddings`.
        prompt_syntax: "a1111" (the default: `(word:1.2)`, `[word]`, BREAK; see
            `diffusion_tf.prompts.syntax`) or "plain" (brackets are text, as diffusers).
        long_prompts: "chunks" (the default: a prompt over 75 tokens is encoded in 77-token
            chunks and concatenated, as A1111) or "truncate" (cut at 77 tokens with a warning,
            as diffusers).
        vae: decode and encode with another VAE; see `load_vae` (None: the model's own).
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
        clip_skip=None,
        loras=None,
        embeddings=None,
        lora_dir=None,
        embedding_dir=None,
        prompt_syntax="a1111",
        long_prompts="chunks",
        vae=None,
    ):
        # === Config ===
        check_attention(attention)
        if scheduler is not None:
            check_scheduler(scheduler)
        check_size(img_height, img_width)
        self.model_path = resolve_model(model, download, log=_stderr_line)
        self.strategy = _strategy(distribute)
        with self.strategy.scope():
            parts = load_folder(self.model_path, attention=attention, dtype=dtype)
        self.config = parts["config"]
        # Generation defaults of the model folder ("defaults" in its config.json).
        self.defaults = dict(DEFAULTS)
        if sampling.guidance_embedded(parts["unet"]):
            self.defaults.update(DISTILLED_DEFAULTS)
        self.defaults.update(_folder_defaults(self.config, self.model_path))
        if scheduler is None:
            scheduler = self.defaults["scheduler"]
        # === Components ===  (SDXL: two tokenizers and text encoders; its refiner only the second)
        self.unet = parts["unet"]
        self.vae = parts["vae"]
        self._own_vae, self._vae_config, self.vae_name = self.vae, self.config["vae"], None
        # What a swapped VAE must match, kept apart from the model's own VAE: that one is released on
        # a swap (diffusers' `pipe.vae = ...` frees it too) and read from the folder again on vae=None.
        self._own_reference, self._own_dtype = vae_swap.reference(self.vae), self.vae.dtype_policy.name
        self._download = download
        self.text_encoder, self.text_encoder_2 = parts.get("text_encoder"), parts.get("text_encoder_2")
        self.tokenizer_2 = parts.get("tokenizer_2")
        self.tokenizer = parts.get("tokenizer", self.tokenizer_2)
        towers = [(c, parts[TOKENIZERS[c]], parts[c]) for c in TOKENIZERS if c in parts]
        self.is_xl = self.unet.needs_added_cond
        self.conditioning = TextConditioning(towers, prompt_syntax, long_prompts, pooled=self.is_xl)
        self.flags = pipeline_flags(self.config)
        self._check_family()
        self.clip_skip = self.conditioning.check_clip_skip(clip_skip)
        self.lora_dir, self.embedding_dir = lora_dir, embedding_dir
        self._lora_stack = None
        self._prompt_loras = {}  # <lora:NAME> of the last prompts: NAME -> the stack's name
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
        if vae is not None:
            self.load_vae(vae)
        for item in loras or ():
            path, scale = (item, 1.0) if isinstance(item, (str, os.PathLike)) else item
            self.load_lora(path, scale)
        for item in embeddings or ():
            path, token = (item, None) if isinstance(item, (str, os.PathLike)) else item
            self.load_textual_inversion(path, token)

    # ------------------------------------------------------------ components
    def _check_family(self):
        """The text encoders, the UNet and the pipeline flags fit together (else a ValueError
        naming the widths: e.g. an SD 1.5 UNet with SDXL encoders)."""
        width, cross = self.conditioning.width, self.unet.cross_attention_dim
        if isinstance(cross, (list, tuple)):
            cross = cross[0]
        if width != cross:
            raise ValueError(
                f"{self.model_path!r}: the text encoders give a context {width} wide "
                f"({' + '.join(str(e.hidden_size) for e in self.conditioning.text_encoders)}) but the UNet "
                f"attends to {cross}: the components are of different models.")
        self.num_time_ids = self.unet.num_time_ids(self.conditioning.pooled_width) if self.is_xl else None
        aesthetics = self.flags["requires_aesthetics_score"]
        if self.is_xl and self.num_time_ids != (5 if aesthetics else 6):
            raise ValueError(
                f"{self.model_path!r}: the UNet reads {self.num_time_ids} time ids but the folder says "
                f"requires_aesthetics_score={aesthetics} ({5 if aesthetics else 6} expected).")

    def load_vae(self, vae):
        """Decode (and encode) with another VAE from now on; returns its label (None: the model's own).

        `vae`: a VAE folder (`python -m weights_port --vae SRC DST`), a model folder (its VAE), a
        VAE preset ("taesd" for SD 1.x/2.x, "taesdxl" for SDXL; downloaded and converted once), a
        TAESD (a diffusers AutoencoderTiny folder or file, madebyollin's taesd_encoder/taesd_decoder
        .safetensors or .pth) or an AutoencoderKL (a diffusers folder such as sdxl-vae-fp16-fix, or
        one file in the original `first_stage_model.*` / bare `encoder.*` layout or diffusers'),
        read without running code; None: back to the model's own VAE. The rules
        (`diffusion_tf.pipeline.vae_swap`): the same latent channels and downsampling factor as the
        model's VAE; an AutoencoderKL with the model's scaling factor (a file records none: it takes
        the model's); a TAESD with scaling factor 1.0 (it decodes the sampler's latents as they are,
        as diffusers' `pipe.vae = AutoencoderTiny(...)`). Anything else is a ValueError naming the
        value, and the pipeline is unchanged."""
        if vae is None:
            model, section, label = self._own_vae, self.config["vae"], None
            if model is None:
                with self.strategy.scope():
                    model = load_vae_folder(self.model_path, dtype=self._own_dtype)[1]
        else:
            family = "sdxl" if self.is_xl else "sd"
            with self.strategy.scope():
                model, section, label = vae_swap.load_vae(
                    vae, self._own_reference, family, dtype=self._own_dtype, download=self._download)
        self.vae, self._vae_config, self.vae_name = model, section, label
        self._own_vae = model if vae is None else None
        self._functions = {}  # the compiled functions hold the previous VAE
        self._vae32 = None
        return label

    @property
    def text_layers(self):
        """clip_skip must be below this (the text encoder's layer count; see `check_clip_skip`)."""
        return self.conditioning.text_layers

    @property
    def is_refiner(self):
        """An SDXL refiner (micro-conditioned on an aesthetic score): image-to-image only."""
        return self.is_xl and self.flags["requires_aesthetics_score"]

    @property
    def latent_shape(self):
        f = self.vae.downsampling_factor
        return (self.img_height // f, self.img_width // f, self.vae.latent_channels)

    def tokenize(self, prompts):
        """The tokenizer's ids [B, 77] (plain text: no prompt syntax, no chunks; multi-vector
        textual-inversion tokens expanded as diffusers' `maybe_convert_prompt`)."""
        return self.tokenizer([self.conditioning.convert_prompt(p) for p in prompt_list(prompts)])

    def encode_text(self, prompts, clip_skip=None):
        """Prompts -> the cross-attention context [B, 77 k, D]: A1111's emphasis and chunks (k > 1
        for prompts over 75 tokens), added tokens and clip skip, as `generate` encodes them.
        SDXL: (context, pooled [B, P]) as diffusers' `encode_prompt` (both encoders' penultimate
        layers concatenated; the pooled embedding of the second)."""
        prompts = [syntax.extract_networks(p)[0] for p in prompt_list(prompts)]
        ids, weights = self.conditioning.tokens(prompts)
        context, pooled = self.conditioning.encode(
            tuple(ops.convert_to_tensor(i) for i in ids), ops.convert_to_tensor(weights),
            self._extra(), self._clip_skip(clip_skip))
        return (context, pooled) if self.is_xl else context

    def _extra(self):
        """The added tokens' vectors, one entry per text encoder, as tensors (None: none at all)."""
        extra = self.conditioning.all_extra_embeddings()
        if all(e is None for e in extra):
            return None
        return tuple(None if e is None else tf.constant(e) for e in extra)

    def _clip_skip(self, clip_skip):
        return self.clip_skip if clip_skip is None else self.conditioning.check_clip_skip(clip_skip)

    def predict_noise(self, latents, timesteps, context, added_cond=None):
        """The raw UNet output [B, h, w, 4] (noise, or v for v-prediction models). SDXL:
        `added_cond={"text_embeds": pooled, "time_ids": [B, 6 (5 for the refiner)]}`."""
        if self.is_xl:
            return self.unet(latents, timesteps, context, added_cond)
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
        check_scheduler(name)
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

    def _context(self, text, extra, use_guidance, clip_skip, zero_uncond=False):
        """(the cross-attention context, an SDXL UNet's added conditions or None): unconditional
        rows first, then conditional ones. `text`: {"ids" (one [B, k, 77] per text encoder),
        "weights", "uncond_ids", "uncond_weights"} (`conditioning.pair`), with SDXL's "time_ids"
        and "uncond_time_ids" [B, n]. `zero_uncond`: SDXL's force_zeros_for_empty_prompt (no
        negative prompt: zero embeddings for the unconditional pass)."""
        ids, weights = text["ids"], text["weights"]
        encode_uncond = use_guidance and not zero_uncond
        if encode_uncond:
            ids = tuple(ops.concatenate([u, c], axis=0) for u, c in zip(text["uncond_ids"], ids))
            weights = ops.concatenate([text["uncond_weights"], weights], axis=0)
        context, pooled = self.conditioning.encode(ids, weights, extra, clip_skip)
        if use_guidance and zero_uncond:
            context = ops.concatenate([ops.zeros_like(context), context], axis=0)
            pooled = None if pooled is None else ops.concatenate([ops.zeros_like(pooled), pooled], axis=0)
        if not self.is_xl:
            return context, None
        time_ids = text["time_ids"]
        if use_guidance:
            time_ids = ops.concatenate([text["uncond_time_ids"], time_ids], axis=0)
        return context, {"text_embeds": pooled, "time_ids": time_ids}

    @property
    def tracing_count(self):
        """How many times this pipeline's compiled functions were traced so far (each trace of an
        XLA function is a compilation): a repeated call with the same shapes adds none."""
        return sum(int(f.experimental_get_tracing_count()) for f in self._functions.values()
                   if hasattr(f, "experimental_get_tracing_count"))

    def _compiled(self, key, fn):
        if key not in self._functions:
            # autograph=False: the functions' loops are ops.fori_loop and their branches
            # Python values fixed at trace time, so AutoGraph's source conversion has nothing
            # to convert; skipping it makes each first call about 2 s shorter (tiny model).
            self._functions[key] = tf.function(fn, jit_compile=self.jit_compile, reduce_retracing=True,
                                               autograph=False)
        return self._functions[key]

    def _generate_fn(self, use_guidance, scheduler, mode, size, clip_skip, zero_uncond, rescale, decode=True):
        """encode text -> the denoising loop -> decode, as one compiled function.

        The scheduler's per-step tables, the start index and the editing inputs `cond` come in
        as arguments, so another step count or strength reuses the function. `mode`: the keys
        of `cond` (one function per kind of editing). `size`: the latents' (h, w): one function
        per size, so that a function traced for one size is never relaxed to unknown spatial
        dimensions by a call with another. Keyed by the scheduler object itself (kept alive
        by the key, so never confused)."""

        def generate(text, extra, latents, tables, guidance, temperature, seed, rescale, start, end, cond):
            context, added = self._context(text, extra, use_guidance, clip_skip, zero_uncond)
            plan = sampling.Plan(scheduler, tables, guidance, use_guidance, seed, temperature, cond, added,
                                 rescale if rescale_on else None,
                                 sampling.guidance_condition(self.unet, guidance, ops.shape(latents)[0]))
            latents = sampling.denoise(self.unet, plan, latents, context, start, end)
            return (self.decode(latents) if decode else latents), latents

        rescale_on = rescale
        return self._compiled(("generate", use_guidance, scheduler, mode, size, clip_skip, zero_uncond, rescale,
                               decode), generate)

    def _step_fn(self, use_guidance, scheduler, mode, size, clip_skip, zero_uncond, rescale):
        """One denoising step as a compiled function (the callback path)."""

        def step(latents, state, i, context, added, tables, guidance, temperature, seed, rescale_value, cond):
            plan = sampling.Plan(scheduler, tables, guidance, use_guidance, seed, temperature, cond, added,
                                 rescale_value if rescale else None,
                                 sampling.guidance_condition(self.unet, guidance, ops.shape(latents)[0]))
            latents, state, _ = sampling.denoise_step(self.unet, plan, latents, state, i, context)
            return latents, state

        return self._compiled(("step", use_guidance, scheduler, mode, size, clip_skip, zero_uncond, rescale), step)

    # ------------------------------------------------------------ LoRA and textual inversion
    @property
    def lora_stack(self):
        """The LoRAs merged into this pipeline's networks (`diffusion_tf.lora.LoraStack`)."""
        if self._lora_stack is None:
            from diffusion_tf.lora import LoraStack

            self._lora_stack = LoraStack({"unet": self.unet, "text_encoder": self.text_encoder,
                                          "text_encoder_2": self.text_encoder_2})
        return self._lora_stack

    def load_lora(self, path, scale=1.0):
        """Merge a LoRA file (kohya/A1111 or diffusers/PEFT; `.safetensors`, or `.pt`/`.ckpt`/`.bin`
        read without running code) into the networks at `scale`; returns its name. Call again to
        stack several. The merged weights cost nothing per step; on any error (a key that fits no
        weight, another architecture, NaN, a bad scale) nothing changes."""
        return self.lora_stack.load(path, scale)

    def set_lora_scale(self, name, scale):
        """Change a loaded LoRA's scale (merged again from the factors kept in memory; the file
        is not read)."""
        self.lora_stack.set_scale(name, scale)

    def unload_loras(self):
        """Take every LoRA out: each weight is again bit for bit what was loaded from the model."""
        if self._lora_stack is not None:
            self._lora_stack.unload_all()
        self._prompt_loras = {}

    @property
    def loras(self):
        """The merged LoRAs, in load order (name, path, scale, hash, ...)."""
        return [] if self._lora_stack is None else list(self._lora_stack.entries)

    def load_textual_inversion(self, path, token=None, expand=None):
        """Add a textual-inversion embedding (A1111 `.pt`/`.safetensors`, diffusers
        `learned_embeds.*`) as a new word; returns the tokens added (`tok`, `tok_1`, ... for
        several vectors; `tok` alone in a prompt stands for all). `token` defaults to the file's
        own name (A1111's `name`, a diffusers file's key), else the file stem. A token that is
        already a word of the vocabulary, or vectors of another width, are a ValueError and
        nothing is added. `expand`: None as diffusers (the prompt text spelling `tok` exactly as
        loaded is rewritten to `tok tok_1 ...`; so a mixed-case multi-vector token, e.g.
        "EasyNegative", reads only its first vector, diffusers' quirk); True: `tok` stands for all
        its vectors wherever it is found, as A1111 (the embedding folder's words always do)."""
        return self.conditioning.load_embedding(path, token, expand=expand)

    def unload_textual_inversion(self):
        """Forget every added token."""
        self.conditioning.unload_embeddings()

    def _folder(self, given, name):
        if given is not None:
            return os.fspath(given)
        from diffusion_tf.presets.cache import cache_dir

        return os.path.join(cache_dir(), name)

    def _prompt_networks(self, prompts, negatives):
        """The prompts without their `<lora:...>` tags, with the LoRAs they name merged (those of
        the previous call that they no longer name taken out) and the embedding folder's words
        they use loaded."""
        cleaned, tag_sets = [], []
        for p in prompts:
            text, tags = syntax.extract_networks(p)
            cleaned.append(text)
            tag_sets.append(dict(tags))
        if any(t != tag_sets[0] for t in tag_sets):
            raise ValueError(
                f"the prompts of one call name different LoRAs ({tag_sets[0]} and "
                f"{next(t for t in tag_sets if t != tag_sets[0])}); LoRAs are merged into the weights, so "
                "give every prompt of a call the same <lora:...> tags.")
        wanted = tag_sets[0]
        for n in negatives:
            text, tags = syntax.extract_networks(n)
            cleaned.append(text)
            wanted.update(tags)
        if wanted or self._prompt_loras:
            self._sync_prompt_loras(wanted)
        folder = self._folder(self.embedding_dir, "embeddings")
        for stem, path in textual_inversion.find_in_folder(folder, " ".join(cleaned)).items():
            if stem not in self.conditioning.embeddings:
                self.load_textual_inversion(path, token=stem, expand=True)
        return cleaned[:len(prompts)], cleaned[len(prompts):]

    def _sync_prompt_loras(self, wanted):
        folder = self._folder(self.lora_dir, "loras")
        # every new name is found before anything changes (a loaded one is re-scaled from memory)
        paths = {name: _find_lora(folder, name) for name in wanted if name not in self._prompt_loras}
        stack = self.lora_stack
        for name in [n for n in self._prompt_loras if n not in wanted]:
            stack.remove(self._prompt_loras.pop(name))
        for name, scale in wanted.items():
            if name in self._prompt_loras:
                stack.set_scale(self._prompt_loras[name], scale)
            else:
                self._prompt_loras[name] = stack.load(paths[name], scale)

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
        height=None,
        width=None,
        init_latents=None,
        output_type="np",
        clip_skip=None,
        original_size=None,
        target_size=None,
        crops_coords_top_left=None,
        negative_original_size=None,
        negative_target_size=None,
        negative_crops_coords_top_left=None,
        aesthetic_score=6.0,
        negative_aesthetic_score=2.5,
        guidance_rescale=0.0,
        denoising_start=None,
        denoising_end=None,
        preview=None,
    ):
        """Generate images; returns uint8 [len(prompts) * batch_size, H, W, 3].

        `negative_prompt` replaces the empty unconditional prompt of classifier-free
        guidance (used when the guidance scale is above 1). A guidance-distilled UNet (an LCM
        model: `time_cond_proj_dim`) takes the scale as an input instead (w = scale - 1, as
        diffusers' LatentConsistencyModelPipeline) and runs no unconditional pass, so it reads
        no negative prompt; its defaults are 4 steps, guidance 8.5 and the "lcm" scheduler.
        `seed` makes runs repeatable: image i of the batch uses seed + i. `latents` [B, h, w, 4] (NHWC)
        replaces the random start (it is multiplied by the scheduler's `init_noise_sigma`;
        when editing it is the standard-normal noise used in place of the seeded one).
        `temperature` scales the fresh noise of stochastic samplers (DDPM, Euler ancestral,
        DDIM with eta > 0); deterministic ones ignore it. `callback(k, n, t)` is called
        after every model evaluation, n = the number of evaluations that run (len(timesteps):
        2 * num_steps - 1 for Heun, num_steps + 1 for PNDM; fewer when editing with
        strength < 1); the loop then runs step by step on the host. `preview`: a
        `diffusion_tf.pipeline.preview.Preview(every, sink)`: `sink(k, n, images)` gets uint8
        previews of the current latents after every `every`-th step (`preview_images`), also
        step by step.
        `scheduler`: a scheduler name for this call only (e.g. "dpm++2m-karras"; default:
        the constructor's). `num_steps` and `unconditional_guidance_scale` default to the
        model's (`self.defaults`: 50 and 7.5 unless the model folder's config.json says
        otherwise; the built-in shapes model has its own). `height`, `width`: the size of
        this call (default: the constructor's `img_height`, `img_width`).

        Editing (see `diffusion_tf.pipeline.editing` for every choice): `init_image` (path, PIL
        image or uint8 array; its size, cropped to a multiple of 8, is the output size) with
        `strength` in [0, 1] (the part of the schedule that runs) is image-to-image; with
        `mask` (white = repaint) inpainting; with `outpaint={"left": 128, "top": 64, ...}`
        (pixels, multiples of 8) the canvas grows and the new area is painted (strength 1).
        With a mask (or outpaint) the pixels outside it are the input's exactly, unless
        `paste_back=False` (the raw decoded output, as diffusers returns it).
        `init_latents` [B, h, w, 4]: image-to-image from latents already encoded (sampler
        space, e.g. `encode(images)` or another generation's `output_type="latent"`) instead
        of `init_image`. `output_type`: "np" (uint8 images) or "latent" (the final latents,
        float32 [B, h, w, 4], not decoded), as diffusers'.

        Prompts follow A1111's conventions (see the class docstring: `prompt_syntax`,
        `long_prompts`): `(word:1.3)` emphasis, BREAK, prompts of any length, `<lora:NAME:SCALE>`
        (merged for this and later calls that name it, found in `lora_dir`) and the words of
        `embedding_dir`. `clip_skip`: this call's (default: the constructor's).

        SDXL (as diffusers' StableDiffusionXL*Pipeline): `original_size`, `target_size` (default:
        the output size) and `crops_coords_top_left` (default (0, 0)) micro-condition the UNet, as
        `(height, width)` / `(top, left)` pairs, with `negative_*` variants for the unconditional
        pass (see `diffusion_tf.pipeline.sdxl` for diffusers' defaults); a refiner reads
        `aesthetic_score` / `negative_aesthetic_score` instead of the target size. With no
        negative prompt the unconditional embeddings are zeros where the model folder says
        force_zeros_for_empty_prompt (the base). `guidance_rescale` (any model) rescales the guided
        output (Lin et al. 2023). `denoising_end` in (0, 1) stops the schedule there (the base of
        an "ensemble of experts"; use `output_type="latent"`), `denoising_start` starts there from
        `init_latents` (or `init_image`) without adding noise (the refiner), in place of
        `strength`.
        """
        request = GenerationRequest(
            prompt, negative_prompt=negative_prompt, num_steps=num_steps,
            guidance_scale=unconditional_guidance_scale, seed=seed, batch_size=batch_size, height=height,
            width=width, scheduler=scheduler, temperature=temperature, init_image=init_image, strength=strength,
            mask=mask, outpaint=outpaint, paste_back=paste_back, latents=latents, clip_skip=clip_skip,
            original_size=original_size, target_size=target_size, crops_coords_top_left=crops_coords_top_left,
            negative_original_size=negative_original_size, negative_target_size=negative_target_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score, guidance_rescale=guidance_rescale,
            denoising_start=denoising_start, denoising_end=denoising_end,
        )
        return self.run(request, callback=callback, init_latents=init_latents, output_type=output_type,
                        preview=preview)

    def run(self, request, callback=None, init_latents=None, output_type="np", preview=None):
        """`generate` for a `GenerationRequest` (its `model` and `attention` are not used)."""
        # 1. Check inputs
        request.validate()
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}.")
        sched = self.scheduler if request.scheduler is None else self.get_scheduler(request.scheduler)
        num_steps = request.num_steps if request.num_steps is not None else self.defaults["num_steps"]
        guidance = request.guidance_scale if request.guidance_scale is not None else self.defaults["guidance"]
        clip_skip = self._clip_skip(request.clip_skip)
        prompts, negatives = self._prompt_networks(request.prompts(),
                                                   negative_list(request.negative_prompt, len(request.prompts())))
        edit = editing.prepare(request.init_image, request.strength, request.mask, request.outpaint)
        self._check_editing(request, edit, init_latents)
        size = self._request_size(request, edit, init_latents)
        shape = (size[0] // self.vae.downsampling_factor, size[1] // self.vae.downsampling_factor,
                 self.vae.latent_channels)
        prompts = [p for p in prompts for _ in range(request.batch_size)]
        negatives = [n for n in negatives for _ in range(request.batch_size)]
        seed = int(np.random.default_rng().integers(0, MAX_SEED)) if request.seed is None else request.seed
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(len(prompts))]
        self.last_seeds = seeds
        timesteps = sched.set_timesteps(num_steps)  # before init_noise_sigma (it may depend on it)
        noise = self._start_noise(request.latents, seeds, shape, size)

        # 2. Encode the prompt: tokens and weights here, the text encoder inside the compiled function.
        # A guidance-distilled UNet takes the scale as an input: no unconditional pass (as diffusers).
        use_guidance = guidance > 1.0 and not sampling.guidance_embedded(self.unet)
        zero_uncond = use_guidance and request.negative_prompt is None and self.flags["force_zeros_for_empty_prompt"]
        (ids, weights), (uncond_ids, uncond_weights) = self.conditioning.pair(prompts, negatives)
        text = {"ids": tuple(tf.constant(i) for i in ids), "weights": tf.constant(weights)}
        if use_guidance and not zero_uncond:
            text.update(uncond_ids=tuple(tf.constant(i) for i in uncond_ids),
                        uncond_weights=tf.constant(uncond_weights))
        if self.is_xl:
            kind = sdxl.TEXT_TO_IMAGE if edit is None and init_latents is None else sdxl.EDITING
            positive, negative = sdxl.time_ids(kind, self.is_refiner, size, request)
            text["time_ids"] = tf.constant(np.tile(positive, (len(prompts), 1)))
            if use_guidance:
                text["uncond_time_ids"] = tf.constant(np.tile(negative, (len(prompts), 1)))
        extra = self._extra()

        # 3. Prepare the latents (and the editing conditions)
        tables = {k: tf.constant(v) for k, v in sched.tables.items()}
        latents, start, cond = self._prepare_latents(
            sched, tables, num_steps, noise, edit, init_latents, request.strength, len(prompts),
            request.denoising_start)
        end = sdxl.end_index(sched.timesteps, request.denoising_end, sched.num_train_timesteps)
        if request.denoising_end is not None and end <= start:
            raise ValueError(
                f"denoising_end={request.denoising_end!r} leaves no step to run after the start (index {start} of "
                f"{len(sched.timesteps)}); raise it, or give more steps.")

        # 4. Denoise and 5. decode: one compiled function (or step by step with a callback). Its
        # first call traces and compiles it: give the compiler's freed memory back as it goes
        # (compiler_memory), so that it does not add to the generation's peak.
        decode = output_type != "latent"
        args = (tf.constant(guidance, "float32"), tf.constant(request.temperature, "float32"),
                tf.constant(seed, "int64"), tf.constant(request.guidance_rescale, "float32"))
        bounds = (tf.constant(start, "int32"), tf.constant(end, "int32"))
        key = (use_guidance, sched, tuple(sorted(cond)), tuple(int(d) for d in latents.shape[1:3]), clip_skip,
               zero_uncond, use_guidance and request.guidance_rescale > 0)
        if preview is not None and not isinstance(preview, Preview):
            raise ValueError(f"preview={preview!r}; give a diffusion_tf.pipeline.preview.Preview(every, sink).")
        stepwise = callback is not None or preview is not None
        fn = self._step_fn(*key) if stepwise else self._generate_fn(*key, decode=decode)
        with compiler_memory.released(fn.experimental_get_tracing_count() == 0):
            if not stepwise and self.strategy.num_replicas_in_sync > 1:
                images, latents = self._distributed_generate(
                    fn, self.strategy.num_replicas_in_sync, text, extra, latents, tables, args, bounds, cond)
            elif not stepwise:
                images, latents = fn(text, extra, latents, tables, *args, *bounds, cond)
            else:
                latents = self._run_with_callback(fn, key, text, extra, latents, tables, args, start, end,
                                                  cond, timesteps, callback, preview)
                images = self._compiled(("decode", key[3]), self.decode)(latents) if decode else latents
        if not decode:
            return np.asarray(latents, "float32")
        images = to_uint8(self._finite_images(images, latents))
        if edit is not None and edit.mask is not None and request.paste_back:
            images = editing.paste_back(images, edit.image, edit.mask)
        return images

    # ------------------------------------------------------------ generate's helpers
    def _check_editing(self, request, edit, init_latents):
        """A refiner edits only; `denoising_start` needs something to start from; micro-conditioning
        is for SDXL models only (an SD 1.x/2.x UNet has no input for it: a value would be lost)."""
        if not self.is_xl:
            given = [f for f in MICRO_CONDITIONING
                     if getattr(request, f) != GenerationRequest.__dataclass_fields__[f].default]
            if given:
                raise ValueError(
                    f"{', '.join(f'{f}={getattr(request, f)!r}' for f in given)}: micro-conditioning is read by "
                    f"SDXL models only; {self.model_path!r} is an SD 1.x/2.x model (leave them unset).")
        if edit is None and init_latents is None:
            if self.is_refiner:
                raise ValueError(
                    f"{self.model_path!r} is an SDXL refiner (conditioned on an aesthetic score): it only refines. "
                    "Give init_image= (image-to-image) or init_latents= with denoising_start= (a base model's "
                    "latents, output_type='latent' with denoising_end=).")
            if request.denoising_start is not None:
                raise ValueError(f"denoising_start={request.denoising_start!r} needs init_latents= or init_image= "
                                 "(the partly denoised latents to continue from).")
        if request.denoising_start is not None and edit is not None and edit.outpaint is not None:
            raise ValueError(f"denoising_start={request.denoising_start!r} cannot be combined with outpaint=.")

    def _request_size(self, request, edit, init_latents):
        """(height, width) in pixels: the input image's when editing, else the request's or the pipeline's."""
        if init_latents is not None:
            if edit is not None:
                raise ValueError("init_latents= and init_image= cannot be combined; give one of them.")
            f = self.vae.downsampling_factor
            shape = np.shape(init_latents)
            if len(shape) != 4 or shape[-1] != self.vae.latent_channels:
                raise ValueError(f"init_latents has shape {tuple(shape)}; expected [B, h, w, "
                                 f"{self.vae.latent_channels}] (NHWC, sampler space).")
            height, width = shape[1] * f, shape[2] * f
        elif edit is not None:
            height, width = edit.image.shape[:2]
        else:
            height = request.height if request.height is not None else self.img_height
            width = request.width if request.width is not None else self.img_width
        check_size(height, width)
        return int(height), int(width)

    def _start_noise(self, latents, seeds, shape, size):
        """The standard-normal start noise: seeded, or the given `latents` (checked)."""
        if latents is None:
            return self.noise(seeds, shape)
        latents = np.asarray(latents, dtype="float32")
        expected = (len(seeds),) + tuple(shape)
        if latents.shape != expected:
            raise ValueError(
                f"latents has shape {latents.shape}; expected {expected} (NHWC, batch "
                f"{len(seeds)} = prompts x batch_size, size {size[0]}x{size[1]})."
            )
        if not np.all(np.isfinite(latents)):
            raise ValueError("latents contain NaN or Inf values.")
        return tf.constant(latents)

    def _prepare_latents(self, sched, tables, num_steps, noise, edit, init_latents, strength, batch,
                         denoising_start=None):
        """(the loop's start latents, its start index, the editing conditions `cond`).
        `denoising_start`: start there (SDXL's hand-off) from the image latents as they are."""
        if edit is None and init_latents is None:
            latents = noise * np.float32(sched.init_noise_sigma)
            cond = {}
            if self.unet.in_channels == 9:  # an inpainting UNet: everything is to be painted
                height, width = (int(d) * self.vae.downsampling_factor for d in noise.shape[1:3])
                cond = self._inpaint_inputs(np.zeros((height, width, 3), "uint8"), None, batch)
            return latents, 0, cond
        if edit is None:
            image_latents = tf.constant(np.asarray(init_latents, "float32"))
            if int(image_latents.shape[0]) != batch:
                raise ValueError(f"init_latents has {int(image_latents.shape[0])} rows; expected {batch} "
                                 "(prompts x batch_size).")
        else:
            strength = edit.strength  # 1.0 for outpainting
            image_latents = tf.tile(self.encode(edit.image[None]), [batch, 1, 1, 1])
        start = editing.start_index(num_steps, strength, sched)
        if denoising_start is not None:
            start = sdxl.start_index(sched.timesteps, denoising_start, sched.num_train_timesteps,
                                     editing.scheduler_order(sched))
        inpainting = (edit is not None and edit.inpainting) or self.unet.in_channels == 9
        if denoising_start is not None or start >= len(sched.timesteps):
            # the hand-off continues from the latents as given; strength 0: the VAE round trip
            latents = image_latents
        elif inpainting and start == 0 and strength == 1.0:  # diffusers' is_strength_max
            latents = noise * np.float32(sched.init_noise_sigma)
        else:
            latents = editing.add_noise_at(sched, image_latents, noise, start, tables)
        cond = {}
        if self.unet.in_channels == 9:
            if edit is None:
                raise ValueError("init_latents= needs a 4-channel UNet; this model is a 9-channel inpainting UNet "
                                 "(give init_image= instead).")
            cond = self._inpaint_inputs(edit.image, edit.mask, batch)
        elif edit is not None and edit.inpainting:
            m = editing.latent_mask(edit.mask, self.vae.downsampling_factor)
            cond = {"mask": tf.constant(m[None]), "image_latents": image_latents, "noise": noise}
        return latents, start, cond

    def _run_with_callback(self, fn, key, text, extra, latents, tables, args, start, end, cond, timesteps,
                           callback, preview=None):
        """The loop on the host, one compiled step at a time, calling `callback(k, n, t)` after each
        and the preview's sink where it is due."""
        use_guidance, clip_skip, zero_uncond = key[0], key[4], key[5]
        context, added = self._compiled(
            ("context", use_guidance, clip_skip, zero_uncond),
            lambda t, e: self._context(t, e, use_guidance, clip_skip, zero_uncond))(text, extra)
        state = key[1].init_state(latents)
        run = end - start
        for k, t in enumerate(timesteps[start:end]):
            latents, state = fn(latents, state, tf.constant(start + k, "int32"), context, added, tables, *args, cond)
            if callback is not None:
                callback(k, run, t.item())
            if preview is not None and preview.due(k, run):
                preview.sink(k, run, self.preview_images(latents))
        return latents

    def preview_images(self, latents):
        """uint8 RGB previews [B, H, W, 3] of latents [B, h, w, 4] (the sampler's, part-way): the
        tiny decoder's images when the VAE is one (TAESD), else the family's latent-to-RGB map
        (`diffusion_tf.pipeline.preview`), nearly free."""
        if isinstance(self.vae, AutoencoderTiny):
            size = tuple(int(d) for d in latents.shape[1:3])
            return to_uint8(np.asarray(self._compiled(("decode", size), self.decode)(latents)))
        return approximate_rgb(np.asarray(latents), "sdxl" if self.is_xl else "sd", self.vae.downsampling_factor)

    def _distributed_generate(self, fn, replicas, text, extra, latents, tables, args, bounds, cond):
        """`fn` on each replica with its contiguous share of the batch (shares differ by at most
        one; a replica may get none); the results concatenated in order."""
        batch = int(latents.shape[0])
        shares = np.linspace(0, batch, replicas + 1).round().astype(int)
        # The conditioning tensors with one row per image are split; the others are shared.
        split_cond = {k: v for k, v in cond.items() if int(v.shape[0]) == batch}
        shared_cond = {k: v for k, v in cond.items() if k not in split_cond}
        per_image = {"text": text, "latents": latents, "cond": split_cond}

        def share(ctx):
            r = ctx.replica_id_in_sync_group
            return tf.nest.map_structure(lambda v: v[shares[r]:shares[r + 1]], per_image)

        values = self.strategy.experimental_distribute_values_from_function(share)
        key = ("distributed", fn)
        if key not in self._functions:
            def run(values, extra, tables, guidance, temperature, seed, rescale, start, end, shared_cond):
                def replica_fn(v):
                    return fn(v["text"], extra, v["latents"], tables, guidance, temperature,
                              seed, rescale, start, end, {**shared_cond, **v["cond"]})

                return self.strategy.run(replica_fn, args=(values,))

            self._functions[key] = tf.function(run, autograph=False)
        images, out = self._functions[key](values, extra, tables, *args, *bounds, shared_cond)
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

            vae = build_model("vae", self._vae_config, "float32")
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


def _find_lora(folder, name):
    """The file of `<lora:name>` in `folder` (`a1111.find_lora`: its stem, case-sensitive first);
    ValueError naming what is there otherwise."""
    path = a1111.find_lora(folder, name)
    if path is not None:
        return path
    stems = sorted(a1111.lora_files(folder))
    raise ValueError(
        f"<lora:{name}>: no LoRA file named {name!r} ({', '.join(a1111.LORA_EXTENSIONS)}) in {folder!r}"
        + (f"; it holds {', '.join(stems[:20])}." if stems else " (none there).")
    )


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


def to_uint8(images):
    """Decoder output in about [-1, 1] -> uint8, as diffusers: round(clip(x / 2 + 0.5) * 255)."""
    images = np.asarray(images, dtype="float32")
    if not np.all(np.isfinite(images)):
        raise NonFiniteOutputError("the decoded image contains NaN or Inf values.")
    return (np.clip(images / 2 + 0.5, 0, 1) * 255).round().astype("uint8")
