"""LoRA training: low-rank factors on a frozen model's linear layers, and the kohya file they make.

For each targeted layer W (the UNet's attention projections to_q, to_k, to_v, to_out.0 of
attn1 and attn2, `Dense`; with `ff` also its feed-forward ff.net.0.proj and ff.net.2; with
`conv` also its resnets' 3x3 convolutions conv1 and conv2, kohya's LoCon; with `text_encoder`
also the text encoder's q_proj, k_proj, v_proj and out_proj) a `LoraModule` holds down
[r, in] (kohya's `lora_down`, peft's `lora_A`: Kaiming-uniform, bound 1 / sqrt(fan in), as
both initialise it; a 3x3 convolution in -> r for a conv target, [r, in, 3, 3]) and up
[out, r] (`lora_up` / `lora_B`: zeros, so training starts from the base model exactly; a 1x1
convolution for a conv target, [out, r, 1, 1]). While a `LoraAttachment` is in place the
layer computes

    y = W x + b + (alpha / r) * up(down(x))

(its `call` is wrapped on that instance only; `detach` restores it). The base weights are not
trained and not copied; nothing changes for any other instance of the model, so generation
(`Text2Image`, which merges LoRA files into the weights) costs nothing more. The factors live in
a `LoraNetwork`, a Keras model apart from the base networks, whose variable names
(`diffusion_tf.state_dict`) are the kohya keys themselves:

    lora_unet_<module path, "." -> "_">.lora_down.weight   [r, in]   (torch layout)
    lora_unet_<...>.lora_up.weight                          [out, r]
    lora_unet_<...>.alpha                                   scalar (written by `write_lora_file`)
    lora_te_text_model_encoder_layers_<i>_self_attn_<q|k|v|out>_proj...   (the text encoder)

which `diffusion_tf.lora` and diffusers' `load_lora_weights` both read.
"""

import json
import re
import struct

import keras
import numpy as np
from keras import ops

from diffusion_tf.layers import base
from diffusion_tf.state_dict import named_variables
from diffusion_tf.training.files import atomic_file
from diffusion_tf.training.trainers import DiffusionTrainer, all_layers

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_FEED_FORWARD = re.compile(r"\.ff\.net\.(0\.proj|2)$")
_TEXT_ATTENTION = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_RESNET_CONV = re.compile(r"\.resnets\.\d+\.conv[12]$")


def module_at(model, path):
    """The layer at a module path ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")."""
    layer = model
    for part in path.split("."):
        layer = layer[int(part)] if isinstance(layer, (list, tuple)) else getattr(layer, part)
    return layer


def kohya_name(component, path):
    return PREFIXES[component] + path.replace(".", "_")


def lora_targets(models, ff=False, text_encoder=False, conv=False):
    """[(kohya name, component, module path, in features, out features, kernel size)] of the
    layers a LoRA trains (kernel size 1: a Dense layer; 3: a 3x3 stride-1 'same' convolution),
    in the models' variable order."""
    patterns = {"unet": [_ATTENTION] + ([_FEED_FORWARD] if ff else []) + ([_RESNET_CONV] if conv else [])}
    if text_encoder:
        patterns["text_encoder"] = [_TEXT_ATTENTION]
    out = []
    for component, regexes in patterns.items():
        for key, (var, perm) in named_variables(models[component]).items():
            path = key[: -len(".weight")] if key.endswith(".weight") else None
            if path is None or not any(r.search(path) for r in regexes):
                continue
            layer = module_at(models[component], path)
            if isinstance(layer, keras.layers.Dense) and perm == (1, 0):
                fan_in, fan_out = (int(d) for d in var.shape)
                kernel = 1
            elif (isinstance(layer, keras.layers.Conv2D) and tuple(layer.kernel_size) == (3, 3)
                  and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1)
                  and layer.padding == "same" and layer.groups == 1):
                fan_in, fan_out = int(var.shape[2]), int(var.shape[3])
                kernel = 3
            else:
                continue
            out.append((kohya_name(component, path), component, path, fan_in, fan_out, kernel))
    if not out:
        raise ValueError("the model has no layers a LoRA can target (no attention projections found).")
    return out


