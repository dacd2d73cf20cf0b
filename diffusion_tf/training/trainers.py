"""What one optimizer step does: the learning-rate schedule, the EMA of the weights, the
optimizer, and the three trainer models (`VAETrainer`, `DecoderTrainer`, `DiffusionTrainer`)
whose `train_step` is the loss of a stage."""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from diffusion_tf.layers import base
from diffusion_tf.schedulers.noise_schedule import model_target
from diffusion_tf.training.options import PREDICTIONS, check_choice, check_int


def all_layers(model):
    """`model` and every layer nested in it, each once (depth first, in attribute order).

    Found through the public attributes: a layer held by one (or inside a list, tuple or
    dict held by one) is a sublayer. Attributes named with "_" are skipped: they are
    Keras' own bookkeeping (its tracker and the private layer list it mirrors), which
    hold no layer that a public attribute does not."""
    found, stack = {}, [model]
    while stack:
        layer = stack.pop()
        if id(layer) in found:
            continue
        found[id(layer)] = layer
        children = []
        pending = [v for k, v in vars(layer).items() if not k.startswith("_")]
        while pending:
            value = pending.pop(0)
            if isinstance(value, keras.Layer):
                children.append(value)
            elif isinstance(value, (list, tuple)):
                pending[:0] = list(value)
            elif isinstance(value, dict):
                pending[:0] = list(value.values())
        stack.extend(reversed(children))
    return list(found.values())


class WarmupConstant(keras.optimizers.schedules.LearningRateSchedule):
    """lr * min(1, (step + 1) / warmup): a linear warm-up, then constant."""

    def __init__(self, lr, warmup):
        self.lr = float(lr)
        self.warmup = int(warmup)

    def __call__(self, step):
        if self.warmup <= 0:
            return ops.convert_to_tensor(self.lr, "float32")
        frac = (ops.cast(step, "float32") + 1.0) / float(self.warmup)
        return self.lr * ops.minimum(1.0, frac)

    def get_config(self):
        return {"lr": self.lr, "warmup": self.warmup}


class EMA:
    """Exponential moving average of `variables`, updated inside the train step.

    decay_n = min(decay, (1 + n) / (10 + n)) after n optimizer steps, so that short runs
    are not dominated by the initial weights. The averages are `only_first_replica`
    variables: every replica computes the same value (the weights are mirrored).
    """

    def __init__(self, variables, decay):
        self.variables = list(variables)
        self.decay = float(decay)
        self.averages = [
            keras.Variable(
                ops.convert_to_numpy(v), trainable=False, dtype=v.dtype,
                aggregation="only_first_replica", name=f"ema_{i}",
            )
            for i, v in enumerate(self.variables)
        ]
        self._by_id = {id(v): a for v, a in zip(self.variables, self.averages)}

    def decay_at(self, step):
        n = ops.cast(step, "float32")
        return ops.minimum(self.decay, (1.0 + n) / (10.0 + n))

    def update(self, step):
        """a <- d a + (1 - d) v, written as a -= (1 - d)(a - v)."""
        rate = 1.0 - self.decay_at(step)
        for v, a in zip(self.variables, self.averages):
            a.assign_sub(rate * (a - ops.cast(v, a.dtype)))

    def average_of(self, variable):
        return self._by_id[id(variable)]


def make_optimizer(lr, warmup):
    return keras.optimizers.Adam(learning_rate=WarmupConstant(lr, warmup))


def _num_replicas():
    # Each replica's loss is the mean over its share of the batch and the optimizer sums
    # the replicas' gradients: dividing by the replica count gives the global mean's gradient.
    return tf.distribute.get_strategy().num_replicas_in_sync


def _step_seed(seed, step, salt):
    """A stateless-RNG seed pair unique to (run seed, optimizer step, replica, salt)."""
    ctx = tf.distribute.get_replica_context()
    replica = ctx.replica_id_in_sync_group if ctx is not None else 0
    counter = ops.cast(step, "int64") * 1024 + ops.cast(replica, "int64") * 16 + salt
    return tf.stack([tf.constant(seed, "int64"), counter])


