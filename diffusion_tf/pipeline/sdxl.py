"""SDXL's extra inputs: the micro-conditioning time ids and the hand-off points of the schedule.

Both follow diffusers' SDXL pipelines, quirks included:

- time ids (`_get_add_time_ids`): the base reads original size + crop corner + target size
  (6 values), the refiner (`requires_aesthetics_score`) original size + crop corner + aesthetic
  score (5). Text-to-image uses the `negative_*` values only when both negative sizes are given
  (else the negative row is the positive one); image-to-image and inpainting default each
  negative size to its positive one, and without the aesthetic score they pair the negative
  sizes with the positive crop corner (diffusers' img2img/inpaint code; matched so that the
  numbers agree).
- `denoising_end` ends the schedule at the first timestep below round(T (1 - end)), and
  `denoising_start` starts it there ("ensemble of experts": the base runs the high-noise part,
  the refiner the rest, from the base's latents without new noise).
"""

import numpy as np

TEXT_TO_IMAGE, EDITING = "text_to_image", "editing"


def time_ids(kind, aesthetics, size, request):
    """(positive, negative) float32 time ids of one image for `kind` (TEXT_TO_IMAGE or EDITING);
    `size` the output (height, width); `aesthetics`: the refiner's 5-value layout."""
    original = tuple(request.original_size or size)
    target = tuple(request.target_size or size)
    crops = tuple(request.crops_coords_top_left or (0, 0))
    neg_crops = tuple(request.negative_crops_coords_top_left or (0, 0))
    if aesthetics:
        neg_original = tuple(request.negative_original_size or original)
        positive = original + crops + (request.aesthetic_score,)
        negative = neg_original + neg_crops + (request.negative_aesthetic_score,)
    elif kind == TEXT_TO_IMAGE:
        positive = original + crops + target
        if request.negative_original_size is not None and request.negative_target_size is not None:
            negative = tuple(request.negative_original_size) + neg_crops + tuple(request.negative_target_size)
        else:
            negative = positive
    else:
        positive = original + crops + target
        negative = (tuple(request.negative_original_size or original) + crops
                    + tuple(request.negative_target_size or target))
    return np.array(positive, "float32"), np.array(negative, "float32")


def cutoff(fraction, num_train_timesteps):
    """The timestep where a share `fraction` of the schedule is done (diffusers' rounding)."""
    return int(round(num_train_timesteps - fraction * num_train_timesteps))


def end_index(timesteps, denoising_end, num_train_timesteps):
    """The loop's end index for `denoising_end`: the count of timesteps >= the cutoff."""
    if denoising_end is None:
        return len(timesteps)
    return int(np.sum(np.asarray(timesteps) >= cutoff(denoising_end, num_train_timesteps)))


def start_index(timesteps, denoising_start, num_train_timesteps, order=1):
    """The loop's start index for `denoising_start` (diffusers' img2img `get_timesteps`): the
    timesteps below the cutoff run; a second-order scheduler keeps whole steps."""
    run = int(np.sum(np.asarray(timesteps) < cutoff(denoising_start, num_train_timesteps)))
    if order == 2 and run % 2 == 0:
        run += 1
    return len(timesteps) - run
