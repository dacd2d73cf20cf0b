"""The pipeline core: one generation request, one sampling loop, the Text2Image task.

- `request`: `GenerationRequest`, its rules and its PNG parameters (no TensorFlow);
- `sampling`: classifier-free guidance and the denoising loop over a schedule;
- `editing`: the inputs of image-to-image, inpainting and outpainting;
- `text_to_image`: `Text2Image`, prompt -> image.
"""


def __getattr__(name):
    # Lazy, so that `diffusion_tf.pipeline.request` can be read without TensorFlow.
    if name == "Text2Image":
        from diffusion_tf.pipeline.text_to_image import Text2Image

        return Text2Image
    if name == "GenerationRequest":
        from diffusion_tf.pipeline.request import GenerationRequest

        return GenerationRequest
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
