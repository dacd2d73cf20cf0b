"""The machinery every stage of a run shares (`Session`): the device strategy, the
datasets and held-out sets, the fit loop with its per-epoch checkpoint (`StageCallback`),
the trained VAE, the model folder's config, the loss plot and the VAE reconstructions."""

import copy
import dataclasses
import os
import time

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from diffusion_tf.shapes import dataset as shapes
from diffusion_tf.training.checkpoint import (
    assign_state,
    checkpoint_path,
    empty_history,
    models_from_checkpoint,
    read_checkpoint_arrays,
    read_checkpoint_meta,
    restore_checkpoint,
    stored_history,
    write_checkpoint,
)
from diffusion_tf.training.data import make_tf_dataset, phased_batch_indices, tokenize
from diffusion_tf.training.options import GENERATION_DEFAULTS, ORDER, PRESETS, scheduler_config
from diffusion_tf.training.pictures import save_image, save_loss_plot
from diffusion_tf.training.trainers import VAEDecoderPart, make_optimizer
from diffusion_tf.training.vae import load_vae_from, vae_roundtrip

VAL_SEED_OFFSET = 1_000_003  # the held-out evaluation shapes come from seed + this
# --eval-every draws its prompts with seed + this (not `python -m diffusion_tf.eval`'s default seed 0).
EVAL_SEED_OFFSET = 7_000_001
REFINE_SEED_OFFSET = 5_000_011  # the refinement stage's images come from seed + this
ADHERENCE_KEYS = ("all", "color", "shape", "position", "background")


def pick_strategy(devices=0):
    """MirroredStrategy over several GPUs or several logical CPUs; else the default strategy."""
    gpus = tf.config.list_logical_devices("GPU")
    pool = gpus if gpus else tf.config.list_logical_devices("CPU")
    if devices == 1 or (devices == 0 and len(pool) < 2):
        return tf.distribute.get_strategy()
    if devices > len(pool):
        raise ValueError(f"devices={devices}; only {len(pool)} {'GPU' if gpus else 'CPU'} devices are visible.")
    chosen = pool if devices == 0 else pool[:devices]
    return tf.distribute.MirroredStrategy([d.name for d in chosen])


class StageCallback(keras.callbacks.Callback):
    """Records the per-step and evaluation losses, checkpoints after every epoch, redraws loss.png."""

    def __init__(self, run, stage, trainer, history, adherence=None):
        super().__init__()
        self.run, self.stage, self.trainer, self.history = run, stage, trainer, history
        self.adherence = adherence  # trainer -> scores, judged every `eval_every` epochs (the UNet stage)
        self._t0 = None

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.time()

    def on_train_batch_end(self, batch, logs=None):
        self.history["loss"].append(float(logs["step_loss"]))

    def on_epoch_end(self, epoch, logs=None):
        self.history["seconds"] += time.time() - self._t0
        self.history["epoch_loss"].append(float(logs["loss"]))
        if "val_loss" in logs:
            self.history["val_loss"].append(float(logs["val_loss"]))
        every = self.run.o.eval_every
        if self.adherence is not None and every and (epoch + 1) % every == 0:
            t0 = time.time()
            scores = self.adherence(self.trainer)
            self.history["adherence"].append([epoch + 1] + [scores[k] for k in ADHERENCE_KEYS])
            self.run.log(
                f"[unet] epoch {epoch + 1}: prompt adherence {100 * scores['all']:.0f}% ("
                + ", ".join(f"{k} {100 * scores[k]:.0f}%" for k in ADHERENCE_KEYS[1:])
                + f"; {scores['n']} prompts, {time.time() - t0:.0f}s)"
            )
        self.run.save_checkpoint(self.stage, self.trainer, epoch + 1, self.history)


