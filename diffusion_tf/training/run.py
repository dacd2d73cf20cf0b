"""One `train` call (`train`, `TrainingRun`): the folder prepared, the stages in order, then
the model folder (EMA weights), the loss plot and the GIFs."""

import dataclasses
import json
import os

import tensorflow as tf

from diffusion_tf import runtime
from diffusion_tf.training.checkpoint import checkpoint_path
from diffusion_tf.training.files import publish
from diffusion_tf.training.options import DEFAULT_PROMPT, TrainOptions
from diffusion_tf.training.pictures import forward_process_frames, reverse_process_frames, save_gif
from diffusion_tf.training.plan import plan
from diffusion_tf.training.stages import Stages


class TrainingRun(Stages):
    """One `train` call: the folder, the dataset, the stages and the outputs."""

    def write_model(self, models):
        """The model folder (EMA weights) into --save, file by file (each rename atomic), config.json last."""
        from diffusion_tf.model_folder import write_folder

        tmp = os.path.join(self.save, ".model.tmp")
        write_folder(tmp, self.folder_config(), models, dtype=self.o.weights_dtype, overwrite=True)
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        for name in names:
            publish(os.path.join(tmp, name), os.path.join(self.save, name))
        os.rmdir(tmp)
        return sum(os.path.getsize(os.path.join(self.save, n)) for n in names)

    def write_gifs(self):
        from diffusion_tf.pipeline.text_to_image import Text2Image

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


def train(options=None, log=print, **kwargs):
    """Runs the stages `options` asks for (a TrainOptions, or its fields as keywords).

    Returns {"save", "model" (the folder or None), "histories", "gifs", "options"}, and with
    stage="lora" "lora": the path of the written LoRA file (the model folder is not written).
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
    runtime.apply()  # the heap setting of the runtime options, once, before the first step (as load_folder)
    result = {"save": options.save, "model": None, "gifs": [], "options": options, "histories": run.histories}
    if "lora" in actions:
        result["lora"] = run.train_lora()
        run.write_loss_plot()
        log(f'generate with: python text2image.py --model {options.base} --lora {result["lora"]} '
            '--prompt "..."')
        return result
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
