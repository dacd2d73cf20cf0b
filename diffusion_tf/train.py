"""Train a small text-to-image latent diffusion model from scratch on the captioned shapes.

    python -m diffusion_tf.train --save runs/shapes --gif          # VAE, then UNet + text encoder
    python -m diffusion_tf.train --save runs/shapes --resume       # continue after an interruption
    python text2image.py --model runs/shapes --prompt "a red circle on a blue background"
    python -m diffusion_tf.train --stage lora --base shapes --data FOLDER --save runs/lora_x   # a LoRA

A compatibility module: the code is the `diffusion_tf.training` package (its docstring
describes the stages, the checkpoints and the outputs); this module re-exports its public
names (`train`, `TrainOptions`, `main`, `PRESETS`, ...) and runs `main` as a program.
"""

import sys

from diffusion_tf.training.cli import (
    EXIT_USAGE,
    build_parser,
    main,
    options_from_args,
)
from diffusion_tf.training.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_path,
    models_from_checkpoint,
    read_checkpoint_arrays,
    read_checkpoint_meta,
    restore_checkpoint,
    stored_history,
    write_checkpoint,
)
from diffusion_tf.training.data import (
    batch_indices,
    make_tf_dataset,
    phased_batch_indices,
    tokenize,
)
from diffusion_tf.training.imagefolder import DataError, load_images, scan_folder
from diffusion_tf.training.lora import (
    LoraAttachment,
    LoraNetwork,
    LoraTrainer,
    lora_targets,
    write_lora_file,
)
from diffusion_tf.training.options import (
    BETA_RANGES,
    DEFAULT_PROMPT,
    GENERATION_DEFAULTS,
    LORA_TRAIN,
    ORDER,
    PREDICTIONS,
    PREFIXES,
    PRESETS,
    RUN_FIELDS,
    SCHEDULES,
    STAGES,
    TrainOptions,
    beta_range,
    scheduler_config,
)
from diffusion_tf.training.pictures import (
    forward_process_frames,
    reverse_process_frames,
    save_gif,
    save_loss_plot,
)
from diffusion_tf.training.plan import plan
from diffusion_tf.training.refine import image_to_image_latents
from diffusion_tf.training.run import TrainingRun, train
from diffusion_tf.training.session import (
    ADHERENCE_KEYS,
    EVAL_SEED_OFFSET,
    REFINE_SEED_OFFSET,
    VAL_SEED_OFFSET,
    pick_strategy,
)
from diffusion_tf.training.trainers import (
    DecoderTrainer,
    DiffusionTrainer,
    EMA,
    VAEDecoderPart,
    VAETrainer,
    WarmupConstant,
    make_optimizer,
)
from diffusion_tf.training.vae import load_vae_from, vae_roundtrip

__all__ = [
    "ADHERENCE_KEYS",
    "BETA_RANGES",
    "CHECKPOINT_FORMAT",
    "DEFAULT_PROMPT",
    "DataError",
    "DecoderTrainer",
    "DiffusionTrainer",
    "EMA",
    "EVAL_SEED_OFFSET",
    "EXIT_USAGE",
    "GENERATION_DEFAULTS",
    "LORA_TRAIN",
    "LoraAttachment",
    "LoraNetwork",
    "LoraTrainer",
    "ORDER",
    "PREDICTIONS",
    "PREFIXES",
    "PRESETS",
    "REFINE_SEED_OFFSET",
    "RUN_FIELDS",
    "SCHEDULES",
    "STAGES",
    "TrainOptions",
    "TrainingRun",
    "VAEDecoderPart",
    "VAETrainer",
    "VAL_SEED_OFFSET",
    "WarmupConstant",
    "batch_indices",
    "beta_range",
    "build_parser",
    "checkpoint_path",
    "forward_process_frames",
    "image_to_image_latents",
    "load_images",
    "load_vae_from",
    "lora_targets",
    "main",
    "make_optimizer",
    "make_tf_dataset",
    "models_from_checkpoint",
    "options_from_args",
    "phased_batch_indices",
    "pick_strategy",
    "plan",
    "read_checkpoint_arrays",
    "read_checkpoint_meta",
    "restore_checkpoint",
    "reverse_process_frames",
    "save_gif",
    "save_loss_plot",
    "scan_folder",
    "scheduler_config",
    "stored_history",
    "tokenize",
    "train",
    "vae_roundtrip",
    "write_checkpoint",
    "write_lora_file",
]


if __name__ == "__main__":
    sys.exit(main())
