"""The training recipe: the presets (architectures and each stage's hyperparameters, as
data), every option of a run (`TrainOptions`), their defaults and validation."""

import copy
import dataclasses
import math
import os

import numpy as np

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

STAGES = ("all", "vae", "decoder", "unet", "refine", "lora")
ORDER = ("vae", "decoder", "unet", "refine")  # the stages of "all", in order (not "lora": it fine-tunes a given model)
PREFIXES = {"unet": "", "vae": "vae_", "decoder": "decoder_", "refine": "refine_"}
SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = ("epsilon", "v_prediction")
# beta_start, beta_end at T = 1000 (DDPM; Stable Diffusion); scaled by 1000 / T for another T.
BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (0.0001, 0.02)}
DEFAULT_PROMPT = "a red circle on a blue background"
# What Text2Image and text2image.py use with a trained model unless told otherwise
# (the "defaults" section of its config.json); chosen by `python -m diffusion_tf.eval`.
GENERATION_DEFAULTS = {"num_steps": 25, "guidance": 4.0, "scheduler": "ddim"}
# Options that define a run: a resumed run keeps the checkpoint's values.
RUN_FIELDS = (
    "config", "T", "schedule", "prediction", "seed", "dataset_size", "ema_decay", "warmup",
    "kl_weight", "cfg_drop", "position_steps", "position_t_min", "steps", "lr", "batch_size", "vae_steps", "vae_lr", "vae_batch_size",
    "decoder_steps", "decoder_lr", "decoder_batch_size", "refine_steps", "refine_lr", "refine_batch_size",
)
# The LoRA stage (`--stage lora`): low-rank factors on a given model's attention projections,
# trained on a folder of captioned images. Its defaults (epochs, steps, lr, batch_size, warmup,
# ema_decay) replace the preset's, whose architecture it does not use; rank 8, alpha = rank.
LORA_TRAIN = {"epochs": 10, "steps": 100, "lr": 1e-3, "batch_size": 16, "warmup": 50, "ema_decay": 0.99}
LORA_RANK = 8
LORA_FIELDS = ("base", "data", "rank", "alpha", "lora_ff", "lora_conv", "lora_text_encoder")  # define a LoRA run, as RUN_FIELDS
# Options of the other stages that --stage lora refuses (the base model's own, or not offered).
LORA_REFUSED = {"T": "the base model's", "schedule": "the base model's", "prediction": "the base model's",
                "vae": "the base model's", "position_steps": "not used", "position_t_min": "not used",
                "gif": "not offered", "eval_every": "not offered"}




# ------------------------------------------------------------------ validation
def check_int(name, value, minimum, flag=None, maximum=None):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum
            or (maximum is not None and value > maximum)):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{flag or name}={value!r}; must be an integer {allowed}.")
    return int(value)


def check_float(name, value, low, high, low_open=False, high_open=False):
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name}={value!r}; must be a number in {lo}{low}, {high}{hi}.")
    return float(value)


