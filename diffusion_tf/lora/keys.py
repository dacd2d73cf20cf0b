"""Which of our variables a LoRA module name refers to.

Our variables are named by their diffusers / transformers keys (`diffusion_tf.state_dict`), so a
module path is the key without `.weight`. kohya writes module paths with every "." as "_"
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`); the names are mapped
back through a table {underscored form: module path} built from the model's own modules (a
lookup, not string guessing; an underscored form two modules share is refused as ambiguous).
The UNet's table also holds the original LDM names (`input_blocks_1_1_transformer_blocks_0_attn1_to_q`,
`input_blocks_1_0_in_layers_2`, `middle_block_1_...`, `output_blocks_...`) via
`weights_port.unet_keys.original_key`. Text encoders accept their paths with or without the
leading `text_model.`.
"""

from diffusion_tf.state_dict import named_variables
from weights_port.unet_keys import PREFIX as LDM_PREFIX
from weights_port.unet_keys import original_key

_AMBIGUOUS = object()


def _add(table, name, path):
    if table.get(name, path) != path:
        table[name] = _AMBIGUOUS
    else:
        table[name] = path


class ModuleIndex:
    """The weight-carrying modules (Dense, Conv2D) of one network."""

    def __init__(self, component, model):
        self.component = component
        self.model = model
        self.variables = {}  # module path -> (variable key, keras variable, to_torch perm)
        for key, (var, perm) in named_variables(model).items():
            if key.endswith(".weight") and perm:
                self.variables[key[: -len(".weight")]] = (key, var, perm)
        self.dotted, self.underscored = {}, {}
        for path in self.variables:
            _add(self.dotted, path, path)
            _add(self.underscored, path.replace(".", "_"), path)
            if path.startswith("text_model."):
                short = path[len("text_model."):]
                _add(self.dotted, short, path)
                _add(self.underscored, short.replace(".", "_"), path)
        if component == "unet":
            config = {
                "block_out_channels": list(model.block_out_channels),
                "layers_per_block": model.layers_per_block,
                "up_block_types": list(model.up_block_types),
            }
            for path in self.variables:
                try:
                    ldm = original_key(path + ".weight", config)
                except KeyError:
                    continue
                ldm = ldm[len(LDM_PREFIX):-len(".weight")]
                _add(self.underscored, ldm.replace(".", "_"), path)
                _add(self.dotted, ldm, path)

    def resolve(self, naming, name):
        """The module path for `name` ("underscored" or "dotted"); None if unknown or ambiguous."""
        table = self.underscored if naming == "underscored" else self.dotted
        path = table.get(name)
        return None if path is _AMBIGUOUS else path

    def torch_shape(self, path):
        _, var, perm = self.variables[path]
        shape = tuple(var.shape)
        return tuple(shape[p] for p in perm)
