"""Micro-benchmark: formulations of softmax attention (einsum on [B, N, H, D], head-major
batched matmuls, deferred normalisation, flattened heads) under XLA and graph mode, at the
SD UNet attention shapes. See benchmarks/README.md.

    python benchmarks/micro/attention_layouts.py
"""
import os, time
os.environ["TF_CPP_MIN_LOG_LEVEL"]="3"
import numpy as np, tensorflow as tf
tf.config.threading.set_inter_op_parallelism_threads(1)
def bench(f, *a, n=10):
    f(*a).numpy()
    t = time.perf_counter()
    for _ in range(n): r = f(*a)
    r.numpy()
    return (time.perf_counter()-t)/n*1e3
def a_einsum(q,k,v):
    s = tf.einsum("bqhd,bkhd->bhqk", q, k) * 0.158
    p = tf.nn.softmax(s, -1)
    return tf.einsum("bhqk,bkhd->bqhd", p, v)
def a_matmul(q,k,v):
    q = tf.transpose(q, (0,2,1,3)); k = tf.transpose(k, (0,2,1,3)); v = tf.transpose(v, (0,2,1,3))
    s = tf.matmul(q*0.158, k, transpose_b=True)
    p = tf.nn.softmax(s, -1)
    return tf.transpose(tf.matmul(p, v), (0,2,1,3))
def a_manual_softmax(q,k,v):
    q = tf.transpose(q, (0,2,1,3)); k = tf.transpose(k, (0,2,1,3)); v = tf.transpose(v, (0,2,1,3))
    s = tf.matmul(q*0.158, k, transpose_b=True)
    e = tf.exp(s - tf.reduce_max(s, -1, keepdims=True))
    o = tf.matmul(e, v) / tf.reduce_sum(e, -1, keepdims=True)
    return tf.transpose(o, (0,2,1,3))
def a_flat(q,k,v):
    b,n,h,d = q.shape; m = k.shape[1]
    q = tf.reshape(tf.transpose(q, (0,2,1,3)), (b*h, n, d)); k = tf.reshape(tf.transpose(k, (0,2,1,3)), (b*h,m,d)); v = tf.reshape(tf.transpose(v, (0,2,1,3)), (b*h,m,d))
    s = tf.matmul(q*0.158, k, transpose_b=True)
    e = tf.exp(s - tf.reduce_max(s, -1, keepdims=True))
    o = tf.matmul(e, v) / tf.reduce_sum(e, -1, keepdims=True)
    return tf.transpose(tf.reshape(o, (b,h,n,d)), (0,2,1,3))
rng = np.random.default_rng(0)
for (n, m, h, d) in [(1024,1024,8,40),(1024,77,8,40),(256,256,8,80),(4096,4096,8,40)]:
    q = tf.constant(rng.standard_normal((2,n,h,d)).astype(np.float32)); k = tf.constant(rng.standard_normal((2,m,h,d)).astype(np.float32)); v = tf.constant(rng.standard_normal((2,m,h,d)).astype(np.float32))
    ref = a_einsum(q,k,v).numpy()
    row = []
    for name, fn in [("einsum", a_einsum), ("matmul", a_matmul), ("manual", a_manual_softmax), ("flat", a_flat)]:
        for jit in (True, False):
            f = tf.function(fn, jit_compile=jit)
            err = np.abs(f(q,k,v).numpy()-ref).max()
            row.append(f"{name}{'-xla' if jit else '-graph'} {bench(f,q,k,v):.1f}")
    fl = 4*2*h*n*m*d
    print((n,m,h,d), f"{fl/1e9:.2f} GF", "; ".join(row), flush=True)
