"""Train a small text-to-image latent diffusion model from scratch on the captioned shapes.

    python -m diffusion_tf.train --save runs/shapes --gif          # VAE, then UNet + text encoder
    python -m diffusion_tf.train --save runs/shapes --resume       # continue after an interruption
    python text2image.py --model runs/shapes --prompt "a red circle on a blue background"

The networks are the Stable Diffusion classes at small sizes (`PRESETS`): an
`AutoencoderKL` (64x64 pixels <-> 16x16x4 latents), a CLIP-style `CLIPTextModel` on
the CLIP tokenizer, and a `UNet2DConditionModel` with cross-attention and
LinearAttention in its self-attention. The stages, in the order of `--stage all`:

1. "vae": the autoencoder alone, L1 reconstruction of a posterior sample plus a small
   KL term (`VAETrainer`).
2. "decoder": the decoder alone on the posterior means, the encoder frozen (`DecoderTrainer`).
3. "unet": the UNet and the text encoder together, the VAE frozen; the dataset is encoded
   once into latents (posterior mean x `scaling_factor`, which is set to 1 / std of those
   latents). DDPM training (`DiffusionTrainer`): t ~ U{0..T-1}, x_t = add_noise(x_0, eps, t),
   MSE between the UNet output and eps (or v); the caption is replaced by "" with
   probability `cfg_drop`, for classifier-free guidance. The first `position_steps` steps
   are a position phase: batches only of captions naming a position and a background,
   t ~ U{position_t_min..T-1}, no caption drop. Where the shape is cannot be seen at high
   noise, so the caption's position words are the only way to lower that loss; without
   this phase the text encoder merges "left" and "right" and the UNet never learns them.
4. "refine": the decoder again, now on the latents the trained UNet produces by
   image-to-image from fresh dataset images, to the images themselves (`train_refine`):
   the UNet rounds square corners, and the decoder learns to undo it.

All are `keras.Model.fit` with a custom `train_step`, Adam with a linear warm-up, and an
exponential moving average of the weights (`EMA`, its decay warming up as
min(decay, (1 + n) / (10 + n))); the EMA weights are the model that is written.

Randomness is counter-based: the batch of global step n is a fixed function of
(seed, n) (epoch permutations of the dataset), and the noise, timesteps and caption
drops of step n are stateless draws keyed by (seed, n, replica). A checkpoint therefore
holds the whole training state: weights, EMA weights, optimizer variables (its
iteration counter included), epoch/step counters, the RNG state (seed, step), the loss
history and the options; `--resume` continues exactly where it stopped.

Output, under `--save FOLDER`:

    FOLDER/config.json, *.weights.h5  the model folder (EMA weights, float16): Text2Image(model=FOLDER)
    FOLDER/checkpoints/vae.h5         training state of each stage, written atomically every epoch
    FOLDER/checkpoints/unet.h5
    FOLDER/loss.png                   loss curves of the stages
    FOLDER/vae_reconstruction.png     dataset images (top) and their VAE reconstructions (bottom)
    FOLDER/forward.gif, reverse.gif   with --gif: the forward (noising) and reverse (sampling) processes

Several visible GPUs, or several logical CPU devices, train under
`tf.distribute.MirroredStrategy` (the global batch is split between the replicas).
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from diffusion_tf.components import build_model
from diffusion_tf.layers import base
from diffusion_tf.schedulers.schedule import model_target
from diffusion_tf.shapes import dataset as shapes
from diffusion_tf.state_dict import named_variables

# ------------------------------------------------------------------ presets (data)
# The architectures are diffusers-style configs; `train` holds each stage's default
# hyperparameters. "small" is the shipped model: 64x64 images, 16x16x4 latents; about
# 5.0M parameters (the text encoder's 49408 x 64 token embedding alone is 3.2M of them;
# UNet 1.1M, VAE 0.65M), 10.3 MB of float16 weight files.
PRESETS = {
    "small": {
        "vae": {
            "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32, 64],
            "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
            "sample_size": 64, "scaling_factor": 1.0, "mid_block_add_attention": False,
        },
        "text_encoder": {
            "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256,
            "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        },
        "unet": {
            "sample_size": 16, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
            "cross_attention_dim": 64, "attention_head_dim": 2, "attention": "linear",
        },
        "train": {
            "dataset_size": 10000, "ema_decay": 0.999, "warmup": 200, "kl_weight": 1e-4, "val_batches": 4,
            "prediction": "v_prediction", "schedule": "linear",
            # The position phase: the first 1200 UNet steps see only captions naming a position
            # and a background, at t >= 800 (README, "Training a small model").
            "position_steps": 1200,
            # 8 x 300 at batch 16 (26 min on 2 cores): the round trip keeps 99.5% of held-out
            # shapes judged right; 3 x 200 at batch 32 kept 81.5% (blurred triangles -> circles).
            "vae": {"epochs": 8, "steps": 300, "lr": 1e-3, "batch_size": 16},
            "decoder": {"epochs": 4, "steps": 250, "lr": 5e-4, "batch_size": 32},
            # 30 x 300 at batch 32 with the position phase: the shipped UNet.
            "unet": {"epochs": 30, "steps": 300, "lr": 1e-3, "batch_size": 32},
            # After the UNet: the decoder fine-tuned on the UNet's own image-to-image latents
            # (README, "Training a small model"): squares keep their corners. 8 x 250 steps:
            # the shipped model (99% on the 100 prompts of seed 0, 92.2% on 500).
            "refine": {"epochs": 8, "steps": 250, "lr": 5e-4, "batch_size": 32},
            "refine_strengths": [0.2, 0.3, 0.4, 0.5, 0.6], "refine_true_fraction": 0.25,
        },
    },
    # For tests: the smallest networks that still make 64x64 images.
    "tiny": {
        "vae": {
            "in_channels": 3, "out_channels": 3, "block_out_channels": [8, 8, 8],
            "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
            "sample_size": 64, "scaling_factor": 1.0, "mid_block_add_attention": False,
        },
        "text_encoder": {
            "vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        },
        "unet": {
            "sample_size": 16, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [16, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "cross_attention_dim": 16, "attention_head_dim": 2, "attention": "linear",
        },
        "train": {
            "dataset_size": 64, "ema_decay": 0.999, "warmup": 0, "kl_weight": 1e-4, "val_batches": 1,
            "vae": {"epochs": 1, "steps": 4, "lr": 2e-3, "batch_size": 8},
            "decoder": {"epochs": 1, "steps": 2, "lr": 2e-3, "batch_size": 8},
            "unet": {"epochs": 1, "steps": 4, "lr": 2e-3, "batch_size": 8},
            "refine": {"epochs": 1, "steps": 2, "lr": 2e-3, "batch_size": 8},
            "refine_strengths": [0.3, 0.6], "refine_true_fraction": 0.25,
        },
    },
}

STAGES = ("all", "vae", "decoder", "unet", "refine")
ORDER = ("vae", "decoder", "unet", "refine")  # the stages of "all", in order
PREFIXES = {"unet": "", "vae": "vae_", "decoder": "decoder_", "refine": "refine_"}
SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = ("epsilon", "v_prediction")
# beta_start, beta_end at T = 1000 (DDPM; Stable Diffusion); scaled by 1000 / T for another T.
BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (0.0001, 0.02)}
DEFAULT_PROMPT = "a red circle on a blue background"
# What Text2Image and text2image.py use with a trained model unless told otherwise
# (the "defaults" section of its config.json); chosen by `python -m diffusion_tf.eval`.
GENERATION_DEFAULTS = {"num_steps": 25, "guidance": 4.0, "scheduler": "ddim"}
CHECKPOINT_FORMAT = "diffusion_tf.train_checkpoint.v1"
EXIT_USAGE = 2
# Options that define a run: a resumed run keeps the checkpoint's values.
RUN_FIELDS = (
    "config", "T", "schedule", "prediction", "seed", "dataset_size", "ema_decay", "warmup",
    "kl_weight", "cfg_drop", "position_steps", "position_t_min", "steps", "lr", "batch_size", "vae_steps", "vae_lr", "vae_batch_size",
    "decoder_steps", "decoder_lr", "decoder_batch_size", "refine_steps", "refine_lr", "refine_batch_size",
)


# ------------------------------------------------------------------ options
def _int(name, value, minimum, flag=None, maximum=None):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum
            or (maximum is not None and value > maximum)):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{flag or name}={value!r}; must be an integer {allowed}.")
    return int(value)


def _float(name, value, low, high, low_open=False, high_open=False):
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name}={value!r}; must be a number in {lo}{low}, {high}{hi}.")
    return float(value)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {', '.join(map(repr, allowed))}.")
    return value


@dataclasses.dataclass
class TrainOptions:
    """Every option of a training run; None means the preset's default (see `resolved`)."""

    save: str = "shapes_model"
    stage: str = "all"
    config: str = None
    epochs: int = None  # the UNet stage (the VAE stage with stage="vae", unless vae_epochs is given)
    steps: int = None
    lr: float = None
    batch_size: int = None
    vae_epochs: int = None  # the VAE stage
    vae_steps: int = None
    vae_lr: float = None
    vae_batch_size: int = None
    decoder_epochs: int = None  # the decoder fine-tuning stage (encoder frozen)
    decoder_steps: int = None
    decoder_lr: float = None
    decoder_batch_size: int = None
    refine_epochs: int = None  # the refinement stage: the decoder fine-tuned on the UNet's samples
    refine_steps: int = None
    refine_lr: float = None
    refine_batch_size: int = None
    T: int = None
    schedule: str = None
    prediction: str = None
    seed: int = None
    dataset_size: int = None
    ema_decay: float = None
    warmup: int = None
    kl_weight: float = None
    cfg_drop: float = None
    position_steps: int = None  # UNet stage: the first steps train on position-naming captions at high noise
    position_t_min: int = None  # ... at t >= this (default 0.8 T)
    gif: bool = False
    gif_steps: int = 50
    gif_prompt: str = DEFAULT_PROMPT
    gif_guidance: float = 5.0
    resume: bool = False
    overwrite: bool = False
    vae: str = None  # a model folder whose VAE the UNet stage uses (instead of checkpoints/vae.h5)
    devices: int = 0  # 0: all GPUs if several, else all logical CPUs if several; 1: one device
    jit_compile: bool = False
    run_eagerly: bool = False  # no tf.function: slow steps but no tracing (tests, debugging)
    deterministic: bool = False
    weights_dtype: str = "float16"
    verbose: int = 1
    eval_every: int = 0  # UNet stage: judge prompt adherence every N epochs (0: never)
    eval_prompts: int = 50

    def canonical(self):
        """A copy where epochs/steps/lr/batch_size always mean the UNet stage's: with
        stage="vae" the generic ones given are the VAE's (unless its vae_* ones are given)."""
        o = copy.copy(self)
        if o.stage in ("vae", "decoder", "refine"):
            prefix = PREFIXES[o.stage]
            for key in ("epochs", "steps", "lr", "batch_size"):
                if getattr(o, prefix + key) is None:
                    setattr(o, prefix + key, getattr(o, key))
                    setattr(o, key, None)
        return o

    def resolved(self):
        """A copy with every None replaced by its default, validated (ValueError naming the value)."""
        o = self.canonical()
        o.stage = _choice("stage", o.stage, STAGES)
        o.config = _choice("config", "small" if o.config is None else o.config, tuple(PRESETS))
        train = PRESETS[o.config]["train"]
        defaults = dict(
            T=1000, schedule=train.get("schedule", "linear"), prediction=train.get("prediction", "epsilon"),
            seed=0, cfg_drop=0.1, position_steps=train.get("position_steps", 0),
            dataset_size=train["dataset_size"], ema_decay=train["ema_decay"],
            warmup=train["warmup"], kl_weight=train["kl_weight"],
        )
        for key, value in defaults.items():
            if getattr(o, key) is None:
                setattr(o, key, value)
        for key in ("epochs", "steps", "lr", "batch_size"):
            for stage, prefix in PREFIXES.items():
                if getattr(o, prefix + key) is None:
                    setattr(o, prefix + key, train[stage][key])
        for prefix in PREFIXES.values():
            _int(prefix + "epochs", getattr(o, prefix + "epochs"), 1)
            _int(prefix + "steps", getattr(o, prefix + "steps"), 1)
            _int(prefix + "batch_size", getattr(o, prefix + "batch_size"), 1)
            _float(prefix + "lr", getattr(o, prefix + "lr"), 0, 1, low_open=True)
        _int("T", o.T, 2)
        _int("position_steps", o.position_steps, 0)
        if o.position_t_min is None:
            o.position_t_min = int(round(0.8 * o.T))
        _int("position_t_min", o.position_t_min, 0, maximum=o.T - 1)
        o.schedule = _choice("schedule", o.schedule, tuple(SCHEDULES))
        o.prediction = _choice("prediction", o.prediction, PREDICTIONS)
        _int("seed", o.seed, 0)
        if o.seed > 2**31 - 1:
            raise ValueError(f"seed={o.seed!r}; must be between 0 and {2**31 - 1}.")
        _int("dataset_size", o.dataset_size, 1)
        _int("warmup", o.warmup, 0)
        _int("gif_steps", o.gif_steps, 1)
        _int("devices", o.devices, 0)
        _int("verbose", o.verbose, 0)
        _int("eval_every", o.eval_every, 0)
        _int("eval_prompts", o.eval_prompts, 1)
        _float("ema_decay", o.ema_decay, 0, 1, high_open=True)
        _float("kl_weight", o.kl_weight, 0, 1)
        _float("cfg_drop", o.cfg_drop, 0, 1)
        _float("gif_guidance", o.gif_guidance, 0, 100)
        o.weights_dtype = _choice("weights_dtype", o.weights_dtype, ("float16", "float32"))
        if not isinstance(o.save, (str, os.PathLike)) or not os.fspath(o.save):
            raise ValueError(f"save={o.save!r}; must be a folder path.")
        o.save = os.fspath(o.save)
        if not isinstance(o.gif_prompt, str) or not o.gif_prompt.strip():
            raise ValueError(f"gif_prompt={o.gif_prompt!r}; must be a non-empty string.")
        return o

    def stage_hparams(self, stage):
        """{"epochs", "steps", "lr", "batch_size"} of `stage` ("vae" or "unet")."""
        prefix = PREFIXES[stage]
        return {k: getattr(self, prefix + k) for k in ("epochs", "steps", "lr", "batch_size")}


