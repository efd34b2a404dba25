"""Synthetic, learnable 10-class image data used to quick-train the exported classifiers.

numpy only, so every exporter venv (torch, tensorflow, paddle) can import it. Class k is an
oriented sinusoidal grating (orientation pi*k/10, random frequency and phase) tinted with a
class-dependent colour, plus Gaussian noise and a random brightness offset. Values are roughly
zero-mean, unit-scale (already "normalised"), so no preprocessing is needed.

    x, y = make_batch(n, res=32, seed=0, layout="NCHW")   # x float32 [n,3,res,res], y int64 [n]
"""
import numpy as np

NUM_CLASSES = 10


def make_batch(n, res=32, seed=0, layout="NCHW", labels=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n) if labels is None else np.asarray(labels, dtype=np.int64)
    n = len(y)
    yy, xx = np.meshgrid(np.linspace(-1, 1, res), np.linspace(-1, 1, res), indexing="ij")
    theta = np.pi * y / NUM_CLASSES + rng.normal(0, 0.05, n)
    freq = rng.uniform(2.5, 4.5, n) * np.pi
    phase = rng.uniform(0, 2 * np.pi, n)
    proj = np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy
    g = np.sin(freq[:, None, None] * proj + phase[:, None, None])  # [n,res,res]
    ang = 2 * np.pi * y / NUM_CLASSES
    tint = np.stack([0.8 + 0.5 * np.cos(ang), 0.8 + 0.5 * np.sin(ang), 0.8 - 0.3 * np.cos(ang)], 1)  # [n,3]
    x = tint[:, :, None, None] * g[:, None] + rng.normal(0, 0.35, (n, 3, res, res))
    x += rng.normal(0, 0.2, (n, 1, 1, 1))
    x = x.astype(np.float32)
    if layout == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return x, y.astype(np.int64)
