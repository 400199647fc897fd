"""Benchmark of blur-fusion foreground refinement (``ben2q.refine``) at 1, 4 and 12 MP.

Run: ``.venv/bin/python bench/refine.py [--sizes 1,4,12] [--repeats 5] [--baseline-repeats 3]``

For each size it times ``refine_foreground`` (uint8 in, uint8 out, torch intra-op threads
= 2) on a synthetic image (gradients, texture, noise) with an ellipse matte with soft
edges, and, in the same run, a straightforward float64 numpy implementation of the same
definition (box filter = numpy cumulative sums over reflect-101 padded axes). It prints
the raw times (median of the repeats, and all of them), the ratio ours / baseline, and
how closely the two outputs agree. OpenCV is not used (not a dependency).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ben2q.refine import refine_foreground

SIZES = {1: (864, 1152), 4: (1728, 2304), 12: (3000, 4000)}  # MP -> (H, W), 4:3


def synthetic(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Textured noisy RGB and an ellipse alpha whose edge ramps over ~6% of the radius."""
    rng = np.random.default_rng(seed)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[..., 0] = 127 + 100 * np.sin(x / 37) * np.cos(y / 53)
    rgb[..., 1] = 255 * x / w
    rgb[..., 2] = ((x // 64 + y // 64) % 2) * 200 + 20
    rgb ^= rng.integers(0, 32, (h, w, 3), dtype=np.uint8)
    d = np.hypot((y - h / 2) / (0.35 * h), (x - w / 2) / (0.3 * w))
    alpha = (np.clip((1.03 - d) / 0.06, 0, 1) * 255).astype(np.uint8)
    return rgb, alpha


# ------------------------------------------------------------------ float64 numpy baseline
def _reflect101(p: np.ndarray, n: int) -> np.ndarray:
    if n == 1:
        return np.zeros_like(p)
    period = 2 * n - 2
    p = np.mod(p, period)
    return np.where(p >= n, period - p, p)


def _blur(x: np.ndarray, r: int) -> np.ndarray:
    """cv2.blur(x, (r, r)) on (C, H, W) float64: box sums by cumulative sums, per axis."""
    for axis in (2, 1):
        n = x.shape[axis]
        xp = np.take(x, _reflect101(np.arange(-(r // 2), n + r - 1 - r // 2), n), axis=axis)
        c = np.cumsum(xp, axis=axis)
        zero = np.zeros_like(np.take(c, [0], axis=axis))
        c = np.concatenate([zero, c], axis=axis)
        x = np.take(c, np.arange(r, r + n), axis=axis) - np.take(c, np.arange(n), axis=axis)
    return x / (r * r)


def _step(img, f, b, a, r):
    ba = _blur(a, r)
    fb = _blur(f * a, r) / (ba + 1e-5)
    bb = _blur(b * (1 - a), r) / ((1 - ba) + 1e-5)
    return np.clip(fb + a * (img - a * fb - (1 - a) * bb), 0, 1), bb


def baseline(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    img = rgb.astype(np.float64).transpose(2, 0, 1) / 255
    a = alpha.astype(np.float64)[None] / 255
    f1, b1 = _step(img, img, img, a, 90)
    f2, _ = _step(img, f1, b1, a, 6)
    return (f2 * 255).astype(np.uint8).transpose(1, 2, 0)


# ------------------------------------------------------------------------------ driver
def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,12", help="megapixels, among 1, 4, 12")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of ours (after a warm-up)")
    ap.add_argument("--baseline-repeats", type=int, default=3, help="timed runs of the baseline")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}")
    print(
        f"{'size':>12} {'ours med (s)':>13} {'numpy f64 med (s)':>18} {'ratio':>7}"
        f" {'within ±1':>10} {'max |Δ|':>8}   raw ours / raw baseline (s)"
    )
    for mp in (int(s) for s in args.sizes.split(",")):
        h, w = SIZES[mp]
        rgb, alpha = synthetic(h, w)
        refine_foreground(rgb, alpha)  # warm-up (allocator, thread pool)
        ours_t, ours = timed(
            lambda rgb=rgb, alpha=alpha: refine_foreground(rgb, alpha), args.repeats
        )
        base_t, base = timed(
            lambda rgb=rgb, alpha=alpha: baseline(rgb, alpha), args.baseline_repeats
        )
        d = np.abs(ours.astype(np.int16) - base.astype(np.int16))
        mo, mb = statistics.median(ours_t), statistics.median(base_t)
        raw = f"{[round(t, 3) for t in ours_t]} / {[round(t, 2) for t in base_t]}"
        print(
            f"{f'{w}x{h}':>12} {mo:>13.3f} {mb:>18.2f} {mo / mb:>7.3f}"
            f" {float((d <= 1).mean()):>10.4%} {int(d.max()):>8}   {raw}",
            flush=True,
        )


if __name__ == "__main__":
    main()
