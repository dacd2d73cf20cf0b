"""The error of the LoRA loader."""


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit the model, or a bad argument (scale, name).

    Messages name the file and the offending keys; the models are unchanged when it is raised."""
