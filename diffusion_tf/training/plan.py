"""The resume plan: the options checked against the save folder before anything heavy
runs, and what each stage will do ("new", "resume" or "done")."""

import os

from diffusion_tf.training.checkpoint import checkpoint_path, read_checkpoint_meta
from diffusion_tf.training.options import ORDER, RUN_FIELDS


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
