"""Micro-benchmark: a Winograd F(2x2, 3x3) convolution in TensorFlow ops against tf.nn.conv2d
(XLA and graph), for the SD UNet/VAE convolution shapes. See benchmarks/README.md.

    python benchmarks/micro/winograd_conv.py
"""
import os, time
os.environ["TF_CPP_MIN_LOG_LEVEL"]="3"
import numpy as np, tensorflow as tf

BT = np.array([[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]], np.float32)
G = np.array([[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]], np.float32)
AT = np.array([[1,1,1,0],[0,1,-1,-1]], np.float32)

def wino_weights(w):  # w [3,3,Cin,Cout] -> U [16, Cin, Cout]
    u = np.einsum("ai,ijco,bj->abco", G, w, G)
    return u.reshape(16, w.shape[2], w.shape[3]).astype(np.float32)

def wino_conv(x, U):
    b, h, w_, c = x.shape
    xp = tf.pad(x, [[0,0],[1,1],[1,1],[0,0]])  # same padding; h, w even
    th, tw = h//2, w_//2
    d = [[xp[:, i:i+2*th:2, j:j+2*tw:2, :] for j in range(4)] for i in range(4)]
    # rows transform: t[a][j] = sum_i BT[a,i] d[i][j]
    t = [[d[0][j]-d[2][j], d[1][j]+d[2][j], d[2][j]-d[1][j], d[1][j]-d[3][j]] for j in range(4)]  # t[j][a]
    V = []
    for a in range(4):
        r = [t[j][a] for j in range(4)]
        V += [r[0]-r[2], r[1]+r[2], r[2]-r[1], r[1]-r[3]]
    V = tf.reshape(tf.stack(V, 0), [16, b*th*tw, c])
    M = tf.matmul(V, U)  # [16, P, Cout]
    co = U.shape[-1]
    M = tf.reshape(M, [4, 4, b, th, tw, co])
    # A^T M A
    s = [M[:,0]+M[:,1]+M[:,2], M[:,1]-M[:,2]-M[:,3]]  # over b index (columns) -> each [4,...]
    y00 = s[0][0]+s[0][1]+s[0][2]; y10 = s[0][1]-s[0][2]-s[0][3]
    y01 = s[1][0]+s[1][1]+s[1][2]; y11 = s[1][1]-s[1][2]-s[1][3]
    # y[row r][col c]
    top = tf.stack([y00, y01], 3)   # b, th, tw, 2, co
    bot = tf.stack([y10, y11], 3)
    y = tf.stack([top, bot], 2)     # b, th, 2, tw, 2, co
    return tf.reshape(y, [b, h, w_, co])

def bench(f, *a, n=20):
    f(*a)
    t = time.perf_counter()
    for _ in range(n): r = f(*a)
    _ = r.numpy()
    return (time.perf_counter()-t)/n

for (b, s, ci, co) in [(2,32,320,320),(2,16,640,640),(2,8,1280,1280),(2,64,320,320),(1,64,512,512),(1,128,256,256)]:
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((b,s,s,ci)).astype(np.float32))
    w = (rng.standard_normal((3,3,ci,co))/np.sqrt(9*ci)).astype(np.float32)
    wt = tf.constant(w); U = tf.constant(wino_weights(w))
    direct = tf.function(lambda x: tf.nn.conv2d(x, wt, 1, "SAME"), jit_compile=True)
    direct_g = tf.function(lambda x: tf.nn.conv2d(x, wt, 1, "SAME"))
    wino = tf.function(lambda x: wino_conv(x, U), jit_compile=True)
    wino_g = tf.function(lambda x: wino_conv(x, U))
    err = np.abs(direct(x).numpy()-wino(x).numpy()).max()/np.abs(direct(x).numpy()).max()
    fl = 2*b*s*s*ci*co*9
    td, tg, tw, twg = bench(direct, x), bench(direct_g, x), bench(wino, x), bench(wino_g, x)
    print(f"{b}x{s}x{s}x{ci}->{co}: direct xla {td*1e3:.1f} ms ({fl/td/1e9:.0f} GF/s) graph {tg*1e3:.1f}  wino xla {tw*1e3:.1f} graph {twg*1e3:.1f} ms relerr {err:.1e}", flush=True)
