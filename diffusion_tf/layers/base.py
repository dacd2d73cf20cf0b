"""Base classes whose sublayers build on the first real call.

Keras 3 builds a layer without its own `build()` by tracing `call` symbolically
first; with nested layers that trace repeats at every depth and made building a
UNet take seconds even at tiny sizes. Our layers create their variables through
their sublayers (Dense, Conv2D, ...), which build themselves when first called,
so `build` has nothing to do.

Networks change no process-wide state when called: the heap setting that suits them
(`runtime.apply()`) is applied where they are made ready for use
(`components.load_folder`), so that a network computes the same way whatever ran before.
"""

import contextlib

import keras


class Layer(keras.layers.Layer):
    def build(self, input_shape=None):
        self.built = True


class Model(keras.Model):
    _creating_variables = False

    @contextlib.contextmanager
    def creating_variables(self):
        """Marks the small forward pass of `build_weights`, which creates the variables.
        Nothing reads the mark since the heap setting left `__call__`; the models' `build_weights`
        still enter it (remove both together)."""
        self._creating_variables = True
        try:
            yield
        finally:
            self._creating_variables = False

    def build(self, input_shape=None):
        self.built = True
