"""Foreground colour refinement by blur fusion (Germer et al. 2020).

Why: a matte α says *how much* of a pixel is foreground, not *which colour* the foreground
has. Composited onto a new background, hair and soft edges keep a halo of the old
background unless the foreground colour F is estimated from I = α·F + (1−α)·B. Blur
fusion ("Fast Multi-Level Foreground Estimation") does that with two box-filter passes::

    step(I, F, B, α, r):
        Fb = blur(F·α, r) / (blur(α, r) + 1e-5)
        Bb = blur(B·(1−α), r) / ((1 − blur(α, r)) + 1e-5)
        F' = clip(Fb + α·(I − α·Fb − (1−α)·Bb), 0, 1)
        return F', Bb
    F1, B1 = step(I, I, I, α, 90);  F2, _ = step(I, F1, B1, α, 6)

``blur`` is OpenCV's ``cv2.blur``: an r×r normalised box with anchor (r//2, r//2), i.e. the
offsets −r//2 … r−1−r//2 on both axes, and BORDER_REFLECT_101 borders (index −1 → 1,
n → n−2, folded again and again for windows wider than the image; a length-1 axis is
constant). This module reproduces the float64 OpenCV result to within ±1 grey level.

How (why it is fast and still accurate):

* The cost must not grow with r, so every box is a running sum, never an r-tap loop.
  Along the contiguous width axis the running sum is a cumulative sum taken in float64
  (``cumsum`` then ``C[x+r] − C[x]``). In float32 that subtraction of two prefix sums of
  ~4000 values loses ~2e-4 of absolute precision, and the 1e-5 regulariser of the formula
  turns that into errors of tens of grey levels wherever ``blur(α)`` is tiny (sparse hair,
  speckle). In float64 the error is ~1e-11, and float64 is only used for the 7 channels
  of the radius-90 pass, over one strip of rows at a time.
* Along the height axis a cumulative sum would be a strided scan (slow on CPU), so the
  window sum is updated row by row, ``S[y] = S[y−1] + X[y+b] − X[y−a−1]``, in float64,
  each update being one vectorised op over a whole row of all channels.
* The radius-6 pass only adds non-negative values (no cancellation), so it runs in
  float32 with shifted-slice additions by doubling (2, 4, 6: three adds per axis).
* The image streams through in strips of rows, with fixed buffers reused for every strip.
  Full-image temporaries would cost far more in page faults and DRAM traffic than the
  arithmetic itself on CPU; strips keep the working set in the cache.
* ``blur(1−α)`` is filtered as its own channel (exactly ``1 − blur(α)``) so that
  ``1 − blur(α)`` near 1 − 1e-5 does not suffer float32 cancellation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .errors import InvalidImage

__all__ = ["refine_foreground", "refine_foreground_tensor"]

_EPS = 1e-5

RowSink = Callable[[int, int, Tensor], None]


def _reflect101(q: Tensor, n: int) -> Tensor:
    """Map (possibly out-of-range) indices onto [0, n) like OpenCV's BORDER_REFLECT_101."""
    if n == 1:
        return torch.zeros_like(q)
    period = 2 * n - 2
    q = torch.remainder(q, period)
    return torch.where(q >= n, period - q, q)


def _rows(t: Tensor, q0: int, q1: int, dim: int) -> Tensor:
    """Rows (or columns) ``q0 … q1−1`` of ``t`` along ``dim``, reflect-101 beyond the edges.

    A view when the range lies inside; a gathered copy otherwise (only near borders).
    """
    n = t.shape[dim]
    if 0 <= q0 and q1 <= n:
        return t.narrow(dim, q0, q1 - q0)
    idx = _reflect101(torch.arange(q0, q1, device=t.device), n)
    return t.index_select(dim, idx)


def _one_minus(x: Tensor, out: Tensor) -> Tensor:
    """``out ← 1 − x`` in one pass."""
    return torch.add(x.new_ones(()), x, alpha=-1, out=out)