class LoraModule(base.Layer):
    """One module's factors, no bias: `lora_down` (Dense in -> r) and `lora_up` (Dense r -> out);
    for a 3x3 convolution (`kernel=3`) a 3x3 'same' convolution in -> r and a 1x1 one r -> out."""

    def __init__(self, in_features, out_features, rank, seed, kernel=1, **kwargs):
        super().__init__(**kwargs)
        bound = 1.0 / float(np.sqrt(in_features * kernel * kernel))
        down_init = keras.initializers.RandomUniform(-bound, bound, seed=int(seed))
        names = {"dtype": "float32", "use_bias": False}
        if kernel == 1:
            self.lora_down = keras.layers.Dense(rank, name=f"{self.name}_lora_down", kernel_initializer=down_init,
                                                **names)
            self.lora_up = keras.layers.Dense(out_features, name=f"{self.name}_lora_up", kernel_initializer="zeros",
                                              **names)
            self.lora_down.build((None, in_features))
            self.lora_up.build((None, rank))
        elif kernel == 3:
            self.lora_down = keras.layers.Conv2D(rank, 3, padding="same", name=f"{self.name}_lora_down",
                                                 kernel_initializer=down_init, **names)
            self.lora_up = keras.layers.Conv2D(out_features, 1, name=f"{self.name}_lora_up",
                                               kernel_initializer="zeros", **names)
            self.lora_down.build((None, None, None, in_features))
            self.lora_up.build((None, None, None, rank))
        else:
            raise ValueError(f"kernel={kernel!r}; a LoRA module is for a Dense layer (1) or a 3x3 convolution (3).")
        self.built = True

    def call(self, x):
        return self.lora_up(self.lora_down(x))


class LoraNetwork(base.Model):
    """The LoRA factors of every target, as attributes named by their kohya names."""

    def __init__(self, targets, rank, alpha, seed=0, **kwargs):
        super().__init__(name="lora", **kwargs)
        self.targets = [tuple(t) for t in targets]
        self.rank = int(rank)
        self.alpha = float(alpha)
        for i, (name, _, _, fan_in, fan_out, kernel) in enumerate(self.targets):
            # a seed per module, from the run's seed: the initial factors do not depend on the order of builds
            setattr(self, name, LoraModule(fan_in, fan_out, self.rank, seed=(int(seed) * 7919 + i) % 2**31,
                                           kernel=kernel, name=name))
        self.built = True

    @property
    def factor(self):
        """alpha / rank: the update at scale 1 is factor * up @ down (kohya's scale)."""
        return self.alpha / self.rank

    def module(self, name):
        return getattr(self, name)

    def tensors(self, values=None):
        """{kohya key: float32 array, torch layout}: the factors (or `values(variable)` of them,
        e.g. their EMA) and each module's alpha."""
        out = {}
        for key, (var, perm) in named_variables(self).items():
            value = ops.convert_to_numpy(values(var) if values else var)
            out[key] = np.ascontiguousarray(np.transpose(value, perm), dtype=np.float32)
        for name, *_ in self.targets:
            out[name + ".alpha"] = np.asarray(self.alpha, np.float32)
        return out

    def assign_tensors(self, tensors):
        """Sets the factors from `tensors` (torch layout, as `tensors()` gives)."""
        variables = named_variables(self)
        for key, (var, perm) in variables.items():
            if key not in tensors:
                raise ValueError(f"{key!r} is missing from the LoRA tensors.")
            var.assign(np.transpose(np.asarray(tensors[key], np.float32), np.argsort(perm)))


class LoraAttachment:
    """The LoRA in place on the models' targeted Dense layers (their `call`, on those instances
    only): y = W x + b + scale * (alpha / r) * up(down(x)). `detach()` restores the layers."""

    def __init__(self, network, models, scale=1.0):
        self.network = network
        self.patched = []
        factor = float(scale) * network.factor
        try:
            for name, component, path, *_ in network.targets:
                layer = module_at(models[component], path)
                if "call" in vars(layer):
                    raise ValueError(f"{component} {path!r} already has a LoRA attached.")
                layer.call = _wrapped(layer.call, network.module(name), factor)
                self.patched.append(layer)
        except BaseException:
            self.detach()
            raise

    def detach(self):
        for layer in self.patched:
            del layer.call
        self.patched = []