def beta_range(schedule, T):
    """(beta_start, beta_end): the T = 1000 values scaled by 1000 / T (as improved DDPM), capped."""
    start, end = BETA_RANGES[schedule]
    scale = 1000.0 / T
    return min(start * scale, 0.5), min(end * scale, 0.999)


def scheduler_config(options):
    """The model folder's "scheduler" section (diffusers DDIM fields)."""
    beta_start, beta_end = beta_range(options.schedule, options.T)
    return {
        "num_train_timesteps": options.T,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "beta_schedule": SCHEDULES[options.schedule],
        "prediction_type": options.prediction,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
    }


# ------------------------------------------------------------------ the save folder
def checkpoint_path(save, stage):
    return os.path.join(save, "checkpoints", f"{stage}.h5")


def read_checkpoint_meta(path):
    """The JSON metadata of a training checkpoint; ValueError if it is not one."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{path!r} is not a diffusion_tf training checkpoint.")
            return json.loads(f.attrs["meta"])
    except ValueError:
        raise
    except Exception as e:  # h5py: OSError/KeyError on damaged files
        raise ValueError(f"training checkpoint {path!r} is corrupt ({type(e).__name__}: {e}).") from None


def plan(options):
    """Checks the options against the save folder before anything heavy runs.

    Returns (resolved options, {stage: "new" | "resume" | "done"}), or raises ValueError:
    --resume without a checkpoint, a new run over existing checkpoints (without --overwrite),
    the UNet stage without a trained VAE, a resumed run whose settings differ.
    """
    given = options.canonical()
    options = options.resolved()
    save = options.save
    stages = ORDER if options.stage == "all" else (options.stage,)
    existing = {s: os.path.isfile(checkpoint_path(save, s)) for s in ORDER}
    actions = {}
    if options.resume:
        if not any(existing[s] for s in stages):
            raise ValueError(
                f"--resume: {save!r} holds no training checkpoint "
                f"({', '.join(os.path.join('checkpoints', s + '.h5') for s in stages)}); "
                "train without --resume first."
            )
        latest = [s for s in ORDER if existing[s]][-1]
        meta = read_checkpoint_meta(checkpoint_path(save, latest))
        stored = meta["options"]
        for field in RUN_FIELDS:
            value = getattr(given, field)
            if value is not None and stored.get(field) is not None and value != stored[field]:
                raise ValueError(
                    f"--resume: {field}={value!r} differs from the checkpoint's {stored[field]!r}; "
                    "a resumed run keeps its settings (only the epochs may change)."
                )
        for field in RUN_FIELDS:
            if stored.get(field) is not None:
                setattr(options, field, stored[field])
        if "position_steps" not in stored:  # a run from before the position phase existed
            options.position_steps = 0
        for field in ("epochs", "vae_epochs", "decoder_epochs", "refine_epochs"):  # the totals: a resumed run may extend them
            if getattr(given, field) is None and stored.get(field) is not None:
                setattr(options, field, stored[field])
        for stage in stages:
            later = ORDER[ORDER.index(stage) + 1:]
            if stage == "vae" and options.stage == "all" and any(existing[s] for s in later):
                actions[stage] = "done"  # a later stage started: the VAE is final
            elif existing[stage]:
                m = read_checkpoint_meta(checkpoint_path(save, stage))
                total = options.stage_hparams(stage)["epochs"]
                actions[stage] = "done" if m["epoch"] >= total else "resume"
            else:
                actions[stage] = "new"
    else:
        clash = [s for s in stages if existing[s]]
        if clash and not options.overwrite:
            raise ValueError(
                f"{save!r} already holds a training checkpoint ({', '.join(clash)}); pass --resume "
                "to continue it, --overwrite to start again, or choose another --save folder."
            )
        actions = {s: "new" for s in stages}
    for stage in ("decoder", "unet"):
        if stage in actions and "vae" not in actions and actions[stage] == "new" and not options.vae:
            if not existing["vae"]:
                raise ValueError(
                    f"--stage {stage} needs a trained VAE: {checkpoint_path(save, 'vae')!r} does not exist; "
                    "train it first (--stage vae) or pass --vae MODEL_FOLDER."
                )
    if options.stage in ("decoder", "refine"):
        # after a finished UNet the model folder is written again with the new decoder; the
        # refinement's data are the UNet's samples, so it needs that UNet
        m = read_checkpoint_meta(checkpoint_path(save, "unet")) if existing["unet"] else None
        if m is not None and m["epoch"] >= m["epochs"]:
            actions["unet"] = "done"
        elif options.stage == "refine":
            state = "does not exist" if m is None else f"is at epoch {m['epoch']} of {m['epochs']}"
            raise ValueError(
                f"--stage refine needs a trained UNet: {checkpoint_path(save, 'unet')!r} {state}; "
                "train it first (--stage unet)."
            )
    if options.vae is not None and not os.path.isfile(os.path.join(options.vae, "vae.weights.h5")):
        raise ValueError(f"vae={options.vae!r} is not a model folder with vae.weights.h5.")
    return options, actions


# ------------------------------------------------------------------ training
class WarmupConstant(keras.optimizers.schedules.LearningRateSchedule):
    """lr * min(1, (step + 1) / warmup): a linear warm-up, then constant."""

    def __init__(self, lr, warmup):
        self.lr = float(lr)
        self.warmup = int(warmup)

    def __call__(self, step):
        if self.warmup <= 0:
            return ops.convert_to_tensor(self.lr, "float32")
        frac = (ops.cast(step, "float32") + 1.0) / float(self.warmup)
        return self.lr * ops.minimum(1.0, frac)

    def get_config(self):
        return {"lr": self.lr, "warmup": self.warmup}


class EMA:
    """Exponential moving average of `variables`, updated inside the train step.

    decay_n = min(decay, (1 + n) / (10 + n)) after n optimizer steps, so that short runs
    are not dominated by the initial weights. The averages are `only_first_replica`
    variables: every replica computes the same value (the weights are mirrored).
    """

    def __init__(self, variables, decay):
        self.variables = list(variables)
        self.decay = float(decay)
        self.averages = [
            keras.Variable(
                ops.convert_to_numpy(v), trainable=False, dtype=v.dtype,
                aggregation="only_first_replica", name=f"ema_{i}",
            )
            for i, v in enumerate(self.variables)
        ]
        self._by_id = {id(v): a for v, a in zip(self.variables, self.averages)}

    def decay_at(self, step):
        n = ops.cast(step, "float32")
        return ops.minimum(self.decay, (1.0 + n) / (10.0 + n))

    def update(self, step):
        """a <- d a + (1 - d) v, written as a -= (1 - d)(a - v)."""
        rate = 1.0 - self.decay_at(step)
        for v, a in zip(self.variables, self.averages):
            a.assign_sub(rate * (a - ops.cast(v, a.dtype)))

    def average_of(self, variable):
        return self._by_id[id(variable)]


def make_optimizer(lr, warmup):
    return keras.optimizers.Adam(learning_rate=WarmupConstant(lr, warmup))


def _num_replicas():
    # Each replica's loss is the mean over its share of the batch and the optimizer sums
    # the replicas' gradients: dividing by the replica count gives the global mean's gradient.
    return tf.distribute.get_strategy().num_replicas_in_sync


def _step_seed(seed, step, salt):
    """A stateless-RNG seed pair unique to (run seed, optimizer step, replica, salt)."""
    ctx = tf.distribute.get_replica_context()
    replica = ctx.replica_id_in_sync_group if ctx is not None else 0
    counter = ops.cast(step, "int64") * 1024 + ops.cast(replica, "int64") * 16 + salt
    return tf.stack([tf.constant(seed, "int64"), counter])


class _Trainer(keras.Model):
    """Common parts: the loss tracker, the explicit variable list and the EMA."""

    def __init__(self, models, seed, ema_decay, **kwargs):
        super().__init__(**kwargs)
        self.components = dict(models)
        self.seed = int(seed)
        self.train_variables = [v for m in models.values() for v in m.trainable_variables]
        self.ema = EMA(self.train_variables, ema_decay)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        # Every variable exists (build_model ran a forward pass); containers that are never
        # called themselves (the text encoder's `text_model`, ...) are diffusion_tf layers whose
        # build() does nothing: mark them built, else Keras under a distribution strategy tries
        # to build the trainer symbolically (and fails: it has no call()).
        for model in models.values():
            for layer in model._flatten_layers():
                if not layer.built and isinstance(layer, (base.Layer, base.Model)):
                    layer.built = True
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker]

    def _minimize(self, compute_loss):
        """One optimizer step on `compute_loss()` (summed over replicas, hence the scaling)."""
        with tf.GradientTape() as tape:
            loss = compute_loss()
            scaled_loss = loss / _num_replicas()
        grads = tape.gradient(scaled_loss, self.train_variables)
        self.optimizer.apply_gradients(zip(grads, self.train_variables))
        self.ema.update(self.optimizer.iterations)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result(), "step_loss": loss}

    def build_optimizer(self):
        self.optimizer.build(self.train_variables)


class VAETrainer(_Trainer):
    """Trains an AutoencoderKL: L1(decode(z), x) + kl_weight * KL(q(z|x) || N(0, I)), z ~ q(z|x).

    Both terms are means over elements. Training batches are uint8 images [B, 64, 64, 3];
    evaluation batches are (images, eps) with the posterior noise given, so that the
    evaluation loss of a fixed batch is a deterministic number.
    """

    def __init__(self, vae, kl_weight=1e-4, seed=0, ema_decay=0.999, **kwargs):
        super().__init__({"vae": vae}, seed, ema_decay, **kwargs)
        self.vae = vae
        self.kl_weight = float(kl_weight)

    def vae_loss(self, images, eps=None, step=None):
        x = ops.cast(images, "float32") / 127.5 - 1.0
        mean, logvar = self.vae.encode_moments(x)
        logvar = ops.clip(ops.cast(logvar, "float32"), -30.0, 20.0)
        mean = ops.cast(mean, "float32")
        if eps is None:
            eps = tf.random.stateless_normal(tf.shape(mean), seed=_step_seed(self.seed, step, 0))
        z = mean + ops.exp(0.5 * logvar) * ops.cast(eps, "float32")
        recon = ops.cast(self.vae.decode(z), "float32")
        rec_loss = ops.mean(ops.abs(recon - x))
        kl = 0.5 * ops.mean(ops.square(mean) + ops.exp(logvar) - 1.0 - logvar)
        return rec_loss + self.kl_weight * kl

    def train_step(self, data):
        return self._minimize(lambda: self.vae_loss(data, step=self.optimizer.iterations))

    def test_step(self, data):
        images, eps = data
        self.loss_tracker.update_state(self.vae_loss(images, eps))
        return {"loss": self.loss_tracker.result()}


class VAEDecoderPart(keras.Model):
    """The decoding half of an AutoencoderKL (post_quant_conv and decoder, the same layers):
    what the decoder stage trains. Its variable names are the VAE's."""

    def __init__(self, vae, **kwargs):
        super().__init__(**kwargs)
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.built = True

    def call(self, latents):  # AutoencoderKL.decode
        return self.decoder(self.post_quant_conv(ops.cast(latents, self.post_quant_conv.compute_dtype)))


