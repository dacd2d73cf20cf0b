"""A stage's data: which dataset rows each global step trains on (a fixed function of
(seed, step)), the tf.data pipeline that gathers them, and the captions' token ids."""

import numpy as np
import tensorflow as tf


def batch_indices(n, batch_size, seed, start_step, end_step):
    """int32 [end_step - start_step, batch_size]: dataset indices of global steps start..end-1.

    The stream is the concatenation of permutations of range(n), pass p drawn from
    PCG64([seed, p]); so step s always gets the same batch, however the run is split.
    """
    first, last = start_step * batch_size, end_step * batch_size
    out = np.empty(last - first, np.int64)
    pos = first
    while pos < last:
        p, offset = divmod(pos, n)
        perm = np.random.Generator(np.random.PCG64([seed, p])).permutation(n)
        take = min(n - offset, last - pos)
        out[pos - first: pos - first + take] = perm[offset: offset + take]
        pos += take
    return out.reshape(end_step - start_step, batch_size).astype(np.int32)


def phased_batch_indices(n, batch_size, seed, start_step, end_step, first_steps, first_rows):
    """`batch_indices` whose first `first_steps` global steps draw from `first_rows` only.

    Steps >= first_steps are the usual stream, numbered from first_steps (so the
    main phase sees whole epochs of the dataset)."""
    first_rows = np.asarray(first_rows, np.int64)
    parts = []
    mid = min(max(start_step, first_steps), end_step)
    if start_step < mid:
        parts.append(first_rows[batch_indices(len(first_rows), batch_size, seed, start_step, mid)].astype(np.int32))
    if mid < end_step:
        parts.append(batch_indices(n, batch_size, seed, mid - first_steps, end_step - first_steps))
    return np.concatenate(parts) if parts else np.zeros((0, batch_size), np.int32)


def make_tf_dataset(arrays, indices):
    """A tf.data pipeline yielding the rows `idx` of `arrays` for each row of `indices`.

    `arrays` is one array, or a (nested) tuple of them; the batches have its structure."""
    tensors = tf.nest.map_structure(tf.constant, arrays)

    def gather(idx):
        return tf.nest.map_structure(lambda t: tf.gather(t, idx), tensors)

    ds = tf.data.Dataset.from_tensor_slices(indices).map(gather)
    return ds.prefetch(2)


def tokenize(tokenizer, captions):
    """int32 [n, context_length]; each distinct caption is tokenized once."""
    unique = sorted(set(captions))
    table = dict(zip(unique, np.asarray(tokenizer(unique), np.int32)))
    return np.stack([table[c] for c in captions])
