"""Error type shared by the checkpoint readers."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, unsupported or unsafe.

    Messages name the file, the offending key/entry/value and what was expected.
    """
