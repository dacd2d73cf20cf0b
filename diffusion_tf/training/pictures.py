"""The run's pictures: the loss plot (drawn with PIL), the frames of the forward and reverse
processes and their GIFs, each written atomically."""

import math
import os

import numpy as np
import tensorflow as tf
from keras import ops

from diffusion_tf.training.files import atomic_file


def save_image(image, path, **kwargs):
    """Saves a PIL image atomically, in the format its extension names."""
    with atomic_file(path) as tmp:
        image.save(tmp, format=os.path.splitext(path)[1][1:].upper(), **kwargs)


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
    save_image(image, path)


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


def to_uint8(x):
    """Model-space values in [-1, 1] -> uint8 pixels (clipped, rounded)."""
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
        a = float(sched.alphas_cumprod[t])
        zt = a**0.5 * z0 + (1 - a) ** 0.5 * noise  # q(x_t | x_0), DDPM eq. 4, at any training timestep
        decoded = to_uint8(ops.convert_to_numpy(pipe.decode(zt))[0])
        out.append(_frame([np.asarray(image), decoded], [
            f"forward: t = {t} / {T}", f"sqrt(alpha_bar) = {a ** 0.5:.3f}", caption[:60],
        ]))
    return out


def reverse_process_frames(pipe, prompt, steps, seed, guidance=5.0, frames=20):
    """The reverse process, step by step with the pipeline's scheduler and classifier-free
    guidance (the one sampling loop, `diffusion_tf.pipeline.sampling`): each frame shows the
    decoded x_t and the model's prediction of x_0. Returns (frames, the final image uint8 [H, W, 3])."""
    from diffusion_tf.pipeline import sampling
    from diffusion_tf.schedulers.noise_schedule import predicted_original_and_noise

    sched = pipe.scheduler
    timesteps = sched.set_timesteps(steps)
    latents = pipe.initial_latents([seed], sched)
    plan = sampling.Plan(sched, guidance=guidance, use_guidance=guidance > 1, seed=seed)
    context = pipe.encode_text(["", prompt] if plan.use_guidance else [prompt])
    state = sched.init_state(latents)
    keep = set(np.round(np.linspace(0, len(timesteps) - 1, frames)).astype(int).tolist())
    out = []
    for i, t in enumerate(timesteps):
        x_t = latents
        latents, state, pred = sampling.denoise_step(pipe.unet, plan, latents, state, i, context)
        if i in keep:
            a = float(sched.alphas_cumprod[int(t)])
            x0, _ = predicted_original_and_noise(sched.prediction_type, pred, x_t, a)
            panels = [to_uint8(ops.convert_to_numpy(pipe.decode(z))[0]) for z in (x_t, x0)]
            out.append(_frame(panels, [f"reverse: step {i + 1}/{len(timesteps)}, t = {int(t)}",
                                       "left: x_t   right: predicted x_0", prompt[:60]]))
    final = to_uint8(ops.convert_to_numpy(pipe.decode(latents))[0])
    out.append(_frame([final, final], ["reverse: done (t = 0)", "the generated image", prompt[:60]]))
    return out, final


def save_gif(path, frames, duration=150, last=1200):
    durations = [duration] * (len(frames) - 1) + [last]
    first = frames[0]
    save_image(first, path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
