"""The resume plan: the options checked against the save folder before anything heavy
runs, and what each stage will do ("new", "resume" or "done")."""

import copy
import hashlib
import os

from diffusion_tf.training.checkpoint import checkpoint_path, read_checkpoint_meta
from diffusion_tf.training.imagefolder import scan_folder
from diffusion_tf.training.options import LORA_FIELDS, ORDER, RUN_FIELDS, normalized_base

# What a resumed LoRA run keeps from its checkpoint (besides LORA_FIELDS); the epochs may change.
LORA_RUN_FIELDS = ("seed", "ema_decay", "warmup", "cfg_drop", "steps", "lr", "batch_size")


def plan(options):
    """Checks the options against the save folder before anything heavy runs.

    Returns (resolved options, {stage: "new" | "resume" | "done"}), or raises ValueError:
    --resume without a checkpoint, a new run over existing checkpoints (without --overwrite),
    the UNet stage without a trained VAE, a resumed run whose settings differ; for --stage
    lora also a base that is no model folder and a data folder that cannot be used
    (`imagefolder.DataError`), or one that changed since the checkpoint.
    """
    if options.stage == "lora":
        return _plan_lora(options)
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


def base_folder(base):
    """The model folder of a LoRA's base: a folder, "shapes" (the built-in model) or a preset
    already converted; ValueError naming it otherwise."""
    from diffusion_tf.model_folder import read_config
    from diffusion_tf.presets.resolve import resolve_model

    try:
        folder = resolve_model(base, download=False)
    except Exception as e:  # not a folder nor a name; a preset not downloaded
        raise ValueError(f"--base {base!r}: {e}") from None
    read_config(folder)  # ValueError naming the folder when it is not a model folder
    return folder


def model_digest(folder):
    """sha256 of a model folder's config.json and weight files: the base a LoRA belongs to."""
    from diffusion_tf.model_folder import COMPONENTS, weights_path

    h = hashlib.sha256()
    for path in [os.path.join(folder, "config.json")] + [weights_path(folder, c) for c in COMPONENTS]:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _plan_lora(options):
    """plan() for --stage lora: one checkpoint, checkpoints/lora.h5."""
    given = options.canonical()
    path = checkpoint_path(os.fspath(options.save), "lora") if options.save else None
    exists = path is not None and os.path.isfile(path)
    if options.resume:
        if not exists:
            raise ValueError(f"--resume: {options.save!r} holds no LoRA training checkpoint "
                             f"({os.path.join('checkpoints', 'lora.h5')}); train without --resume first.")
        meta = read_checkpoint_meta(path)
        stored = meta["options"]
        if meta.get("stage") != "lora":
            raise ValueError(f"--resume: {path!r} is a checkpoint of stage {meta.get('stage')!r}, not lora.")
        filled = copy.copy(options)
        for field in LORA_FIELDS + LORA_RUN_FIELDS + ("epochs", "weights_dtype"):
            if getattr(given, field) is None and stored.get(field) is not None:
                setattr(filled, field, stored[field])
        resolved = filled.resolved()
        for field in LORA_FIELDS + LORA_RUN_FIELDS:
            value = getattr(given, field)
            if value is None:
                continue
            if field == "base":
                value = normalized_base(value)
            elif field == "data":
                value = os.path.abspath(os.fspath(value))
            elif field == "alpha":
                value = float(value)
            if stored.get(field) is not None and value != stored[field]:
                raise ValueError(
                    f"--resume: {field}={value!r} differs from the checkpoint's {stored[field]!r}; "
                    "a resumed run keeps its settings (only the epochs may change)."
                )
        actions = {"lora": "done" if meta["epoch"] >= resolved.epochs else "resume"}
    else:
        resolved = options.resolved()
        if exists and not options.overwrite:
            raise ValueError(
                f"{resolved.save!r} already holds a LoRA training checkpoint; pass --resume to continue it, "
                "--overwrite to start again, or choose another --save folder."
            )
        actions = {"lora": "new"}
        meta = None
    folder = base_folder(resolved.base)
    data = scan_folder(resolved.data)
    if meta is not None:
        if meta.get("data_digest") not in (None, data.digest):
            raise ValueError(f"--resume: the data folder {resolved.data!r} changed since the checkpoint "
                             "(images, captions or repeats); a resumed run trains on the same data.")
        if meta.get("base_digest") not in (None, model_digest(folder)):
            raise ValueError(f"--resume: the base model {folder!r} changed since the checkpoint.")
    return resolved, actions
