"""Reading diffusers / transformers config dicts into constructor arguments."""

import inspect
import warnings

# Keys of diffusers/transformers configs that carry no architecture.
_BOOKKEEPING = {
    "_class_name", "_diffusers_version", "_name_or_path", "architectures", "transformers_version",
    "torch_dtype", "dtype", "model_type", "_commit_hash", "bos_token_id", "eos_token_id",
    "pad_token_id", "initializer_range", "initializer_factor", "attention_dropout", "dropout",
    "projection_dim", "force_upcast", "use_quant_conv", "use_post_quant_conv", "shift_factor",
    "latents_mean", "latents_std", "mid_block_add_attention", "name", "trainable",
}


def from_config(cls, config, unsupported=None, **overrides):
    """Build `cls` from a config dict, keeping only its constructor arguments.

    `unsupported` maps config keys to the only value(s) this package implements
    (a tuple, or a predicate); any other value raises a ValueError naming the key
    and value.
    """
    config = dict(config)
    for key, allowed in (unsupported or {}).items():
        if key not in config:
            continue
        ok = allowed(config[key]) if callable(allowed) else config[key] in allowed
        if not ok:
            raise ValueError(
                f"{cls.__name__}: {key}={config[key]!r} is not supported; allowed: {allowed}."
            )
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in config.items() if k in params}
    ignored = sorted(set(config) - set(params) - _BOOKKEEPING - set(unsupported or {}))
    if ignored:
        warnings.warn(f"{cls.__name__}: ignoring config keys {ignored}.", stacklevel=3)
    kwargs.update(overrides)
    return cls(**kwargs)


def per_block(value, count, name):
    """An int or a per-block list -> a list of `count` values."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name}={value!r} must have {count} entries (one per block).")
        return list(value)
    return [value] * count