class _Trainer(keras.Model):
    """Common parts: the loss tracker, the explicit variable list and the EMA."""

    def __init__(self, models, seed, ema_decay, **kwargs):
        super().__init__(**kwargs)
        self.components = dict(models)
        self.seed = int(seed)
        self.train_variables = [v for m in models.values() for v in m.trainable_variables]
        self.ema = EMA(self.train_variables, ema_decay)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        # Every variable exists (build_model ran a forward pass); containers that are never
        # called themselves (the text encoder's `text_model`, ...) are diffusion_tf layers whose
        # build() does nothing: mark them built, else Keras under a distribution strategy tries
        # to build the trainer symbolically (and fails: it has no call()).
        for model in models.values():
            for layer in all_layers(model):
                if not layer.built and isinstance(layer, (base.Layer, base.Model)):
                    layer.built = True
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker]

    def _minimize(self, compute_loss):
        """One optimizer step on `compute_loss()` (summed over replicas, hence the scaling)."""
        with tf.GradientTape() as tape:
            loss = compute_loss()
            scaled_loss = loss / _num_replicas()
        grads = tape.gradient(scaled_loss, self.train_variables)
        self.optimizer.apply_gradients(zip(grads, self.train_variables))
        self.ema.update(self.optimizer.iterations)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result(), "step_loss": loss}

    def build_optimizer(self):
        self.optimizer.build(self.train_variables)


class VAETrainer(_Trainer):
    """Trains an AutoencoderKL: L1(decode(z), x) + kl_weight * KL(q(z|x) || N(0, I)), z ~ q(z|x).

    Both terms are means over elements. Training batches are uint8 images [B, 64, 64, 3];
    evaluation batches are (images, eps) with the posterior noise given, so that the
    evaluation loss of a fixed batch is a deterministic number.
    """

    def __init__(self, vae, kl_weight=1e-4, seed=0, ema_decay=0.999, **kwargs):
        super().__init__({"vae": vae}, seed, ema_decay, **kwargs)
        self.vae = vae
        self.kl_weight = float(kl_weight)

    def vae_loss(self, images, eps=None, step=None):
        x = ops.cast(images, "float32") / 127.5 - 1.0
        mean, logvar = self.vae.encode_moments(x)
        logvar = ops.clip(ops.cast(logvar, "float32"), -30.0, 20.0)
        mean = ops.cast(mean, "float32")
        if eps is None:
            eps = tf.random.stateless_normal(tf.shape(mean), seed=_step_seed(self.seed, step, 0))
        z = mean + ops.exp(0.5 * logvar) * ops.cast(eps, "float32")
        recon = ops.cast(self.vae.decode(z), "float32")
        rec_loss = ops.mean(ops.abs(recon - x))
        kl = 0.5 * ops.mean(ops.square(mean) + ops.exp(logvar) - 1.0 - logvar)
        return rec_loss + self.kl_weight * kl

    def train_step(self, data):
        return self._minimize(lambda: self.vae_loss(data, step=self.optimizer.iterations))

    def test_step(self, data):
        images, eps = data
        self.loss_tracker.update_state(self.vae_loss(images, eps))
        return {"loss": self.loss_tracker.result()}


class VAEDecoderPart(keras.Model):
    """The decoding half of an AutoencoderKL (post_quant_conv and decoder, the same layers):
    what the decoder stage trains. Its variable names are the VAE's."""

    def __init__(self, vae, **kwargs):
        super().__init__(**kwargs)
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.built = True

    def call(self, latents):  # AutoencoderKL.decode
        return self.decoder(self.post_quant_conv(ops.cast(latents, self.post_quant_conv.compute_dtype)))


class DecoderTrainer(_Trainer):
    """Fine-tunes the VAE's decoder with the encoder frozen: L1(decode(mean(x)), x).

    The latents are the posterior means the UNet is trained on, which do not change, so a
    UNet trained before or after this stage stays valid. Batches are (means, uint8 images).
    """

    def __init__(self, vae, seed=0, ema_decay=0.999, **kwargs):
        part = VAEDecoderPart(vae)
        super().__init__({"decoder": part}, seed, ema_decay, **kwargs)
        self.part = part

    def decoder_loss(self, means, images):
        x = ops.cast(images, "float32") / 127.5 - 1.0
        return ops.mean(ops.abs(ops.cast(self.part(means), "float32") - x))

    def train_step(self, data):
        means, images = data
        return self._minimize(lambda: self.decoder_loss(means, images))

    def test_step(self, data):
        means, images = data
        self.loss_tracker.update_state(self.decoder_loss(means, images))
        return {"loss": self.loss_tracker.result()}