def _wrapped(call, module, factor):
    def lora_call(inputs, *args, **kwargs):
        y = call(inputs, *args, **kwargs)
        return y + ops.cast(factor * module(ops.cast(inputs, "float32")), y.dtype)

    return lora_call


class LoraTrainer(DiffusionTrainer):
    """`DiffusionTrainer`'s loss (DDPM noise or v prediction, caption drop) with only the LoRA
    factors trained; the UNet and the text encoder stay frozen, the factors attached to them
    for the trainer's life (`detach()` takes them off). Its EMA and checkpoint hold the factors only."""

    def __init__(self, network, unet, text_encoder, noise_schedule, uncond_ids, **kwargs):
        super().__init__(unet, text_encoder, noise_schedule, uncond_ids, trained={"lora": network}, **kwargs)
        self.network = network
        for model in (unet, text_encoder):  # as _Trainer does for its components (distribution strategies)
            for layer in all_layers(model):
                if not layer.built and isinstance(layer, (base.Layer, base.Model)):
                    layer.built = True
        self.attachment = LoraAttachment(network, {"unet": unet, "text_encoder": text_encoder})

    def detach(self):
        self.attachment.detach()


# ------------------------------------------------------------------ the kohya file
def _data_sha256(blob):
    """sha256 of a safetensors file's tensor bytes (after the 8-byte length and the header):
    A1111's / kohya's hash of a LoRA (`diffusion_tf.lora.full_file_hash`)."""
    import hashlib

    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def write_lora_file(path, tensors, metadata, dtype="float32"):
    """Writes the kohya `.safetensors` atomically (a temporary file renamed onto `path`): the
    factors in `dtype` (alphas stay float32), the metadata (str -> str) plus "sshs_model_hash",
    the sha256 of the tensor data, as kohya's trainer records it. Returns that hash."""
    from safetensors.numpy import save

    arrays = {k: (v if k.endswith(".alpha") else v.astype(dtype)) for k, v in tensors.items()}
    metadata = {str(k): str(v) for k, v in metadata.items()}
    digest = _data_sha256(save(arrays, metadata=metadata))
    blob = save(arrays, metadata={**metadata, "sshs_model_hash": digest})
    if _data_sha256(blob) != digest:  # the data bytes do not depend on the header
        raise RuntimeError("safetensors wrote different tensor bytes for the same tensors.")
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(blob)
    return digest


def kohya_metadata(network, options, data, base_name, base_digest, resolution, steps, epochs, prediction,
                   output_name):
    """kohya-style `ss_*` metadata of a trained LoRA (and the run's options as JSON)."""
    import dataclasses

    targets = sorted({re.sub(r"^.*\.", "", path) if not path.endswith("to_out.0") else "to_out.0"
                      for _, _, path, *_ in network.targets})
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": network.rank,
        "ss_network_alpha": network.alpha,
        "ss_network_args": json.dumps({"targets": targets, "feed_forward": bool(options.lora_ff),
                                       "conv": bool(options.lora_conv),
                                       "text_encoder": bool(options.lora_text_encoder)}),
        "ss_base_model": base_name,
        "ss_sd_model_name": base_name,
        "ss_base_model_sha256": base_digest,
        "ss_v_parameterization": str(prediction == "v_prediction"),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": int(len(data.rows)),
        "ss_dataset_dirs": json.dumps(data.subsets()),
        "ss_tag_frequency": json.dumps(data.tag_frequency()),
        "ss_num_epochs": epochs,
        "ss_epoch": epochs,
        "ss_steps": steps,
        "ss_max_train_steps": steps,
        "ss_batch_size_per_device": options.batch_size,
        "ss_total_batch_size": options.batch_size,
        "ss_learning_rate": options.lr,
        "ss_unet_lr": options.lr,
        "ss_text_encoder_lr": options.lr if options.lora_text_encoder else 0.0,
        "ss_lr_scheduler": "constant_with_warmup",
        "ss_lr_warmup_steps": options.warmup,
        "ss_caption_dropout_rate": options.cfg_drop,
        "ss_seed": options.seed,
        "ss_mixed_precision": "no",
        "ss_output_name": output_name,
        "ss_training_comment": "diffusion_tf.train --stage lora (EMA of the factors, decay "
                               f"{options.ema_decay})",
        "diffusion_tf_options": json.dumps(dataclasses.asdict(options)),
    }
