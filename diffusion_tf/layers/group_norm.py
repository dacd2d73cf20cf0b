"""GroupNormalization over the channel (last) axis, computed as PyTorch does.

Keras' GroupNormalization folds the mean into the bias (`x * inv - mean * inv`),
which cancels when a group's mean is large against its spread, and its single
reduction over positions and channels sums sequentially on CPU. Together they put
the SD 1.5 VAE decoder at 512 px 6e-4 (relative) away from PyTorch. Here
`(x - mean) * rsqrt(var + eps)` with two-stage reductions, statistics and
normalisation in float32 whatever the compute dtype.
"""

from keras import ops

from diffusion_tf.layers.base import Layer


class GroupNormalization(Layer):
    def __init__(self, groups=32, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.groups = groups
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.groups:
            raise ValueError(
                f"GroupNormalization: {channels} channels are not divisible into {self.groups} groups."
            )
        self.gamma = self.add_weight(shape=(channels,), initializer="ones", name="gamma", autocast=False)
        self.beta = self.add_weight(shape=(channels,), initializer="zeros", name="beta", autocast=False)
        self.built = True

    def call(self, x):
        shape = ops.shape(x)
        channels = x.shape[-1]
        grouped = ops.reshape(ops.cast(x, "float32"), (shape[0], -1, self.groups, channels // self.groups))
        # Two-stage reductions (channels of the group, then positions): one reduction over
        # both axes sums sequentially on CPU and lost 3e-5 of accuracy at 64x64x512.
        mean = ops.mean(ops.mean(grouped, axis=3, keepdims=True), axis=1, keepdims=True)
        centered = grouped - mean
        variance = ops.mean(ops.mean(ops.square(centered), axis=3, keepdims=True), axis=1, keepdims=True)
        normed = ops.reshape(centered * ops.rsqrt(variance + self.epsilon), shape)
        out = normed * ops.cast(self.gamma, "float32") + ops.cast(self.beta, "float32")
        return ops.cast(out, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"groups": self.groups, "epsilon": self.epsilon})
        return config