class DiffusionTrainer(_Trainer):
    """Trains a UNet2DConditionModel and a CLIPTextModel to denoise latents (DDPM).

    Training batches are (latents [B, h, w, 4] already times the VAE's scaling factor,
    token ids [B, 77]); t ~ U{0..T-1}, the noise and the caption drops are drawn per step.
    Evaluation batches are ((latents, ids), (t, noise)): a fixed batch gives a deterministic loss.
    `noise_schedule`: a `Scheduler` (its `add_noise` and `alpha_bar` are used).
    `uncond_ids` [77]: the tokens of "", which replace a caption with probability `cfg_drop`.
    `high_noise_steps`, `high_noise_t_min`: the first `high_noise_steps` optimizer steps draw
    t ~ U{high_noise_t_min..T-1} and never drop the caption (the position phase of
    `TrainingRun`: at high noise the caption is all the UNet has to place the shape by).
    `trained`: the models whose variables are trained, averaged and checkpointed (default the
    UNet and the text encoder; `LoraTrainer` passes its LoRA factors).
    """

    def __init__(self, unet, text_encoder, noise_schedule, uncond_ids, prediction_type="epsilon",
                 cfg_drop=0.1, seed=0, ema_decay=0.999, high_noise_steps=0, high_noise_t_min=0, trained=None,
                 **kwargs):
        models = {"unet": unet, "text_encoder": text_encoder} if trained is None else trained
        super().__init__(models, seed, ema_decay, **kwargs)
        check_choice("prediction_type", prediction_type, PREDICTIONS)
        self.high_noise_steps = check_int("high_noise_steps", high_noise_steps, 0)
        self.high_noise_t_min = check_int("high_noise_t_min", high_noise_t_min, 0,
                                     maximum=int(noise_schedule.num_train_timesteps) - 1)
        self.unet = unet
        self.text_encoder = text_encoder
        self.noise_schedule = noise_schedule
        self.uncond_ids = np.asarray(uncond_ids, "int32")
        self.prediction_type = prediction_type
        self.cfg_drop = float(cfg_drop)
        self.num_train_timesteps = int(noise_schedule.num_train_timesteps)

    def diffusion_loss(self, latents, ids, t, noise):
        """MSE between the UNet's output on x_t = add_noise(x_0, noise, t) and noise (or v)."""
        x0 = ops.cast(latents, "float32")
        noise = ops.cast(noise, "float32")
        t = ops.cast(t, "int32")
        noisy = self.noise_schedule.add_noise(x0, noise, t)
        a = ops.reshape(self.noise_schedule.alpha_bar(t), (-1, 1, 1, 1))
        target = model_target(self.prediction_type, x0, noise, a)
        context = self.text_encoder(ops.cast(ids, "int32"))
        pred = ops.cast(self.unet(noisy, ops.cast(t, "float32"), context), "float32")
        return ops.mean(ops.square(pred - target))

    def timesteps_and_drops(self, batch, step):
        """(t int32 [batch], drop bool [batch]) of optimizer step `step`: stateless draws."""
        t = tf.random.stateless_uniform(
            [batch], seed=_step_seed(self.seed, step, 1), minval=0,
            maxval=self.num_train_timesteps, dtype="int32",
        )
        drop = tf.random.stateless_uniform([batch], seed=_step_seed(self.seed, step, 3)) < self.cfg_drop
        if self.high_noise_steps:
            high = step < self.high_noise_steps
            t_high = tf.random.stateless_uniform(
                [batch], seed=_step_seed(self.seed, step, 4), minval=self.high_noise_t_min,
                maxval=self.num_train_timesteps, dtype="int32",
            )
            t = tf.where(high, t_high, t)
            drop = tf.logical_and(drop, tf.logical_not(high))
        return t, drop

    def train_step(self, data):
        latents, ids = data
        step = self.optimizer.iterations
        t, drop = self.timesteps_and_drops(tf.shape(latents)[0], step)
        noise = tf.random.stateless_normal(tf.shape(latents), seed=_step_seed(self.seed, step, 2))
        ids = tf.where(drop[:, None], tf.constant(self.uncond_ids)[None, :], ops.cast(ids, "int32"))
        return self._minimize(lambda: self.diffusion_loss(latents, ids, t, noise))

    def test_step(self, data):
        (latents, ids), (t, noise) = data
        self.loss_tracker.update_state(self.diffusion_loss(latents, ids, t, noise))
        return {"loss": self.loss_tracker.result()}