class DecoderTrainer(_Trainer):
    """Fine-tunes the VAE's decoder with the encoder frozen: L1(decode(mean(x)), x).

    The latents are the posterior means the UNet is trained on, which do not change, so a
    UNet trained before or after this stage stays valid. Batches are (means, uint8 images).
    """

    def __init__(self, vae, seed=0, ema_decay=0.999, **kwargs):
        part = VAEDecoderPart(vae)
        super().__init__({"decoder": part}, seed, ema_decay, **kwargs)
        self.part = part

    def decoder_loss(self, means, images):
        x = ops.cast(images, "float32") / 127.5 - 1.0
        return ops.mean(ops.abs(ops.cast(self.part(means), "float32") - x))

    def train_step(self, data):
        means, images = data
        return self._minimize(lambda: self.decoder_loss(means, images))

    def test_step(self, data):
        means, images = data
        self.loss_tracker.update_state(self.decoder_loss(means, images))
        return {"loss": self.loss_tracker.result()}


class DiffusionTrainer(_Trainer):
    """Trains a UNet2DConditionModel and a CLIPTextModel to denoise latents (DDPM).

    Training batches are (latents [B, h, w, 4] already times the VAE's scaling factor,
    token ids [B, 77]); t ~ U{0..T-1}, the noise and the caption drops are drawn per step.
    Evaluation batches are ((latents, ids), (t, noise)): a fixed batch gives a deterministic loss.
    `noise_schedule`: a `Scheduler` (its `add_noise` and `alpha_bar` are used).
    `uncond_ids` [77]: the tokens of "", which replace a caption with probability `cfg_drop`.
    `high_noise_steps`, `high_noise_t_min`: the first `high_noise_steps` optimizer steps draw
    t ~ U{high_noise_t_min..T-1} and never drop the caption (the position phase of
    `TrainingRun`: at high noise the caption is all the UNet has to place the shape by).
    """

    def __init__(self, unet, text_encoder, noise_schedule, uncond_ids, prediction_type="epsilon",
                 cfg_drop=0.1, seed=0, ema_decay=0.999, high_noise_steps=0, high_noise_t_min=0, **kwargs):
        super().__init__({"unet": unet, "text_encoder": text_encoder}, seed, ema_decay, **kwargs)
        _choice("prediction_type", prediction_type, PREDICTIONS)
        self.high_noise_steps = _int("high_noise_steps", high_noise_steps, 0)
        self.high_noise_t_min = _int("high_noise_t_min", high_noise_t_min, 0,
                                     maximum=int(noise_schedule.num_train_timesteps) - 1)
        self.unet = unet
        self.text_encoder = text_encoder
        self.noise_schedule = noise_schedule
        self.uncond_ids = np.asarray(uncond_ids, "int32")
        self.prediction_type = prediction_type
        self.cfg_drop = float(cfg_drop)
        self.num_train_timesteps = int(noise_schedule.num_train_timesteps)

    def diffusion_loss(self, latents, ids, t, noise):
        """MSE between the UNet's output on x_t = add_noise(x_0, noise, t) and noise (or v)."""
        x0 = ops.cast(latents, "float32")
        noise = ops.cast(noise, "float32")
        t = ops.cast(t, "int32")
        noisy = self.noise_schedule.add_noise(x0, noise, t)
        a = ops.reshape(self.noise_schedule.alpha_bar(t), (-1, 1, 1, 1))
        target = model_target(self.prediction_type, x0, noise, a)
        context = self.text_encoder(ops.cast(ids, "int32"))
        pred = ops.cast(self.unet(noisy, ops.cast(t, "float32"), context), "float32")
        return ops.mean(ops.square(pred - target))

    def timesteps_and_drops(self, batch, step):
        """(t int32 [batch], drop bool [batch]) of optimizer step `step`: stateless draws."""
        t = tf.random.stateless_uniform(
            [batch], seed=_step_seed(self.seed, step, 1), minval=0,
            maxval=self.num_train_timesteps, dtype="int32",
        )
        drop = tf.random.stateless_uniform([batch], seed=_step_seed(self.seed, step, 3)) < self.cfg_drop
        if self.high_noise_steps:
            high = step < self.high_noise_steps
            t_high = tf.random.stateless_uniform(
                [batch], seed=_step_seed(self.seed, step, 4), minval=self.high_noise_t_min,
                maxval=self.num_train_timesteps, dtype="int32",
            )
            t = tf.where(high, t_high, t)
            drop = tf.logical_and(drop, tf.logical_not(high))
        return t, drop

    def train_step(self, data):
        latents, ids = data
        step = self.optimizer.iterations
        t, drop = self.timesteps_and_drops(tf.shape(latents)[0], step)
        noise = tf.random.stateless_normal(tf.shape(latents), seed=_step_seed(self.seed, step, 2))
        ids = tf.where(drop[:, None], tf.constant(self.uncond_ids)[None, :], ops.cast(ids, "int32"))
        return self._minimize(lambda: self.diffusion_loss(latents, ids, t, noise))

    def test_step(self, data):
        (latents, ids), (t, noise) = data
        self.loss_tracker.update_state(self.diffusion_loss(latents, ids, t, noise))
        return {"loss": self.loss_tracker.result()}


