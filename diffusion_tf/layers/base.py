"""Base classes whose sublayers build on the first real call.

Keras 3 builds a layer without its own `build()` by tracing `call` symbolically
first; with nested layers that trace repeats at every depth and made building a
UNet take seconds even at tiny sizes. Our layers create their variables through
their sublayers (Dense, Conv2D, ...), which build themselves when first called,
so `build` has nothing to do.

Calling a network (`Model`, outside `build_weights`) also keeps glibc from unmapping large
freed blocks between calls, unless DIFFUSION_TF_KEEP_HEAP=0
(`compiler_memory.keep_large_blocks`): XLA's temporaries are then reused instead of
faulted in again at every call.
"""

import contextlib

import keras

from diffusion_tf import compiler_memory


class Layer(keras.layers.Layer):
    def build(self, input_shape=None):
        self.built = True


class Model(keras.Model):
    _creating_variables = False

    def __call__(self, *args, **kwargs):
        # At the first real call, not the one in `build_weights`: loading the weights in
        # between frees large blocks that would otherwise stay resident.
        if not self._creating_variables:
            compiler_memory.keep_large_blocks()
        return super().__call__(*args, **kwargs)

    @contextlib.contextmanager
    def creating_variables(self):
        """Marks the small forward pass of `build_weights`, which creates the variables."""
        self._creating_variables = True
        try:
            yield
        finally:
            self._creating_variables = False

    def build(self, input_shape=None):
        self.built = True
