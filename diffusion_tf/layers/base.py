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

import keras


class Layer(keras.layers.Layer):
    def build(self, input_shape=None):
        self.built = True


class Model(keras.Model):
    def build(self, input_shape=None):
        self.built = True