# ------------------------------------------------------------------ data
def batch_indices(n, batch_size, seed, start_step, end_step):
    """int32 [end_step - start_step, batch_size]: dataset indices of global steps start..end-1.

    The stream is the concatenation of permutations of range(n), pass p drawn from
    PCG64([seed, p]); so step s always gets the same batch, however the run is split.
    """
    first, last = start_step * batch_size, end_step * batch_size
    out = np.empty(last - first, np.int64)
    pos = first
    while pos < last:
        p, offset = divmod(pos, n)
        perm = np.random.Generator(np.random.PCG64([seed, p])).permutation(n)
        take = min(n - offset, last - pos)
        out[pos - first: pos - first + take] = perm[offset: offset + take]
        pos += take
    return out.reshape(end_step - start_step, batch_size).astype(np.int32)


def phased_batch_indices(n, batch_size, seed, start_step, end_step, first_steps, first_rows):
    """`batch_indices` whose first `first_steps` global steps draw from `first_rows` only.

    Steps >= first_steps are the usual stream, numbered from first_steps (so the
    main phase sees whole epochs of the dataset)."""
    first_rows = np.asarray(first_rows, np.int64)
    parts = []
    mid = min(max(start_step, first_steps), end_step)
    if start_step < mid:
        parts.append(first_rows[batch_indices(len(first_rows), batch_size, seed, start_step, mid)].astype(np.int32))
    if mid < end_step:
        parts.append(batch_indices(n, batch_size, seed, mid - first_steps, end_step - first_steps))
    return np.concatenate(parts) if parts else np.zeros((0, batch_size), np.int32)


def make_tf_dataset(arrays, indices):
    """A tf.data pipeline yielding the rows `idx` of `arrays` for each row of `indices`.

    `arrays` is one array, or a (nested) tuple of them; the batches have its structure."""
    tensors = tf.nest.map_structure(tf.constant, arrays)

    def gather(idx):
        return tf.nest.map_structure(lambda t: tf.gather(t, idx), tensors)

    ds = tf.data.Dataset.from_tensor_slices(indices).map(gather)
    return ds.prefetch(2)