class _Pool:
    """Scratch tensors allocated once per image and reused for every strip (see module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bufs: dict[str, Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        buf = self._bufs.get(key)
        n = 1
        for s in shape:
            n *= s
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = torch.empty(n, device=self.device, dtype=dtype)
            self._bufs[key] = buf
        return buf[:n].view(shape)


def _window_sums(x: Tensor, r: int, dim: int, out: Tensor, pool: _Pool, tag: str) -> Tensor:
    """``out[i] = x[i] + … + x[i+r−1]`` along ``dim`` by doubling; only adds (x ≥ 0).

    Uses ⌊log2 r⌋ + popcount(r) − 1 additions whatever r is (r = 6: three).
    """
    m = x.shape[dim] - r + 1
    powers: dict[int, Tensor] = {1: x}
    k = 1
    while 2 * k <= r:
        p = powers[k]
        n = p.shape[dim] - k
        shape = list(p.shape)
        shape[dim] = n
        dst = out if (2 * k == r) else pool.get(f"{tag}{2 * k}", tuple(shape), x.dtype)
        torch.add(p.narrow(dim, 0, n), p.narrow(dim, k, n), out=dst)
        powers[2 * k] = dst
        k *= 2
    bits = [b for b in sorted(powers, reverse=True) if r & b]
    if len(bits) == 1:
        if bits[0] == 1:
            out.copy_(x)
        return out
    torch.add(powers[bits[0]].narrow(dim, 0, m), powers[bits[1]].narrow(dim, bits[0], m), out=out)
    off = bits[0] + bits[1]
    for b in bits[2:]:
        out.add_(powers[b].narrow(dim, off, m))
        off += b
    return out


class _Refiner:
    """Streams one image (I: (3,H,W), A: (1,H,W), float) through both blur-fusion steps.

    Step 1 rows are produced in order (``_produce``) into a window of step-2 inputs that
    are already box-filtered along the width; ``run`` walks output strips, produces what
    they need, filters the window along the height and finishes step 2.
    """

    def __init__(
        self, image: Tensor, alpha: Tensor, r1: int, r2: int, chunk: int, acc: torch.dtype
    ) -> None:
        self.I, self.A = image, alpha
        self.r1, self.r2 = r1, r2
        self.a1, self.b1 = r1 // 2, r1 - 1 - r1 // 2
        self.a2, self.b2 = r2 // 2, r2 - 1 - r2 // 2
        _, H, W = image.shape
        self.H, self.W = H, W
        self.k = chunk
        self.acc_dtype = acc
        self.dt = image.dtype
        self.pool = _Pool(image.device)
        self.acc = torch.zeros(7, W, device=image.device, dtype=acc)
        self.produced = 0  # step-1 rows produced so far
        # window of step-2 inputs [F1·α, α, B1·(1−α)], already summed along the width
        self.cap = chunk + r2 - 1 + 2
        self.Zw = torch.empty(7, self.cap, W, device=image.device, dtype=self.dt)
        self.wlo = 0  # actual row held in Zw[:, 0]; rows wlo … produced−1 are held

    # ------------------------------------------------------------------ step 1
    def _x_rows(self, q0: int, q1: int, out: Tensor, tag: str) -> None:
        """Step-1 filter inputs [I·α, α, I·(1−α)] of padded rows q0…q1−1 into ``out``."""
        img = _rows(self.I, q0, q1, 1)
        a = _rows(self.A, q0, q1, 1)
        one_a = self.pool.get(tag, tuple(a.shape), self.dt)
        _one_minus(a, one_a)
        torch.mul(img, a, out=out[0:3])
        out[3:4].copy_(a)
        torch.mul(img, one_a, out=out[4:7])

    def _produce(self, n: int) -> None:
        """Step 1 for the next ``n`` actual rows; append their width-filtered Z rows."""
        p = self.produced
        W, r1, a1, b1 = self.W, self.r1, self.a1, self.b1
        pool, acc_dt, dt = self.pool, self.acc_dtype, self.dt
        xp = pool.get("xp", (7, n, W), acc_dt)
        xm = pool.get("xm", (7, n, W), acc_dt)
        # height-direction running sum: S[y] = S[y-1] + X[y+b1] - X[y-a1-1] (float64:
        # the subtraction is exact and the running sum does not drift)
        self._x_rows(p + b1, p + n + b1, xp, "oa")
        self._x_rows(p - a1 - 1, p + n - a1 - 1, xm, "oa")
        xp.sub_(xm)
        if p == 0:
            full = torch.empty(7, r1, W, device=xp.device, dtype=acc_dt)
            self._x_rows(-a1, b1 + 1, full, "oa0")
            torch.sum(full, 1, out=self.acc)
            del full
            xp[:, 0].zero_()
        P = pool.get("P", (7, n, W + r1), acc_dt)
        S = P[:, :, 1 + a1 : 1 + a1 + W]
        prev = self.acc
        for j in range(n):
            torch.add(prev, xp[:, j], out=S[:, j])
            prev = S[:, j]
        self.acc.copy_(prev)
        # width-direction box: float64 prefix sums over the reflect-101 padded rows
        P[:, :, 0].zero_()
        P[:, :, 1 : 1 + a1].copy_(_rows(S, -a1, 0, 2))
        P[:, :, 1 + a1 + W :].copy_(_rows(S, W, W + b1, 2))
        torch.cumsum(P, dim=2, out=P)
        hi, lo = P[:, :, r1 : r1 + W], P[:, :, 0:W]
        Y = pool.get("Y", (8, n, W), dt)  # window sums (× r1²); Y[7] = sum of (1 − α)
        torch.sub(hi, lo, out=Y[0:7])
        rr = float(r1 * r1)
        t1 = pool.get("t1", (1, n, W), acc_dt)
        torch.add(lo[3:4], rr, out=t1)
        torch.sub(t1, hi[3:4], out=Y[7:8])
        img = self.I[:, p : p + n]
        a = self.A[:, p : p + n]
        one_a = pool.get("one_a", (1, n, W), dt)
        _one_minus(a, one_a)
        self._fuse(Y, img, a, one_a, rr, pool.get("t3", (3, n, W), dt))
        f1, bb = Y[0:3], Y[4:7]
        # step-2 inputs, reflect-101 padded in width, then summed along the width
        r2, a2 = self.r2, self.a2
        Zp = pool.get("Zp", (7, n, W + r2 - 1), dt)
        torch.mul(f1, a, out=Zp[0:3, :, a2 : a2 + W])
        Zp[3:4, :, a2 : a2 + W].copy_(a)
        torch.mul(bb, one_a, out=Zp[4:7, :, a2 : a2 + W])
        inner = Zp[:, :, a2 : a2 + W]
        Zp[:, :, 0:a2].copy_(_rows(inner, -a2, 0, 2))
        Zp[:, :, a2 + W :].copy_(_rows(inner, W, W + r2 - 1 - a2, 2))
        z0 = p - self.wlo
        _window_sums(Zp, r2, 2, self.Zw[:, z0 : z0 + n], pool, "zw")
        self.produced += n

    @staticmethod
    def _fuse(Y: Tensor, img: Tensor, a: Tensor, one_a: Tensor, rr: float, t: Tensor) -> None:
        """In place: Y[0:3] ← F' = clip(Fb + α(I − α·Fb − (1−α)·Bb), 0, 1), Y[4:7] ← Bb.

        ``Y`` holds window sums (× rr = r²) of [F·α, α, B·(1−α), 1−α]; the same 1e-5 as
        the definition is added to the *normalised* sums, i.e. rr·1e-5 to the raw ones.
        """
        fb, bb = Y[0:3], Y[4:7]
        Y[3:4].add_(rr * _EPS)
        Y[7:8].add_(rr * _EPS)
        fb.div_(Y[3:4])
        bb.div_(Y[7:8])
        torch.addcmul(img, a, fb, value=-1.0, out=t)
        t.addcmul_(one_a, bb, value=-1.0)
        fb.addcmul_(a, t).clamp_(0.0, 1.0)

    # ------------------------------------------------------------------ step 2
    def run(self, sink: RowSink) -> None:
        H, W, r2, a2, b2, k = self.H, self.W, self.r2, self.a2, self.b2, self.k
        pool = self.pool
        for y0 in range(0, H, k):
            y1 = min(H, y0 + k)
            n = y1 - y0
            idx = _reflect101(torch.arange(y0 - a2, y1 + b2), H)
            lo, hi = int(idx.min()), int(idx.max()) + 1
            if lo > self.wlo:  # drop rows no longer needed
                keep = self.produced - lo
                if keep > 0:
                    src = self.Zw[:, lo - self.wlo : self.produced - self.wlo]
                    self.Zw[:, :keep].copy_(src.clone() if keep > lo - self.wlo else src)
                self.wlo = lo
            while self.produced < hi:
                room = self.cap - (self.produced - self.wlo)
                self._produce(min(hi - self.produced, k, room))
            rel = idx - self.wlo
            m = n + r2 - 1
            if bool((rel[1:] - rel[:-1] == 1).all()):
                zr = self.Zw[:, int(rel[0]) : int(rel[0]) + m]
            else:
                zr = self.Zw.index_select(1, rel.to(self.Zw.device))
            Y = pool.get("Y2", (8, n, W), self.dt)
            _window_sums(zr, r2, 1, Y[0:7], pool, "zh")
            rr = float(r2 * r2)
            # sum of (1 − α) over the window: r2² − sum of α; float32 is enough here (see
            # module doc: its error reaches F2 multiplied by (1 − α) ≤ r2²·(1 − blur(α)))
            torch.add(Y.new_full((), rr), Y[3:4], alpha=-1, out=Y[7:8])
            img = self.I[:, y0:y1]
            a = self.A[:, y0:y1]
            one_a = pool.get("one_a2", (1, n, W), self.dt)
            _one_minus(a, one_a)
            self._fuse(Y, img, a, one_a, rr, pool.get("t3b", (3, n, W), self.dt))
            sink(y0, y1, Y[0:3])


def _chunk_rows(device: torch.device, H: int, W: int) -> int:
    if device.type != "cpu":
        return H
    # ~16k pixels per row block keeps a strip's float64 buffers within a few MB of cache
    return max(8, min(H, 64))


def _acc_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; there the width-direction sums fall back to float32.
    return torch.float32 if device.type == "mps" else torch.float64


def _refine_planes(
    image: Tensor, alpha: Tensor, radius: int, fine_radius: int, sink: RowSink
) -> None:
    _, H, W = image.shape
    chunk = _chunk_rows(image.device, H, W)
    _Refiner(image, alpha, radius, fine_radius, chunk, _acc_dtype(image.device)).run(sink)


def _check_radii(radius: int, fine_radius: int) -> None:
    for name, r in (("radius", radius), ("fine_radius", fine_radius)):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{name} must be a positive int, got {r!r}")


def refine_foreground_tensor(
    rgb: Tensor, alpha: Tensor, *, radius: int = 90, fine_radius: int = 6
) -> Tensor:
    """Blur-fusion foreground colours, on the tensors' own device.

    ``rgb``: (B, 3, H, W) or (3, H, W) float in [0, 1]; ``alpha``: (B, 1, H, W) or (1, H, W)
    float in [0, 1]. Returns F (same shape as ``rgb``, float in [0, 1], before any
    quantisation). Computes in float32 (float64 if ``rgb`` is float64), with float64 sums.
    """
    _check_radii(radius, fine_radius)
    if not isinstance(rgb, Tensor) or not isinstance(alpha, Tensor):
        raise InvalidImage("rgb and alpha must be torch tensors")
    if not rgb.is_floating_point() or not alpha.is_floating_point():
        raise InvalidImage(f"rgb and alpha must be float tensors, got {rgb.dtype}, {alpha.dtype}")
    batched = rgb.dim() == 4
    if rgb.dim() not in (3, 4) or rgb.shape[-3] != 3:
        raise InvalidImage(f"rgb must be (B, 3, H, W) or (3, H, W), got {tuple(rgb.shape)}")
    want = (*rgb.shape[:-3], 1, *rgb.shape[-2:])
    if tuple(alpha.shape) != want:
        raise InvalidImage(f"alpha must have shape {want}, got {tuple(alpha.shape)}")
    if rgb.shape[-1] == 0 or rgb.shape[-2] == 0:
        raise InvalidImage("empty image")
    dt = torch.float64 if rgb.dtype == torch.float64 else torch.float32
    x = rgb.to(dt) if batched else rgb.to(dt)[None]
    a = alpha.to(device=rgb.device, dtype=dt)
    a = a if batched else a[None]
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        o = out[i]

        def sink(y0: int, y1: int, f: Tensor, o: Tensor = o) -> None:
            o[:, y0:y1].copy_(f)

        _refine_planes(x[i].contiguous(), a[i].contiguous(), radius, fine_radius, sink)
    return out if batched else out[0]


def _as_tensor(x: object, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise InvalidImage(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def refine_foreground(
    rgb: np.ndarray | Tensor,
    alpha: np.ndarray | Tensor,
    *,
    radius: int = 90,
    fine_radius: int = 6,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Refined foreground colours of ``rgb`` under ``alpha``, as uint8 H×W×3 (numpy).

    ``rgb``: uint8 H×W×3, ``alpha``: uint8 H×W (numpy arrays or torch tensors). Values are
    ``trunc(F·255)`` (truncated like the reference, not rounded). Numpy inputs are
    computed on ``device`` (default CPU); tensors on their own device unless ``device``
    is given.
    """
    _check_radii(radius, fine_radius)
    t_rgb = _as_tensor(rgb, "rgb")
    t_a = _as_tensor(alpha, "alpha")
    if t_rgb.dtype != torch.uint8 or t_a.dtype != torch.uint8:
        raise InvalidImage(f"rgb and alpha must be uint8, got {t_rgb.dtype} and {t_a.dtype}")
    if t_rgb.dim() != 3 or t_rgb.shape[2] != 3:
        raise InvalidImage(f"rgb must be H×W×3, got shape {tuple(t_rgb.shape)}")
    if tuple(t_a.shape) != tuple(t_rgb.shape[:2]):
        raise InvalidImage(
            f"alpha must be H×W matching rgb {tuple(t_rgb.shape[:2])}, got {tuple(t_a.shape)}"
        )
    H, W = t_a.shape
    if H == 0 or W == 0:
        raise InvalidImage("empty image")
    if device is not None:
        dev = torch.device(device)
    elif isinstance(rgb, Tensor):
        dev = rgb.device
    else:
        dev = torch.device("cpu")
    img = t_rgb.to(dev).permute(2, 0, 1).to(torch.float32).div_(255.0)
    a = t_a.to(dev)[None].to(torch.float32).div_(255.0)
    out = torch.empty(H, W, 3, dtype=torch.uint8, device=dev)

    def sink(y0: int, y1: int, f: Tensor) -> None:
        # float -> uint8 conversion truncates toward zero, as the reference does
        out[y0:y1].copy_(f.mul(255.0).permute(1, 2, 0))

    with torch.inference_mode():
        _refine_planes(img.contiguous(), a.contiguous(), radius, fine_radius, sink)
    return out.cpu().numpy()