def check_choice(name, value, allowed):
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
    weights_dtype: str = None  # of the written weights: float16 (a model folder), float32 (a LoRA file)
    verbose: int = 1
    eval_every: int = 0  # UNet stage: judge prompt adherence every N epochs (0: never)
    eval_prompts: int = 50
    # --stage lora
    base: str = None  # the model folder (or "shapes", a preset name) the LoRA is trained on
    data: str = None  # a folder of images with same-named .txt captions (kohya convention)
    rank: int = None  # of the low-rank factors (default LORA_RANK)
    alpha: float = None  # kohya's alpha: the update is alpha / rank * up @ down (default: the rank)
    lora_ff: bool = None  # also the UNet's feed-forward linears (ff.net.0.proj, ff.net.2)
    lora_conv: bool = None  # also the UNet's resnet 3x3 convolutions (conv1, conv2; kohya's LoCon)
    lora_text_encoder: bool = None  # also the text encoder's q/k/v/out_proj

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
        o.stage = check_choice("stage", o.stage, STAGES)
        if o.stage == "lora":
            self._resolve_lora(o)
        else:
            given = [f for f in LORA_FIELDS if getattr(o, f) is not None]
            if given:
                raise ValueError(f"{', '.join('--' + f.replace('_', '-') for f in given)}: only with --stage lora.")
        o.config = check_choice("config", "small" if o.config is None else o.config, tuple(PRESETS))
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
            check_int(prefix + "epochs", getattr(o, prefix + "epochs"), 1)
            check_int(prefix + "steps", getattr(o, prefix + "steps"), 1)
            check_int(prefix + "batch_size", getattr(o, prefix + "batch_size"), 1)
            check_float(prefix + "lr", getattr(o, prefix + "lr"), 0, 1, low_open=True)
        check_int("T", o.T, 2)
        check_int("position_steps", o.position_steps, 0)
        if o.position_t_min is None:
            o.position_t_min = int(round(0.8 * o.T))
        check_int("position_t_min", o.position_t_min, 0, maximum=o.T - 1)
        o.schedule = check_choice("schedule", o.schedule, tuple(SCHEDULES))
        o.prediction = check_choice("prediction", o.prediction, PREDICTIONS)
        check_int("seed", o.seed, 0)
        if o.seed > 2**31 - 1:
            raise ValueError(f"seed={o.seed!r}; must be between 0 and {2**31 - 1}.")
        check_int("dataset_size", o.dataset_size, 1)
        check_int("warmup", o.warmup, 0)
        check_int("gif_steps", o.gif_steps, 1)
        check_int("devices", o.devices, 0)
        check_int("verbose", o.verbose, 0)
        check_int("eval_every", o.eval_every, 0)
        check_int("eval_prompts", o.eval_prompts, 1)
        check_float("ema_decay", o.ema_decay, 0, 1, high_open=True)
        check_float("kl_weight", o.kl_weight, 0, 1)
        check_float("cfg_drop", o.cfg_drop, 0, 1)
        check_float("gif_guidance", o.gif_guidance, 0, 100)
        if o.weights_dtype is None:
            o.weights_dtype = "float32" if o.stage == "lora" else "float16"
        o.weights_dtype = check_choice("weights_dtype", o.weights_dtype, ("float16", "float32"))
        if not isinstance(o.save, (str, os.PathLike)) or not os.fspath(o.save):
            raise ValueError(f"save={o.save!r}; must be a folder path.")
        o.save = os.fspath(o.save)
        if not isinstance(o.gif_prompt, str) or not o.gif_prompt.strip():
            raise ValueError(f"gif_prompt={o.gif_prompt!r}; must be a non-empty string.")
        return o

    @staticmethod
    def _resolve_lora(o):
        """The LoRA stage's own options in place: its defaults for the generic hyperparameters
        (before the preset's would fill them), the rank, alpha and targets, base and data."""
        refused = [f for f in LORA_REFUSED if getattr(o, f) not in (None, False, 0)]
        if refused:
            raise ValueError("--stage lora: " + "; ".join(f"--{f.replace('_', '-')} is {LORA_REFUSED[f]}"
                                                          for f in refused) + ".")
        for key, value in LORA_TRAIN.items():
            if getattr(o, key) is None:
                setattr(o, key, value)
        for field in ("base", "data"):
            value = getattr(o, field)
            if value is None:
                raise ValueError(f"--stage lora needs --{field} "
                                 + ("MODEL_FOLDER (or 'shapes', the built-in model)." if field == "base"
                                    else "FOLDER (images with same-named .txt captions)."))
            if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
                raise ValueError(f"{field}={value!r}; must be a folder path.")
        o.base = normalized_base(o.base)
        o.data = os.path.abspath(os.fspath(o.data))
        o.rank = check_int("rank", LORA_RANK if o.rank is None else o.rank, 1)
        o.alpha = check_float("alpha", float(o.rank) if o.alpha is None else o.alpha, 0, 1e6, low_open=True)
        o.lora_ff, o.lora_conv, o.lora_text_encoder = bool(o.lora_ff), bool(o.lora_conv), bool(o.lora_text_encoder)

    def stage_hparams(self, stage):
        """{"epochs", "steps", "lr", "batch_size"} of `stage` ("vae", "unet", "lora", ...)."""
        prefix = PREFIXES.get(stage, "")  # "lora": the generic fields
        return {k: getattr(self, prefix + k) for k in ("epochs", "steps", "lr", "batch_size")}


def normalized_base(base):
    """A LoRA's base model as a run records it: an existing folder as its absolute path, a
    name ("shapes", a preset) as given."""
    base = os.fspath(base)
    return os.path.abspath(base) if os.path.isdir(base) else base


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

