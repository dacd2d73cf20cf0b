"""The stages of a run (`Stages`, over `Session`): the four of `--stage all`, in order (the
VAE, the decoder fine-tuning, the UNet with the text encoder and its --eval-every judging of
prompt adherence, the decoder's refinement on the UNet's own latents), and the LoRA stage
(`--stage lora`: low-rank factors on a given model, trained on a folder of captioned images)."""

import os
import shutil
import time

import keras
import numpy as np

from diffusion_tf.components import build_model
from diffusion_tf.shapes import dataset as shapes
from diffusion_tf.shapes.generate import generate_images
from diffusion_tf.shapes.judge import judge, score
from diffusion_tf.training.checkpoint import (
    assign_state,
    checkpoint_path,
    keras_state,
    models_from_checkpoint,
    read_checkpoint_arrays,
    read_checkpoint_meta,
    stored_history,
)
from diffusion_tf.training.data import tokenize
from diffusion_tf.training.imagefolder import load_images, scan_folder
from diffusion_tf.training.lora import LoraNetwork, LoraTrainer, kohya_metadata, lora_targets, write_lora_file
from diffusion_tf.training.options import GENERATION_DEFAULTS, PRESETS, scheduler_config
from diffusion_tf.training.plan import base_folder, model_digest
from diffusion_tf.training.refine import image_to_image_latents
from diffusion_tf.training.session import EVAL_SEED_OFFSET, REFINE_SEED_OFFSET, Session
from diffusion_tf.training.trainers import DecoderTrainer, DiffusionTrainer, VAETrainer


