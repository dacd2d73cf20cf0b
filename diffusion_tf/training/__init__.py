"""Training a small text-to-image latent diffusion model from scratch on the captioned shapes.

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
5. "lora" (not part of "all"): a LoRA for a given model (`--base`, e.g. the built-in
   "shapes"), trained on a folder of images with same-named .txt captions (`--data`, kohya's
   convention, `N_name` subfolders repeated N times): low-rank factors (`--rank`, `--alpha`) on
   the UNet's attention projections (`--lora-ff`, `--lora-text-encoder` add the feed-forward
   and the text encoder's), the base networks frozen, the UNet stage's loss (`lora`,
   `LoraTrainer`). It writes FOLDER/<FOLDER name>.safetensors in kohya's format, which
   `Text2Image.load_lora` and diffusers' `load_lora_weights` read.

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
    FOLDER/checkpoints/lora.h5        --stage lora: its training state (the factors, their EMA, Adam)
    FOLDER/<FOLDER name>.safetensors  --stage lora: the LoRA (EMA factors, kohya keys and ss_* metadata)

Several visible GPUs, or several logical CPU devices, train under
`tf.distribute.MirroredStrategy` (the global batch is split between the replicas).

The modules, each with one job, lowest first (each imports only modules listed before it in
this list): `files` (atomic writes), `options` (presets, TrainOptions, validation),
`imagefolder` (the LoRA stage's captioned-image folder), `checkpoint` (the HDF5 checkpoint
format), `plan` (the resume plan), `data` (batches and tf.data), `trainers` (LR schedule,
EMA, the trainer models), `lora` (LoRA factors, their attachment, the kohya file), `pictures` (loss plot,
frames, GIFs), `vae` (the trained VAE outside a run), `refine` (the refinement stage's
image-to-image latents), `session` (what the stages share: datasets, the fit loop),
`stages` (the stages), `run` (`train`, `TrainingRun`), `cli` (the command line).
`diffusion_tf.train` re-exports their public names.
"""