def tokenize(tokenizer, captions):
    """int32 [n, context_length]; each distinct caption is tokenized once."""
    unique = sorted(set(captions))
    table = dict(zip(unique, np.asarray(tokenizer(unique), np.int32)))
    return np.stack([table[c] for c in captions])


# ------------------------------------------------------------------ checkpoints
def _keras_state(model, values=None):
    """{key: numpy array, Keras layout} of the model's variables (or of `values`: var -> variable)."""
    out = {}
    for key, (var, _) in named_variables(model).items():
        source = values(var) if values else var
        out[key] = ops.convert_to_numpy(source)
    return out


def _assign_state(model, state, source, values=None):
    variables = named_variables(model)
    if set(variables) != set(state):
        raise ValueError(f"{source} does not fit {type(model).__name__} (another architecture?).")
    for key, (var, _) in variables.items():
        target = values(var) if values else var
        if tuple(target.shape) != tuple(state[key].shape):
            raise ValueError(f"{source}: {key} has shape {state[key].shape}, expected {tuple(target.shape)}.")
    for key, (var, _) in variables.items():
        (values(var) if values else var).assign(state[key])


def _atomic_path(path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def _publish(tmp, path):
    """Renames `tmp` onto `path` (atomic) with the usual permissions (mkstemp makes 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_checkpoint(path, trainer, meta, extra_arrays=None):
    """Everything `restore_checkpoint` needs, written to a temp file and renamed into place."""
    import h5py

    tmp = _atomic_path(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = CHECKPOINT_FORMAT
            f.attrs["meta"] = json.dumps(meta)
            for name, model in trainer.components.items():
                for group, values in (("weights", None), ("ema", trainer.ema.average_of)):
                    g = f.require_group(f"{group}/{name}")
                    for key, value in _keras_state(model, values).items():
                        g.create_dataset(key, data=value)
            g = f.create_group("optimizer")
            for i, var in enumerate(trainer.optimizer.variables):
                d = g.create_dataset(f"{i:05d}", data=ops.convert_to_numpy(var))
                d.attrs["path"] = var.path
            for key, value in (extra_arrays or {}).items():
                f.create_dataset(key, data=value)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_checkpoint_arrays(path, group):
    import h5py

    with h5py.File(path, "r") as f:
        return {k: f[group][k][()] for k in f[group].keys()} if group in f else {}


def restore_checkpoint(path, trainer):
    """Assigns weights, EMA weights and optimizer variables; returns the metadata."""
    import h5py

    meta = read_checkpoint_meta(path)
    with h5py.File(path, "r") as f:
        for name, model in trainer.components.items():
            weights = {k: v[()] for k, v in f[f"weights/{name}"].items()}
            ema = {k: v[()] for k, v in f[f"ema/{name}"].items()}
            _assign_state(model, weights, f"{path} [weights/{name}]")
            _assign_state(model, ema, f"{path} [ema/{name}]", trainer.ema.average_of)
        stored = f["optimizer"]
        variables = trainer.optimizer.variables
        if len(stored) != len(variables):
            raise ValueError(f"{path}: {len(stored)} optimizer variables, the optimizer has {len(variables)}.")
        for i, var in enumerate(variables):
            value = stored[f"{i:05d}"][()]
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"{path}: optimizer variable {var.path} has shape {value.shape}.")
            var.assign(value)
    return meta


# ------------------------------------------------------------------ callbacks
class _StageCallback(keras.callbacks.Callback):
    """Records the per-step and evaluation losses, checkpoints after every epoch, redraws loss.png."""

    def __init__(self, run, stage, trainer, history):
        super().__init__()
        self.run, self.stage, self.trainer, self.history = run, stage, trainer, history
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
        if self.stage == "unet" and every and (epoch + 1) % every == 0:
            t0 = time.time()
            scores = self.run.adherence(self.trainer)
            self.history["adherence"].append([epoch + 1] + [scores[k] for k in ADHERENCE_KEYS])
            self.run.log(
                f"[unet] epoch {epoch + 1}: prompt adherence {100 * scores['all']:.0f}% ("
                + ", ".join(f"{k} {100 * scores[k]:.0f}%" for k in ADHERENCE_KEYS[1:])
                + f"; {scores['n']} prompts, {time.time() - t0:.0f}s)"
            )
        self.run.save_checkpoint(self.stage, self.trainer, epoch + 1, self.history)


# ------------------------------------------------------------------ the run
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


def _empty_history():
    # loss: every step; epoch_loss: the mean of each epoch; val_loss: the loss of a fixed
    # held-out batch (fixed noise and timesteps) before training and after every epoch.
    # adherence: rows (epoch, all, color, shape, position, background) of the --eval-every judging.
    return {"loss": [], "epoch_loss": [], "val_loss": [], "adherence": [], "seconds": 0.0}


def stored_history(path):
    arrays = read_checkpoint_arrays(path, "history")
    meta = read_checkpoint_meta(path)
    history = _empty_history()
    for key in ("loss", "epoch_loss", "val_loss"):
        history[key] = [float(x) for x in arrays.get(key, [])]
    history["adherence"] = [[float(x) for x in row] for row in arrays.get("adherence", [])]
    history["seconds"] = float(meta.get("train_seconds", 0.0))
    return history


def models_from_checkpoint(path, configs, components, group="ema"):
    """Fresh networks holding a checkpoint's EMA (or raw) weights."""
    out = {}
    for name in components:
        model = build_model(name, configs[name])
        _assign_state(model, read_checkpoint_arrays(path, f"{group}/{name}"), f"{path} [{group}/{name}]")
        out[name] = model
    return out


def load_vae_from(source):
    """The AutoencoderKL of `source`: a model folder (config.json + vae.weights.h5), a
    training run's --save folder (its checkpoints/vae.h5) or such a checkpoint file (EMA
    weights). ValueError naming the path when it is none of these."""
    from diffusion_tf.state_dict import load_weights

    path = os.fspath(source)
    if os.path.isfile(os.path.join(path, "vae.weights.h5")) and os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            vae = build_model("vae", json.load(f)["vae"])
        load_weights(vae, os.path.join(path, "vae.weights.h5"))
        return vae
    checkpoint = path if os.path.isfile(path) else checkpoint_path(path, "vae")
    if os.path.isfile(checkpoint):
        return models_from_checkpoint(checkpoint, read_checkpoint_meta(checkpoint)["configs"], ["vae"])["vae"]
    raise ValueError(
        f"{path!r} is not a model folder (config.json and vae.weights.h5), a training --save folder "
        "with checkpoints/vae.h5, or a VAE training checkpoint."
    )


def vae_roundtrip(vae, images, batch=100):
    """uint8 images [n, h, w, 3] -> uint8 decode(encode(images)) (posterior means, no sampling),
    `batch` images per call."""
    out = []
    for b in range(0, len(images), batch):
        x = ops.cast(images[b:b + batch], "float32") / 127.5 - 1.0
        out.append(_to_uint8(ops.convert_to_numpy(ops.cast(vae.decode(vae.encode(x)), "float32"))))
    return np.concatenate(out, axis=0)


VAL_SEED_OFFSET = 1_000_003  # the held-out evaluation shapes come from seed + this
# --eval-every draws its prompts with seed + this (not `python -m diffusion_tf.eval`'s default seed 0).
EVAL_SEED_OFFSET = 7_000_001
REFINE_SEED_OFFSET = 5_000_011  # the refinement stage's images come from seed + this
ADHERENCE_KEYS = ("all", "color", "shape", "position", "background")


class TrainingRun:
    """One `train` call: the folder, the dataset, the stages and the outputs."""

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
        self._extra_meta = {}
        self._extra_arrays = {}
        self._eval_pipe = None
        self._vae = None

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

    def _val_size(self, stage):
        """The held-out evaluation set: `val_batches` batches of the stage's batch size."""
        return PRESETS[self.o.config]["train"]["val_batches"] * self.o.stage_hparams(stage)["batch_size"]

    def _val_rng(self, stage):
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
        meta.update(self._extra_meta.get(stage, {}))
        return meta

    def save_checkpoint(self, stage, trainer, epoch, history):
        arrays = {f"history/{k}": np.asarray(history[k], np.float32) for k in ("loss", "epoch_loss", "val_loss")}
        arrays["history/adherence"] = np.asarray(history["adherence"], np.float32).reshape(-1, 1 + len(ADHERENCE_KEYS))
        arrays.update(self._extra_arrays.get(stage, {}))
        write_checkpoint(checkpoint_path(self.save, stage), trainer, self._meta(stage, epoch, history), arrays)
        self.histories[stage] = history
        self.write_loss_plot()

    # -------------------------------------------------------------- stages
    def _fit(self, stage, trainer, arrays, val_arrays, resume, first=(0, ())):
        """Builds the optimizer, restores the checkpoint when resuming, and runs fit.

        `first` = (steps, rows): the first `steps` global steps draw their batches from `rows` only."""
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
        history, start = _empty_history(), 0
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
        indices = phased_batch_indices(  # = batch_indices when first is (0, ())
            len(tf.nest.flatten(arrays)[0]), h["batch_size"], self.o.seed, start * h["steps"],
            h["epochs"] * h["steps"], *first,
        )
        self.log(
            f"[{stage}] training epochs {start + 1}..{h['epochs']} x {h['steps']} steps, batch {h['batch_size']}, "
            f"lr {h['lr']}, {replicas} replica(s); held-out loss {history['val_loss'][-1]:.4f}"
        )
        trainer.fit(
            make_tf_dataset(arrays, indices), epochs=h["epochs"], initial_epoch=start, steps_per_epoch=h["steps"],
            validation_data=val_ds, validation_steps=val_steps,
            callbacks=[_StageCallback(self, stage, trainer, history)], verbose=self.o.verbose, shuffle=False,
        )
        self.log(f"[{stage}] held-out loss {history['val_loss'][0]:.4f} -> {history['val_loss'][-1]:.4f}, "
                 f"{history['seconds']:.0f}s of training")
        return history

    def train_vae(self):
        action = self.actions["vae"]
        path = checkpoint_path(self.save, "vae")
        if action == "done":
            self.histories["vae"] = stored_history(path)
            return
        images, _, _ = self.dataset()
        val_images, _, _ = self.dataset(held_out=True, n=self._val_size("vae"))
        cfg = self.configs["vae"]
        side = cfg["sample_size"] // 2 ** (len(cfg["block_out_channels"]) - 1)
        eps = self._val_rng("vae").standard_normal(
            (len(val_images), side, side, cfg["latent_channels"]), np.float32)
        keras.utils.set_random_seed(self.o.seed)
        with self.strategy.scope():
            vae = build_model("vae", cfg)
            trainer = VAETrainer(vae, kl_weight=self.o.kl_weight, seed=self.o.seed, ema_decay=self.o.ema_decay)
        self._fit("vae", trainer, images, (val_images, eps), resume=action == "resume")
        final = models_from_checkpoint(path, self.configs, ["vae"])["vae"]
        self.write_reconstructions(final, val_images[:8])
        self.log(f"[vae] checkpoint: {path}")

    def load_vae(self, decoder=True, refine=True):
        """The trained VAE (EMA weights), with the fine-tuned decoder of checkpoints/decoder.h5
        when there is one (and `decoder`), then the refined one of checkpoints/refine.h5 when
        there is one (and `refine`)."""
        vae = self._load_vae()
        for stage, wanted in (("decoder", decoder), ("refine", decoder and refine)):
            path = checkpoint_path(self.save, stage)
            if wanted and os.path.isfile(path):
                _assign_state(VAEDecoderPart(vae), read_checkpoint_arrays(path, "ema/decoder"), f"{path} [ema/decoder]")
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

    def train_decoder(self):
        action = self.actions["decoder"]
        path = checkpoint_path(self.save, "decoder")
        if action == "done":
            self.histories["decoder"] = stored_history(path)
            return
        vae = self.load_vae(decoder=False)
        images, _, _ = self.dataset()
        val_images, _, _ = self.dataset(held_out=True, n=self._val_size("decoder"))
        t0 = time.time()
        means, val_means = self.encode_images(vae, images), self.encode_images(vae, val_images)
        self.log(f"[decoder] encoded {len(images)} images in {time.time() - t0:.1f}s; fine-tuning the decoder")
        keras.utils.set_random_seed(self.o.seed + 2)
        with self.strategy.scope():
            trainer = DecoderTrainer(vae, seed=self.o.seed, ema_decay=self.o.ema_decay)
        self._fit("decoder", trainer, (means, images), (val_means, val_images), resume=action == "resume")
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
            self._extra_meta["unet"] = {"scaling_factor": scaling}
            self._extra_arrays["unet"] = {f"frozen/vae/{k}": v for k, v in _keras_state(vae).items()}
            latents = means * np.float32(scaling)
            val_images, _, val_ids = self.dataset(held_out=True, n=self._val_size("unet"))
            rng = self._val_rng("unet")
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
            self._fit("unet", trainer, (latents, ids), ((val_latents, val_ids), (val_t, val_noise)),
                      resume=action == "resume", first=first)
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
        from diffusion_tf.text2image import Text2Image

        train = PRESETS[self.o.config]["train"]
        strengths, true_fraction = train["refine_strengths"], train["refine_true_fraction"]
        vae = self.load_vae(refine=False)
        n_val = self._val_size("refine")
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
        self._extra_meta["refine"] = {"pairs_seconds": round(time.time() - t0, 1)}
        keras.utils.set_random_seed(self.o.seed + 3)
        with self.strategy.scope():
            trainer = DecoderTrainer(vae, seed=self.o.seed, ema_decay=self.o.ema_decay)
        self._fit("refine", trainer, (mixed[n_val:], images[n_val:]), (latents[:n_val], images[:n_val]),
                  resume=action == "resume")

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
        """Scores of `diffusion_tf.eval` for the trainer's EMA weights on `eval_prompts` prompts
        (the generation defaults; one pipeline, built once, whose weights are reassigned)."""
        from diffusion_tf import eval as judging
        from diffusion_tf.text2image import Text2Image

        if self._eval_pipe is None:
            from diffusion_tf.model_folder import write_folder

            folder = os.path.join(self.save, ".eval_model")
            models = {"vae": self._vae, "unet": trainer.unet, "text_encoder": trainer.text_encoder}
            write_folder(folder, self.folder_config(), models, dtype="float32", overwrite=True)
            self._eval_pipe = Text2Image(model=folder, jit_compile=self.o.jit_compile)
        pipe = self._eval_pipe
        for name in ("unet", "text_encoder"):
            model = trainer.components[name]
            _assign_state(getattr(pipe, name), _keras_state(model, trainer.ema.average_of), f"EMA {name}")
        prompts = shapes.sample_prompts(self.o.eval_prompts, self.o.seed + EVAL_SEED_OFFSET)
        images = judging.generate_images(
            prompts, seed=self.o.seed, batch=min(10, len(prompts)), log=lambda msg: None, pipeline=pipe,
            steps=GENERATION_DEFAULTS["num_steps"], guidance=GENERATION_DEFAULTS["guidance"],
        )
        return judging.score([judging.judge(img, p) for img, p in zip(images, prompts)])

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

    def write_model(self, models):
        """The model folder (EMA weights) into --save, file by file (each rename atomic), config.json last."""
        from diffusion_tf.model_folder import write_folder

        tmp = os.path.join(self.save, ".model.tmp")
        write_folder(tmp, self.folder_config(), models, dtype=self.o.weights_dtype, overwrite=True)
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        for name in names:
            _publish(os.path.join(tmp, name), os.path.join(self.save, name))
        os.rmdir(tmp)
        return sum(os.path.getsize(os.path.join(self.save, n)) for n in names)

    def write_loss_plot(self):
        titles = {"vae": "VAE: L1 + KL", "decoder": "VAE decoder fine-tuning: L1",
                  "refine": "VAE decoder on the UNet's image-to-image latents: L1",
                  "unet": f"UNet + text encoder: MSE ({self.o.prediction})"}
        panels = []
        for stage in ORDER:
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
        _save_image(image, os.path.join(self.save, "vae_reconstruction.png"))

    def write_gifs(self):
        from diffusion_tf.text2image import Text2Image

        images, captions, _ = self.dataset()
        with open(os.path.join(self.save, "config.json"), encoding="utf-8") as f:
            attention = json.load(f)["unet"].get("attention", "standard")
        pipe = Text2Image(model=self.save, attention=attention)
        save_gif(os.path.join(self.save, "forward.gif"),
                 forward_process_frames(pipe, images[0], captions[0], seed=self.o.seed))
        steps = min(self.o.gif_steps, self.o.T)
        frames, _ = reverse_process_frames(pipe, self.o.gif_prompt, steps, self.o.seed, self.o.gif_guidance)
        save_gif(os.path.join(self.save, "reverse.gif"), frames)
        return [os.path.join(self.save, n) for n in ("forward.gif", "reverse.gif")]


def image_to_image_latents(pipe, clean, captions, strengths, seed=0, batch=100):
    """Final latents (sampler space) of image-to-image from each clean latent (sampler space:
    the image's posterior mean x scaling factor) with its caption, at the pipeline's
    generation defaults: row k runs at strength strengths[k % len(strengths)], from the
    noise of seed `seed * 1_000_003 + k`. One compiled function serves every batch."""
    from diffusion_tf import editing

    sched = pipe.scheduler
    steps, guidance = pipe.defaults["num_steps"], float(pipe.defaults["guidance"])
    sched.set_timesteps(steps)
    tables = {k: tf.constant(v) for k, v in sched.tables.items()}
    shape = pipe.latent_shape
    fn = pipe._generate_fn(guidance > 1.0, sched, (), shape[:2])
    out = np.zeros((len(clean),) + tuple(shape), np.float32)
    for j, strength in enumerate(strengths):
        rows = np.arange(j, len(clean), len(strengths))
        start = editing.start_index(steps, strength, sched)
        for b in range(0, len(rows), batch):
            r = rows[b: b + batch]
            if start >= steps:  # strength 0: nothing runs
                out[r] = clean[r]
                continue
            noise = pipe.noise([seed * 1_000_003 + int(k) for k in r], shape)
            x = editing.add_noise_at(sched, tf.constant(clean[r]), noise, start, tables)
            _, lat = fn(tf.constant(pipe.tokenizer([captions[k] for k in r])), tf.constant(pipe.tokenizer([""] * len(r))),
                        x, tables, tf.constant(guidance, "float32"), tf.constant(1.0, "float32"),
                        tf.constant(seed, "int64"), tf.constant(start, "int32"), {})
            out[r] = ops.convert_to_numpy(lat)
    return out


# ------------------------------------------------------------------ pictures (PIL only)
def _save_image(image, path, **kwargs):
    tmp = _atomic_path(path)
    try:
        image.save(tmp, format=os.path.splitext(path)[1][1:].upper(), **kwargs)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _nice_ticks(low, high, count=5):
    """Round tick values (1, 2 or 5 times a power of ten apart) between low and high."""
    span = high - low if high > low else 1.0
    raw = span / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step + 1e-9) + 1)]