class Stages(Session):
    """Each stage reads `self.actions[stage]`: "new", "resume" or "done" (`plan`)."""

    def train_vae(self):
        action = self.actions["vae"]
        path = checkpoint_path(self.save, "vae")
        if action == "done":
            self.histories["vae"] = stored_history(path)
            return
        images, _, _ = self.dataset()
        val_images, _, _ = self.dataset(held_out=True, n=self.val_size("vae"))
        cfg = self.configs["vae"]
        side = cfg["sample_size"] // 2 ** (len(cfg["block_out_channels"]) - 1)
        eps = self.val_rng("vae").standard_normal(
            (len(val_images), side, side, cfg["latent_channels"]), np.float32)
        keras.utils.set_random_seed(self.o.seed)
        with self.strategy.scope():
            vae = build_model("vae", cfg)
            trainer = VAETrainer(vae, kl_weight=self.o.kl_weight, seed=self.o.seed, ema_decay=self.o.ema_decay)
        self.fit_stage("vae", trainer, images, (val_images, eps), resume=action == "resume")
        final = models_from_checkpoint(path, self.configs, ["vae"])["vae"]
        self.write_reconstructions(final, val_images[:8])
        self.log(f"[vae] checkpoint: {path}")

    def train_decoder(self):
        action = self.actions["decoder"]
        path = checkpoint_path(self.save, "decoder")
        if action == "done":
            self.histories["decoder"] = stored_history(path)
            return
        vae = self.load_vae(decoder=False)
        images, _, _ = self.dataset()
        val_images, _, _ = self.dataset(held_out=True, n=self.val_size("decoder"))
        t0 = time.time()
        means, val_means = self.encode_images(vae, images), self.encode_images(vae, val_images)
        self.log(f"[decoder] encoded {len(images)} images in {time.time() - t0:.1f}s; fine-tuning the decoder")
        keras.utils.set_random_seed(self.o.seed + 2)
        with self.strategy.scope():
            trainer = DecoderTrainer(vae, seed=self.o.seed, ema_decay=self.o.ema_decay)
        self.fit_stage("decoder", trainer, (means, images), (val_means, val_images), resume=action == "resume")
        self.write_reconstructions(self.load_vae(), val_images[:8])
        self.log(f"[decoder] checkpoint: {path}")

    def train_unet(self):
        """Returns the models to write: {"vae", "unet", "text_encoder"} (EMA weights)."""
        action = self.actions["unet"]
        path = checkpoint_path(self.save, "unet")
        vae = self.load_vae(refine=action == "done")  # a refinement is of the UNet it was made with
        if action == "done":
            self.histories["unet"] = stored_history(path)
            self.configs = read_checkpoint_meta(path)["configs"]
        else:
            images, _, ids = self.dataset()
            t0 = time.time()
            means = self.encode_images(vae, images)
            if action == "resume":
                scaling = read_checkpoint_meta(path)["scaling_factor"]
            else:  # latents of unit variance, as latent diffusion does for its own VAE
                scaling = float(1.0 / np.std(means))
            self.log(f"[unet] encoded {len(images)} images to latents {means.shape[1:]} in "
                     f"{time.time() - t0:.1f}s; scaling factor {scaling:.4f}")
            self.configs["vae"]["scaling_factor"] = scaling
            vae.scaling_factor = scaling
            self._vae = vae
            self.extra_meta["unet"] = {"scaling_factor": scaling}
            self.extra_arrays["unet"] = {f"frozen/vae/{k}": v for k, v in keras_state(vae).items()}
            latents = means * np.float32(scaling)
            val_images, _, val_ids = self.dataset(held_out=True, n=self.val_size("unet"))
            rng = self.val_rng("unet")
            val_latents = self.encode_images(vae, val_images) * np.float32(scaling)
            val_t = rng.integers(0, self.o.T, len(val_images)).astype(np.int32)
            val_noise = rng.standard_normal(val_latents.shape, np.float32)
            trainer = self._unet_trainer()
            first = (0, ())
            if self.o.position_steps:
                first = (self.o.position_steps, self.position_rows())
                done = action == "resume" and read_checkpoint_meta(path)["step"] >= first[0]
                self.log(f"[unet] position phase: steps 1..{first[0]} on the {len(first[1])} images whose "
                         f"captions name a position and a background, t in [{self.o.position_t_min}, {self.o.T}), "
                         "no caption drop" + (" (done)" if done else ""))
            self.fit_stage("unet", trainer, (latents, ids), ((val_latents, val_ids), (val_t, val_noise)),
                      resume=action == "resume", first=first, adherence=self.adherence)
            self._eval_pipe = None
            shutil.rmtree(os.path.join(self.save, ".eval_model"), ignore_errors=True)
        models = models_from_checkpoint(path, self.configs, ["unet", "text_encoder"])
        vae.scaling_factor = self.configs["vae"]["scaling_factor"]
        models["vae"] = vae
        return models

    def train_refine(self):
        """The refinement stage: the decoder fine-tuned on the UNet's own samples.

        The UNet does not reproduce the dataset's latents exactly: it rounds the corners of
        squares, even image-to-image from a clean start. Here every image of a fresh draw of
        the dataset goes through image-to-image with its caption (the generation defaults;
        strengths cycle through `refine_strengths`, so the layout stays the image's), and the
        decoder learns L1(decode(those latents), the image); a fraction
        `refine_true_fraction` of the rows keeps the posterior mean instead, so that plain
        round trips stay good. The held-out loss is on sampled latents only. The encoder,
        UNet and text encoder do not change. Returns the refined VAE (EMA weights)."""
        action = self.actions["refine"]
        path = checkpoint_path(self.save, "refine")
        scaling = self.configs["vae"]["scaling_factor"]
        if action == "done":
            self.histories["refine"] = stored_history(path)
        else:
            self._fit_refine(action, scaling)
            self.log(f"[refine] checkpoint: {path}")
        vae = self.load_vae()
        vae.scaling_factor = scaling
        return vae

    def _fit_refine(self, action, scaling):
        from diffusion_tf.pipeline.text_to_image import Text2Image

        train = PRESETS[self.o.config]["train"]
        strengths, true_fraction = train["refine_strengths"], train["refine_true_fraction"]
        vae = self.load_vae(refine=False)
        n_val = self.val_size("refine")
        images, captions = shapes.make_dataset(self.o.dataset_size + n_val, self.o.seed + REFINE_SEED_OFFSET)
        means = self.encode_images(vae, images)  # the decoder's input, and (scaled) the sampler's
        pipe = Text2Image(model=self.save, jit_compile=self.o.jit_compile)
        t0 = time.time()
        latents = image_to_image_latents(pipe, means * np.float32(scaling), captions, strengths,
                                         seed=self.o.seed) / np.float32(scaling)
        rng = np.random.Generator(np.random.PCG64([self.o.seed, REFINE_SEED_OFFSET]))
        keep_mean = rng.random(len(images)) < true_fraction
        mixed = np.where(keep_mean[:, None, None, None], means, latents).astype(np.float32)
        self.log(f"[refine] {len(images)} images through image-to-image (strengths {strengths}) in "
                 f"{time.time() - t0:.1f}s; {int(keep_mean[n_val:].sum())} of {self.o.dataset_size} rows keep the "
                 "posterior mean; fine-tuning the decoder")
        self.extra_meta["refine"] = {"pairs_seconds": round(time.time() - t0, 1)}
        keras.utils.set_random_seed(self.o.seed + 3)
        with self.strategy.scope():
            trainer = DecoderTrainer(vae, seed=self.o.seed, ema_decay=self.o.ema_decay)
        self.fit_stage("refine", trainer, (mixed[n_val:], images[n_val:]), (latents[:n_val], images[:n_val]),
                  resume=action == "resume")

    def lora_path(self):
        """Where the LoRA file goes: FOLDER/<FOLDER's name>.safetensors (its stem is the name a
        `<lora:NAME:SCALE>` prompt tag uses)."""
        name = os.path.basename(os.path.normpath(os.path.abspath(self.save))) or "lora"
        return os.path.join(self.save, f"{name}.safetensors")

    def train_lora(self):
        """The LoRA stage: factors on the base model's attention projections (`training.lora`),
        trained with the UNet stage's loss on the data folder's latents (posterior mean x the
        base VAE's scaling factor, encoded once), the base networks frozen. Writes the kohya
        `.safetensors` of the EMA factors (`lora_path`); returns its path."""
        from diffusion_tf import schedulers
        from diffusion_tf.components import load_folder

        action = self.actions["lora"]
        path = checkpoint_path(self.save, "lora")
        folder = base_folder(self.o.base)
        data = scan_folder(self.o.data)
        digest = model_digest(folder)
        with self.strategy.scope():
            parts = load_folder(folder)
        config = parts["config"]
        self.configs = {k: config[k] for k in ("vae", "text_encoder", "unet")}
        self.tokenizer = parts["tokenizer"]
        unet, text_encoder, vae = parts["unet"], parts["text_encoder"], parts["vae"]
        prediction = config["scheduler"].get("prediction_type", "epsilon")
        size = unet.sample_size * vae.downsampling_factor
        self.extra_meta["lora"] = {"prediction": prediction, "data_digest": data.digest, "base_digest": digest,
                                   "base_folder": os.path.abspath(folder), "images": len(data.items),
                                   "rows": int(len(data.rows)), "resolution": size}
        if action == "done":
            self.histories["lora"] = stored_history(path)
            self.log(f"[lora] already trained for {read_checkpoint_meta(path)['epoch']} epochs "
                     f"(epochs={self.o.epochs}): writing {self.lora_path()} from {path}")
            network = self._lora_network(unet, text_encoder)
            values = read_checkpoint_arrays(path, "ema/lora")
            assign_state(network, values, f"{path} [ema/lora]")
            return self._write_lora(network, None, data, folder, digest, size, prediction)
        t0 = time.time()
        images = load_images(data, size)
        scaling = float(vae.scaling_factor)
        latents = self.encode_images(vae, images) * np.float32(scaling)
        captions = [item.caption for item in data.items]
        ids = tokenize(self.tokenizer, captions)
        self.log(f"[lora] {len(data.items)} images ({len(data.rows)} rows with repeats) from {data.folder}, "
                 f"{size}x{size}, encoded to latents {latents.shape[1:]} in {time.time() - t0:.1f}s"
                 + (f"; skipped subfolders (not N_name): {', '.join(data.skipped)}" if data.skipped else ""))
        batch = self.o.batch_size
        rng = self.val_rng("lora")
        fixed = np.arange(batch) % len(data.items)  # a fixed batch of the training images
        val_t = rng.integers(0, int(config["scheduler"]["num_train_timesteps"]), batch).astype(np.int32)
        val_noise = rng.standard_normal((batch,) + latents.shape[1:], np.float32)
        noise_schedule = schedulers.get("ddpm", **config["scheduler"])
        uncond = np.asarray(self.tokenizer([""]), np.int32)[0]
        with self.strategy.scope():
            network = self._lora_network(unet, text_encoder)
            trainer = LoraTrainer(network, unet, text_encoder, noise_schedule, uncond, prediction_type=prediction,
                                  cfg_drop=self.o.cfg_drop, seed=self.o.seed, ema_decay=self.o.ema_decay)
        self.log(f"[lora] rank {network.rank}, alpha {network.alpha:g} on {len(network.targets)} layers of "
                 f"{folder} ({sum(int(np.prod(v.shape)) for v in network.trainable_variables)} parameters)")
        try:
            self.fit_stage("lora", trainer, (latents, ids), ((latents[fixed], ids[fixed]), (val_t, val_noise)),
                           resume=action == "resume", rows=data.rows)
        finally:
            trainer.detach()
        self.log(f"[lora] checkpoint: {path}")
        return self._write_lora(network, trainer.ema.average_of, data, folder, digest, size, prediction)

    def _lora_network(self, unet, text_encoder):
        targets = lora_targets({"unet": unet, "text_encoder": text_encoder}, ff=self.o.lora_ff,
                               conv=self.o.lora_conv, text_encoder=self.o.lora_text_encoder)
        return LoraNetwork(targets, self.o.rank, self.o.alpha, seed=self.o.seed)

    def _write_lora(self, network, values, data, folder, digest, size, prediction):
        """The kohya file of the factors (`values`: the EMA, or None: the network's own values)."""
        out = self.lora_path()
        steps = self.o.epochs * self.o.steps
        name = os.path.basename(os.path.normpath(str(self.o.base))) if os.path.isdir(str(self.o.base)) else self.o.base
        metadata = kohya_metadata(network, self.o, data, name, digest, size, steps, self.o.epochs, prediction,
                                  os.path.splitext(os.path.basename(out))[0])
        sha = write_lora_file(out, network.tensors(values), metadata, dtype=self.o.weights_dtype)
        self.log(f"[lora] wrote {out} ({os.path.getsize(out) / 1e3:.1f} kB, {self.o.weights_dtype}; "
                 f"hash {sha[:12]})")
        return out

    def _unet_trainer(self):
        from diffusion_tf.schedulers.scheduler import Scheduler

        sched = scheduler_config(self.o)
        noise_schedule = Scheduler(
            num_train_timesteps=sched["num_train_timesteps"], beta_start=sched["beta_start"],
            beta_end=sched["beta_end"], beta_schedule=sched["beta_schedule"],
            prediction_type=sched["prediction_type"],
        )
        uncond = np.asarray(self.tokenizer([""]), np.int32)[0]
        keras.utils.set_random_seed(self.o.seed + 1)
        with self.strategy.scope():
            text_encoder = build_model("text_encoder", self.configs["text_encoder"])
            unet = build_model("unet", self.configs["unet"])
            trainer = DiffusionTrainer(
                unet, text_encoder, noise_schedule, uncond, prediction_type=self.o.prediction,
                cfg_drop=self.o.cfg_drop, seed=self.o.seed, ema_decay=self.o.ema_decay,
                high_noise_steps=self.o.position_steps, high_noise_t_min=self.o.position_t_min,
            )
        return trainer

    def adherence(self, trainer):
        """Scores of `diffusion_tf.shapes.judge` for the trainer's EMA weights on `eval_prompts` prompts
        (the generation defaults; one pipeline, built once, whose weights are reassigned)."""
        from diffusion_tf.pipeline.text_to_image import Text2Image

        if self._eval_pipe is None:
            from diffusion_tf.model_folder import write_folder

            folder = os.path.join(self.save, ".eval_model")
            models = {"vae": self._vae, "unet": trainer.unet, "text_encoder": trainer.text_encoder}
            write_folder(folder, self.folder_config(), models, dtype="float32", overwrite=True)
            self._eval_pipe = Text2Image(model=folder, jit_compile=self.o.jit_compile)
        pipe = self._eval_pipe
        for name in ("unet", "text_encoder"):
            model = trainer.components[name]
            assign_state(getattr(pipe, name), keras_state(model, trainer.ema.average_of), f"EMA {name}")
        prompts = shapes.sample_prompts(self.o.eval_prompts, self.o.seed + EVAL_SEED_OFFSET)
        images = generate_images(
            prompts, seed=self.o.seed, batch=min(10, len(prompts)), log=lambda msg: None, pipeline=pipe,
            steps=GENERATION_DEFAULTS["num_steps"], guidance=GENERATION_DEFAULTS["guidance"],
        )
        return score([judge(img, p) for img, p in zip(images, prompts)])