class Session:
    """What the stages of one `train` call share: the options, the folder, the device
    strategy, the datasets, the histories, the fit loop, the trained VAE."""

    def __init__(self, options, actions, log=print):
        from diffusion_tf.clip_tokenizer import CLIPTokenizer

        self.o = options
        self.actions = actions
        self.log = log
        self.save = options.save
        preset = PRESETS[options.config]
        self.configs = {k: copy.deepcopy(preset[k]) for k in ("vae", "text_encoder", "unet")}
        self.histories = {}
        self.strategy = pick_strategy(options.devices)
        self.tokenizer = CLIPTokenizer()
        self._datasets = {}
        self._specs = {}
        self.extra_meta = {}  # {stage: what its checkpoint's metadata adds}
        self.extra_arrays = {}  # {stage: {key: array} its checkpoint adds}
        self._eval_pipe = None  # the UNet stage's: the --eval-every pipeline, built once
        self._vae = None  # ... and the frozen VAE written into that pipeline's folder

    # -------------------------------------------------------------- data
    def dataset(self, held_out=False, n=None):
        """(images, captions, token ids): the training set, or the held-out evaluation set."""
        key = ("val", n) if held_out else "train"
        if key not in self._datasets:
            t0 = time.time()
            seed = self.o.seed + VAL_SEED_OFFSET if held_out else self.o.seed
            images, captions, specs = shapes.make_dataset(n or self.o.dataset_size, seed, return_specs=True)
            self._datasets[key] = (images, captions, tokenize(self.tokenizer, captions))
            self._specs[key] = specs
            if not held_out:
                self.log(f"dataset: {len(images)} captioned shapes (seed {seed}) in {time.time() - t0:.1f}s")
        return self._datasets[key]

    def position_rows(self):
        """Rows of the training set whose captions name a position and a background: the
        data of the position phase."""
        self.dataset()
        rows = [i for i, s in enumerate(self._specs["train"]) if s.position is not None and s.background_named]
        if not rows:
            raise ValueError(f"position_steps={self.o.position_steps}: none of the {self.o.dataset_size} "
                             "training captions names a position and a background; use a larger dataset_size.")
        return np.asarray(rows)

    def val_size(self, stage):
        """The held-out evaluation set: `val_batches` batches of the stage's batch size."""
        return PRESETS[self.o.config]["train"]["val_batches"] * self.o.stage_hparams(stage)["batch_size"]

    def val_rng(self, stage):
        return np.random.Generator(np.random.PCG64([self.o.seed, VAL_SEED_OFFSET, 0 if stage == "vae" else 1]))

    # -------------------------------------------------------------- checkpoints
    def _meta(self, stage, epoch, history):
        h = self.o.stage_hparams(stage)
        meta = {
            "stage": stage,
            "epoch": int(epoch),
            "step": int(epoch) * h["steps"],
            "epochs": h["epochs"],
            "steps_per_epoch": h["steps"],
            "batch_size": h["batch_size"],
            # All training randomness is counter-based: stateless draws keyed by (seed, step).
            "rng": {"kind": "stateless, keyed by (seed, step, replica)", "seed": self.o.seed,
                    "next_step": int(epoch) * h["steps"]},
            "options": dataclasses.asdict(self.o),
            "configs": self.configs,
            "train_seconds": history["seconds"],
            "replicas": self.strategy.num_replicas_in_sync,
        }
        meta.update(self.extra_meta.get(stage, {}))
        return meta

    def save_checkpoint(self, stage, trainer, epoch, history):
        arrays = {f"history/{k}": np.asarray(history[k], np.float32) for k in ("loss", "epoch_loss", "val_loss")}
        arrays["history/adherence"] = np.asarray(history["adherence"], np.float32).reshape(-1, 1 + len(ADHERENCE_KEYS))
        arrays.update(self.extra_arrays.get(stage, {}))
        write_checkpoint(checkpoint_path(self.save, stage), trainer, self._meta(stage, epoch, history), arrays)
        self.histories[stage] = history
        self.write_loss_plot()

    # -------------------------------------------------------------- the fit loop and the VAE
    def fit_stage(self, stage, trainer, arrays, val_arrays, resume, first=(0, ()), adherence=None, rows=None):
        """Builds the optimizer, restores the checkpoint when resuming, and runs fit.

        `first` = (steps, rows): the first `steps` global steps draw their batches from `rows` only.
        `adherence`: trainer -> scores, judged every `eval_every` epochs (`StageCallback`).
        `rows`: the dataset row at each position of the epoch stream (rows repeated for the
        LoRA stage's repeats); default every row once."""
        h = self.o.stage_hparams(stage)
        replicas = self.strategy.num_replicas_in_sync
        if h["batch_size"] % replicas:
            raise ValueError(f"batch_size={h['batch_size']} is not divisible by the {replicas} replicas.")
        with self.strategy.scope():
            trainer.compile(
                optimizer=make_optimizer(h["lr"], self.o.warmup),
                jit_compile=self.o.jit_compile and not self.o.run_eagerly,
                run_eagerly=self.o.run_eagerly,
            )
            trainer.build_optimizer()
        path = checkpoint_path(self.save, stage)
        history, start = empty_history(), 0
        if resume:
            meta = restore_checkpoint(path, trainer)
            start, history = meta["epoch"], stored_history(path)
            step = int(ops.convert_to_numpy(trainer.optimizer.iterations))
            if step != meta["step"]:
                raise ValueError(f"{path}: the optimizer is at step {step}, the checkpoint says {meta['step']}.")
            self.log(f"[{stage}] resuming from {path}: epoch {start}/{h['epochs']}, step {step}")
        self.histories[stage] = history
        if start >= h["epochs"]:
            self.log(f"[{stage}] already trained for {start} epochs (epochs={h['epochs']}): nothing to do")
            return history
        val_steps = len(tf.nest.flatten(val_arrays)[0]) // h["batch_size"]
        val_ds = make_tf_dataset(val_arrays, np.arange(val_steps * h["batch_size"]).reshape(val_steps, -1)).repeat()
        if start == 0:
            before = trainer.evaluate(val_ds, steps=val_steps, verbose=0, return_dict=True)["loss"]
            history["val_loss"] = [float(before)]
        n = len(tf.nest.flatten(arrays)[0]) if rows is None else len(rows)
        indices = phased_batch_indices(  # = batch_indices when first is (0, ())
            n, h["batch_size"], self.o.seed, start * h["steps"], h["epochs"] * h["steps"], *first,
        )
        if rows is not None:
            indices = np.asarray(rows, np.int32)[indices]
        self.log(
            f"[{stage}] training epochs {start + 1}..{h['epochs']} x {h['steps']} steps, batch {h['batch_size']}, "
            f"lr {h['lr']}, {replicas} replica(s); held-out loss {history['val_loss'][-1]:.4f}"
        )
        trainer.fit(
            make_tf_dataset(arrays, indices), epochs=h["epochs"], initial_epoch=start, steps_per_epoch=h["steps"],
            validation_data=val_ds, validation_steps=val_steps,
            callbacks=[StageCallback(self, stage, trainer, history, adherence)], verbose=self.o.verbose, shuffle=False,
        )
        self.log(f"[{stage}] held-out loss {history['val_loss'][0]:.4f} -> {history['val_loss'][-1]:.4f}, "
                 f"{history['seconds']:.0f}s of training")
        return history

    def load_vae(self, decoder=True, refine=True):
        """The trained VAE (EMA weights), with the fine-tuned decoder of checkpoints/decoder.h5
        when there is one (and `decoder`), then the refined one of checkpoints/refine.h5 when
        there is one (and `refine`)."""
        vae = self._load_vae()
        for stage, wanted in (("decoder", decoder), ("refine", decoder and refine)):
            path = checkpoint_path(self.save, stage)
            if wanted and os.path.isfile(path):
                assign_state(VAEDecoderPart(vae), read_checkpoint_arrays(path, "ema/decoder"), f"{path} [ema/decoder]")
        return vae

    def _load_vae(self):
        """The trained VAE (EMA weights): the UNet checkpoint's copy when the UNet stage has
        started (in this run or before: a new stage's old checkpoint is gone, plan() and
        train() see to it), else --vae FOLDER, else checkpoints/vae.h5."""
        unet_ckpt = checkpoint_path(self.save, "unet")
        if "unet" in self.actions and os.path.isfile(unet_ckpt):
            self.configs["vae"] = read_checkpoint_meta(unet_ckpt)["configs"]["vae"]
            return models_from_checkpoint(unet_ckpt, self.configs, ["vae"], group="frozen")["vae"]
        if self.o.vae:  # a model folder (plan() checked)
            vae = load_vae_from(self.o.vae)
            self.configs["vae"] = {k: v for k, v in vae.get_config().items() if k not in ("name", "trainable", "dtype")}
            return vae
        path = checkpoint_path(self.save, "vae")
        self.configs["vae"] = read_checkpoint_meta(path)["configs"]["vae"]
        return models_from_checkpoint(path, self.configs, ["vae"])["vae"]

    @staticmethod
    def encode_images(vae, images, batch=128):
        """Posterior means of the images, float32 [n, h, w, latent_channels] (not scaled); eager
        (a forward pass per batch: nothing to gain from tracing)."""
        out = [
            ops.convert_to_numpy(vae.encode(ops.cast(images[i: i + batch], "float32") / 127.5 - 1.0))
            for i in range(0, len(images), batch)
        ]
        return np.concatenate(out).astype(np.float32)

    # -------------------------------------------------------------- outputs
    def folder_config(self):
        hist = self.histories
        return {
            "text_encoder": self.configs["text_encoder"],
            "unet": self.configs["unet"],
            "vae": self.configs["vae"],
            "scheduler": scheduler_config(self.o),
            "tokenizer": {"pad_token_id": self.tokenizer.pad_token_id, "context_length": self.tokenizer.context_length},
            "source": f"diffusion_tf.train (captioned shapes, config {self.o.config!r})",
            "weights_dtype": self.o.weights_dtype,
            "defaults": dict(GENERATION_DEFAULTS),
            "training": {
                "options": dataclasses.asdict(self.o),
                "train_seconds": {s: round(h["seconds"], 1) for s, h in hist.items()},
                "held_out_loss": {s: (h["val_loss"][-1] if h["val_loss"] else None) for s, h in hist.items()},
                "adherence": [dict(zip(("epoch",) + ADHERENCE_KEYS, row)) for row in hist.get("unet", {}).get("adherence", [])],
            },
        }

    def write_loss_plot(self):
        titles = {"vae": "VAE: L1 + KL", "decoder": "VAE decoder fine-tuning: L1",
                  "refine": "VAE decoder on the UNet's image-to-image latents: L1",
                  "unet": f"UNet + text encoder: MSE ({self.o.prediction})",
                  # its orange dots: a fixed batch of the training images (a LoRA folder has no held-out part)
                  "lora": f"LoRA (rank {self.o.rank}) on {os.path.basename(str(self.o.base))[:16]}: MSE "
                          f"({self.extra_meta.get('lora', {}).get('prediction', '')})"}
        panels = []
        for stage in ORDER + ("lora",):
            h = self.histories.get(stage)
            if h and h["loss"]:
                steps = self.o.stage_hparams(stage)["steps"]
                points = [(e * steps, v) for e, v in enumerate(h["val_loss"])]
                panels.append((titles[stage], h["loss"], points))
        if panels:
            save_loss_plot(os.path.join(self.save, "loss.png"), panels)

    def write_reconstructions(self, vae, images):
        from PIL import Image

        recon = vae_roundtrip(vae, images)
        grid = np.concatenate([np.concatenate(list(images), axis=1), np.concatenate(list(recon), axis=1)], axis=0)
        image = Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST)
        save_image(image, os.path.join(self.save, "vae_reconstruction.png"))