def save_loss_plot(path, panels, width=720, panel_height=300):
    """Loss curves drawn with PIL, one panel per (title, per-step losses, [(step, loss)]
    points): a log10 y axis, the raw loss of each step (light blue), its moving average
    (dark blue) and the points (orange dots: the held-out loss before training and after
    each epoch)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    image = Image.new("RGB", (width, panel_height * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, 20, 30, 40
    light, dark, orange = (160, 190, 235), (20, 60, 160), (230, 120, 20)
    for p, (title, losses, points) in enumerate(panels):
        y0 = p * panel_height
        values = np.log10(np.maximum(np.asarray(losses, np.float64), 1e-8))
        logged = [(s, math.log10(max(v, 1e-8))) for s, v in points]
        smooth, acc, k = np.empty_like(values), values[0], (0.02 if len(values) > 50 else 0.2)
        for i, v in enumerate(values):
            acc = acc + k * (v - acc)
            smooth[i] = acc
        every = np.concatenate([values, [v for _, v in logged]])
        lo, hi = float(every.min()), float(every.max())
        pad = max(hi - lo, 1e-3) * 0.05
        lo, hi = lo - pad, hi + pad
        n = len(values)
        box = (left, y0 + top, width - right, y0 + panel_height - bottom)

        def px(step, v):
            return (box[0] + (box[2] - box[0]) * step / max(n, 1),
                    box[3] - (box[3] - box[1]) * (v - lo) / (hi - lo))

        draw.text((left, y0 + 4), title, fill="black", font=font)
        legend = [("per step", light), ("moving average", dark), ("held-out batch", orange)]
        x = width - right - 330
        for label, color in legend:
            draw.line([(x, y0 + 16), (x + 16, y0 + 16)], fill=color, width=3)
            draw.text((x + 20, y0 + 10), label, fill="black", font=font)
            x += 110
        for tick in _nice_ticks(lo, hi):
            _, y = px(0, tick)
            draw.line([(box[0] + 1, y), (box[2] - 1, y)], fill=(232, 232, 232))
            draw.line([(box[0] - 4, y), (box[0], y)], fill="black")
            draw.text((4, y - 6), f"{10 ** tick:.3g}", fill="black", font=font)
        for tick in _nice_ticks(0, n):
            if tick != int(tick):
                continue
            x, _ = px(tick, lo)
            draw.line([(x, box[3]), (x, box[3] + 4)], fill="black")
            draw.text((x - 8, box[3] + 6), f"{int(tick)}", fill="black", font=font)
        draw.rectangle(box, outline="black")
        draw.text(((box[0] + box[2]) // 2 - 12, box[3] + 22), "step", fill="black", font=font)
        draw.text((4, y0 + top - 14), "loss (log)", fill="black", font=font)
        if n > 1:
            draw.line([px(i + 1, v) for i, v in enumerate(values)], fill=light, width=1)
            draw.line([px(i + 1, v) for i, v in enumerate(smooth)], fill=dark, width=2)
        else:
            x, y = px(1, values[0])
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=dark)
        for s, v in logged:
            x, y = px(s, v)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=orange, outline="black")
    _save_image(image, path)


def _frame(panels, lines, scale=3):
    """A GIF frame: the uint8 panels side by side, upscaled, with text lines below."""
    from PIL import Image, ImageDraw, ImageFont

    row = np.concatenate(panels, axis=1)
    img = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
    out = Image.new("RGB", (img.width, img.height + 14 * len(lines) + 6), "white")
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, img.height + 3 + 14 * i), line, fill="black", font=ImageFont.load_default())
    return out


def _to_uint8(x):
    return (np.clip(np.asarray(x, np.float32) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


def forward_process_frames(pipe, image, caption, seed=0, frames=20):
    """q(x_t | x_0) for ~`frames` timesteps from 0 to T-1, with one fixed noise draw: each
    frame shows the training image, and the noisy latent x_t decoded by the VAE."""
    sched = pipe.scheduler
    T = sched.num_train_timesteps
    z0 = pipe.encode(np.asarray(image)[None])
    noise = tf.random.stateless_normal(tf.shape(z0), seed=[seed, 7])
    out = []
    for t in np.unique(np.round(np.linspace(0, T - 1, frames)).astype(int)):
        zt = sched.add_noise(z0, noise, tf.constant([t]))
        decoded = _to_uint8(ops.convert_to_numpy(pipe.decode(zt))[0])
        a = float(sched.alphas_cumprod[t])
        out.append(_frame([np.asarray(image), decoded], [
            f"forward: t = {t} / {T}", f"sqrt(alpha_bar) = {a ** 0.5:.3f}", caption[:60],
        ]))
    return out


def reverse_process_frames(pipe, prompt, steps, seed, guidance=5.0, frames=20):
    """The reverse process, step by step with the pipeline's scheduler and classifier-free
    guidance: each frame shows the decoded x_t and the model's prediction of x_0.
    Returns (frames, the final image uint8 [H, W, 3])."""
    from diffusion_tf.schedulers.schedule import predicted_original_and_noise

    sched = pipe.scheduler
    timesteps = sched.set_timesteps(steps)
    latents = pipe.initial_latents([seed], sched)
    context = pipe.encode_text(["", prompt])
    state = sched.init_state(latents)
    keep = set(np.round(np.linspace(0, len(timesteps) - 1, frames)).astype(int).tolist())
    out = []
    for i, t in enumerate(timesteps):
        x = sched.scale_model_input_at(ops.concatenate([latents, latents], axis=0), i)
        pred = ops.cast(pipe.predict_noise(x, sched.model_timestep(i), context), "float32")
        uncond, cond = ops.split(pred, 2, axis=0)
        pred = uncond + guidance * (cond - uncond) if guidance > 1 else cond
        if i in keep:
            a = float(sched.alphas_cumprod[int(t)])
            x0, _ = predicted_original_and_noise(sched.prediction_type, pred, latents, a)
            panels = [_to_uint8(ops.convert_to_numpy(pipe.decode(z))[0]) for z in (latents, x0)]
            out.append(_frame(panels, [f"reverse: step {i + 1}/{len(timesteps)}, t = {int(t)}",
                                       "left: x_t   right: predicted x_0", prompt[:60]]))
        latents, state = sched.step_fn(pred, i, latents, state)
    final = _to_uint8(ops.convert_to_numpy(pipe.decode(latents))[0])
    out.append(_frame([final, final], ["reverse: done (t = 0)", "the generated image", prompt[:60]]))
    return out, final


def save_gif(path, frames, duration=150, last=1200):
    durations = [duration] * (len(frames) - 1) + [last]
    first = frames[0]
    _save_image(first, path, save_all=True, append_images=frames[1:], duration=durations, loop=0)


# ------------------------------------------------------------------ entry points
def train(options=None, log=print, **kwargs):
    """Runs the stages `options` asks for (a TrainOptions, or its fields as keywords).

    Returns {"save", "model" (the folder or None), "histories", "gifs", "options"}.
    """
    if options is None:
        options = TrainOptions(**kwargs)
    elif kwargs:
        options = dataclasses.replace(options, **kwargs)
    options, actions = plan(options)
    if options.deterministic:
        tf.config.experimental.enable_op_determinism()
    os.makedirs(os.path.join(options.save, "checkpoints"), exist_ok=True)
    if options.overwrite and not options.resume:
        for stage in [s for s, a in actions.items() if a == "new"]:
            if os.path.exists(checkpoint_path(options.save, stage)):
                os.remove(checkpoint_path(options.save, stage))
    stale = checkpoint_path(options.save, "refine")
    retrained = [s for s in ("decoder", "unet") if actions.get(s) in ("new", "resume")]
    if retrained and "refine" not in actions and os.path.exists(stale):
        # a refinement belongs to the decoder it started from and the UNet whose samples it learned
        os.remove(stale)
        log(f"removed {stale}: it refined the previous {' and '.join(retrained)}; run --stage refine again")
    run = TrainingRun(options, actions, log=log)
    result = {"save": options.save, "model": None, "gifs": [], "options": options, "histories": run.histories}
    if "vae" in actions:
        run.train_vae()
    if "decoder" in actions:
        run.train_decoder()
    if "unet" in actions:
        models = run.train_unet()
        run.write_loss_plot()
        size = run.write_model(models)
        if "refine" in actions:  # its image-to-image runs on the model folder just written
            models["vae"] = run.train_refine()
            run.write_loss_plot()
            size = run.write_model(models)
        result["model"] = options.save
        log(f"model written to {options.save} ({size / 1e6:.1f} MB of {options.weights_dtype} weights)")
        if options.gif:
            result["gifs"] = run.write_gifs()
            log(f"GIFs: {', '.join(result['gifs'])}")
        log(f'generate with: python text2image.py --model {options.save} --attention linear '
            f'--prompt "{DEFAULT_PROMPT}"')
    else:
        log(f"VAE checkpoint in {checkpoint_path(options.save, 'vae')}; next: --stage unet --save {options.save}")
    return result


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr, exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser():
    p = _Parser(
        prog="python -m diffusion_tf.train",
        description="Train a small text-to-image latent diffusion model (Stable Diffusion classes) "
        "from scratch on the captioned-shapes dataset.",
    )
    a = p.add_argument
    a("--stage", choices=STAGES, default="all", help="vae, decoder (fine-tune the VAE decoder, encoder frozen), unet (+ text encoder, VAE frozen), refine (the decoder fine-tuned on the trained UNet's image-to-image latents), or all (default: the four in order)")
    a("--config", choices=tuple(PRESETS), default=None, help="architecture preset (default small; tiny for tests)")
    a("--epochs", type=int, help="epochs of the stage trained (the UNet's with --stage all); the total when resuming")
    a("--steps", type=int, help="steps per epoch")
    a("--lr", type=float, help="Adam learning rate (after the warm-up)")
    a("--batch-size", type=int, help="global batch size")
    a("--vae-epochs", type=int, help="with --stage all: epochs of the VAE stage")
    a("--vae-steps", type=int, help="with --stage all: steps per epoch of the VAE stage")
    a("--vae-lr", type=float, help="with --stage all: learning rate of the VAE stage")
    a("--vae-batch-size", type=int, help="with --stage all: batch size of the VAE stage")
    a("--decoder-epochs", type=int, help="with --stage all: epochs of the decoder fine-tuning stage")
    a("--decoder-steps", type=int, help="with --stage all: steps per epoch of the decoder stage")
    a("--decoder-lr", type=float, help="with --stage all: learning rate of the decoder stage")
    a("--decoder-batch-size", type=int, help="with --stage all: batch size of the decoder stage")
    a("--refine-epochs", type=int, help="with --stage all: epochs of the refinement stage (the decoder on the UNet's samples)")
    a("--refine-steps", type=int, help="with --stage all: steps per epoch of the refinement stage")
    a("--refine-lr", type=float, help="with --stage all: learning rate of the refinement stage")
    a("--refine-batch-size", type=int, help="with --stage all: batch size of the refinement stage")
    a("--T", type=int, help="diffusion steps (default 1000)")
    a("--schedule", help="beta schedule: linear (default), scaled_linear or cosine")
    a("--prediction", help="epsilon (default) or v_prediction")
    a("--save", default="shapes_model", help="output folder: model folder, checkpoints/, loss.png, GIFs")
    a("--resume", action="store_true", help="continue the run whose checkpoints are in --save")
    a("--overwrite", action="store_true", help="start again over existing checkpoints in --save")
    a("--vae", help="with --stage unet: take the VAE from this model folder")
    a("--gif", action="store_true", help="write forward.gif and reverse.gif")
    a("--gif-steps", type=int, default=50, help="denoising steps of reverse.gif (default 50)")
    a("--gif-prompt", default=DEFAULT_PROMPT, help="prompt of reverse.gif")
    a("--seed", type=int, help="seed of the dataset, the initial weights and the training noise (default 0)")
    a("--dataset-size", type=int, help="number of captioned shapes generated")
    a("--ema-decay", type=float, help="EMA decay of the weights (default 0.999)")
    a("--warmup", type=int, help="learning-rate warm-up steps")
    a("--kl-weight", type=float, help="weight of the VAE's KL term")
    a("--cfg-drop", type=float, help="probability of training on the empty caption (default 0.1)")
    a("--position-steps", type=int, help="UNet stage: the first N steps train only on captions naming a position "
      "and a background, at high noise, without caption drop (default: the preset's; 0: no position phase)")
    a("--position-t-min", type=int, help="the position phase's lowest timestep (default 0.8 T)")
    a("--devices", type=int, default=0, help="0: every GPU, or every logical CPU, if several (default); 1: one device; N: the first N")
    a("--jit-compile", action="store_true", help="XLA-compile the train step")
    a("--run-eagerly", action="store_true", help="run the train step eagerly (debugging; no tracing)")
    a("--deterministic", action="store_true", help="tf.config.experimental.enable_op_determinism()")
    a("--weights-dtype", choices=("float16", "float32"), default="float16", help="dtype of the written model weights")
    a("--eval-every", type=int, default=0, help="UNet stage: judge prompt adherence (diffusion_tf.eval) every N epochs; 0: never (default)")
    a("--eval-prompts", type=int, default=50, help="prompts judged by --eval-every (default 50)")
    a("--verbose", type=int, default=1, help="Keras fit verbosity: 0 silent, 1 progress bar (default), 2 one line per epoch")
    return p


def options_from_args(args):
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    return TrainOptions(**{k: v for k, v in vars(args).items() if k in fields})


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
        plan(options)
    except ValueError as e:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {e}\n")
    try:
        train(options)
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
