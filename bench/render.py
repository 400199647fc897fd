"""Benchmark of the rendering step (``ben2q.render``: output options + encoding) at 1, 4 and
12 MP, against the CPU engine time of the same image, and our encoders against Pillow's
defaults on the same pixels.

    .venv/bin/python bench/render.py                       # 1, 4, 12 MP; engine measured
    .venv/bin/python bench/render.py --no-engine           # render and encoders only
    .venv/bin/python bench/render.py --engine-ms 23000     # the engine time given, not measured
    .venv/bin/python bench/render.py --sizes 1 --repeat 5 --explore

Content: the real photograph of the conformance fixtures (``tests/fixtures/b_photo.png``,
512x600) scaled to the size with Lanczos, plus a light fixed-seed grain (sigma 2, as a
camera's sensor leaves; ``--grain 0`` for none), and a realistic soft matte drawn at that
size: a smooth head-and-shoulders silhouette (hat, head, neck, torso: smooth union of
ellipses) with an anti-aliased edge about as soft as BEN2's (its 1024x1024 mask is scaled to
the image), a band of semi-transparent hair-like wisps around the face and a few thin
flyaway strands, and a few faint specks off the subject and pinholes in it (so that
``mask_smooth`` has work). No random-noise matte: that is a worst case no user sees.

Cases (``ben2q.render.render``, what a job runs after the engine): default PNG, lossless
WebP, lossy WebP (quality 80), composite on white + JPEG, crop 5 % + PNG, alpha only,
a 1000 px thumbnail on white (``format=auto``: JPEG), ``mask_smooth`` (+ PNG). Each render is
timed ``--repeat`` times after one warm-up call (median reported, all listed), and so are
its two halves, each alone: ``compose`` (clean-up, crop, resize, background) and ``encode``.
Each render is given as a share of the engine's time for the same image:
``Engine.load(spec="base")`` (the checkpoint of ``--weights``, ``BEN2Q_WEIGHTS`` or the hub
cache if there is one, else the deterministic weights: the same arithmetic), CPU float32,
``predict`` on that image (its pre- and post-processing at that size included),
``--engine-repeat`` timed calls per size after one warm-up call before the first size
(``--engine-warmup-each``: before every size; a forward costs about 20 s here, so the default
run takes about 4 minutes, 1.5 without the engine). Goal: render <= 5 % of the engine at 1 MP.

Encoders against Pillow's defaults, on the same pixels (the cut-out's RGBA, or the
composite on white for JPEG): JPEG (ours quality 90 vs ``save(format="JPEG")`` = quality
75), lossless WebP (ours method 2 / quality 50 / exact vs ``lossless=True``: method 4 /
quality 80), lossy WebP (ours method 2 vs method 4, both quality 80), PNG (``ben2q.png``
vs ``save(format="PNG")``, compress_level 6). Ratios are ours / Pillow; Pillow's are timed
``--baseline-repeat`` times (default 1: at 12 MP its PNG takes 8 s). ``--explore`` adds
the settings around ours (WebP methods and efforts, JPEG subsampling and optimize, PNG
levels) on the first size.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ben2q.jobs import job_options
from ben2q.png import encode_png
from ben2q.render import compose, render
from ben2q.render.encode import encode

PHOTO = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "b_photo.png"
PHOTO_W, PHOTO_H = 512, 600

CASES: list[tuple[str, dict]] = [
    ("png (default)", {}),
    ("webp lossless", {"format": "webp"}),
    ("webp q80", {"format": "webp", "quality": 80}),
    ("white + jpeg", {"background": "white", "format": "jpeg"}),
    ("crop 5% + png", {"crop": True, "crop_margin": "5%"}),
    ("alpha only png", {"channels": "alpha"}),
    ("thumb 1000 white", {"max_side": 1000, "background": "white", "format": "auto"}),
    ("mask_smooth png", {"mask_smooth": True}),
]


def size_for(megapixels: float) -> tuple[int, int]:
    """(width, height) of about ``megapixels`` at the photograph's aspect (512:600)."""
    width = round((megapixels * 1e6 * PHOTO_W / PHOTO_H) ** 0.5)
    return width, round(width * PHOTO_H / PHOTO_W)


# --------------------------------------------------------------------------- the content
def photo(width: int, height: int, grain: float = 2.0, seed: int = 0) -> np.ndarray:
    """The fixture photograph at (width, height), Lanczos, with a fixed-seed grain."""
    img = Image.open(PHOTO).convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    rgb = np.asarray(img)
    if grain <= 0:
        return rgb.copy()
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, grain, (height, width, 1)).astype(np.float32)  # luma grain
    noise = noise + rng.normal(0.0, grain / 2, (height, width, 3)).astype(np.float32)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def _ellipse_sdf(x, y, cx, cy, rx, ry):
    """Approximate signed distance to an ellipse (photo pixels; negative inside)."""
    return (np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1.0) * min(rx, ry)


def _smooth_min(a, b, k):
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def matte(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A head-and-shoulders matte of the photograph at (width, height): smooth shape, soft
    anti-aliased edge (about BEN2's: its 1024² mask scaled up), hair-like wisps."""
    k = width / PHOTO_W  # image pixels per photo pixel
    soft = max(height, width) / 1024  # BEN2's mask pixel, in image pixels
    # photo coordinates of every pixel centre (float32 rows/columns, broadcast)
    y = ((np.arange(height, dtype=np.float32) + 0.5) / k)[:, None]
    x = ((np.arange(width, dtype=np.float32) + 0.5) / k)[None, :]
    hat = _ellipse_sdf(x, y, 262, 108, 110, 84)
    head = _ellipse_sdf(x, y, 265, 240, 108, 112)
    neck = np.maximum(np.abs(x - 262) - 52, np.abs(y - 340) - 50)
    torso = _ellipse_sdf(x, y, 262, 720, 330, 375)
    sdf = _smooth_min(_smooth_min(_smooth_min(hat, head, 40), neck, 20), torso, 36)
    sdf_px = sdf * k
    t = np.clip(0.5 - sdf_px / (2.4 * soft), 0.0, 1.0)
    alpha = t * t * (3 - 2 * t)
    # wisps: a band outside the head's sides, striped along the angle like combed hair
    d_head = _ellipse_sdf(x, y, 265, 245, 104, 104)
    theta = np.arctan2(y - 245, x - 265)
    side = np.clip((np.abs(np.cos(theta)) - 0.35) / 0.3, 0.0, 1.0) * (y > 150)
    reach = 16.0 + 6.0 * np.sin(theta * 9.0)
    band = np.clip(1.0 - d_head / reach, 0.0, 1.0) * (d_head > -4)
    stripe = (0.5 + 0.5 * np.sin(theta * 260.0 + 2.5 * np.sin(theta * 23.0))) ** 3
    wisps = 0.75 * band**1.5 * side * (0.25 + 0.75 * stripe)
    alpha = np.maximum(alpha, wisps)
    out = (alpha * 255.0 + 0.5).astype(np.uint8)
    del alpha, wisps, band, stripe, sdf, sdf_px, t, theta, side, reach, d_head
    # flyaway strands: thin random-walk curves from the hair outwards, semi-transparent
    rng = np.random.default_rng(seed)
    layer = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    line = max(1, round(0.6 * soft))
    for _ in range(70):
        a = rng.uniform(-0.9, 0.9) + (np.pi if rng.random() < 0.5 else 0.0)
        px, py = 265 + 104 * np.cos(a), 245 + 104 * np.sin(a)
        heading = a + rng.normal(0, 0.4)
        points = [(px * k, py * k)]
        for _ in range(12):
            heading += rng.normal(0, 0.12)
            px, py = px + 2.2 * np.cos(heading), py + 2.2 * np.sin(heading) + 0.6
            points.append((px * k, py * k))
        draw.line(points, fill=int(rng.uniform(70, 190)), width=line, joint="curve")
    if soft > 0.9:
        layer = layer.filter(ImageFilter.GaussianBlur(0.45 * soft))
    np.maximum(out, np.asarray(layer), out=out)
    # what a real matte also has: a few faint specks off the subject, a few pinholes in it
    for _ in range(12):
        cx, cy, r = rng.uniform(20, 120) * k, rng.uniform(40, 300) * k, rng.uniform(0.6, 1.6) * k
        _dot(
            out,
            cx if rng.random() < 0.5 else width - cx,
            cy,
            r,
            soft,
            int(rng.uniform(20, 120)),
            max,
        )
    for _ in range(8):
        cx, cy, r = rng.uniform(120, 400) * k, rng.uniform(470, 590) * k, rng.uniform(0.5, 1.2) * k
        _dot(out, cx, cy, r, soft, int(rng.uniform(60, 200)), min)
    return out


def _dot(alpha: np.ndarray, cx: float, cy: float, r: float, soft: float, level: int, op) -> None:
    """A soft disc of alpha ``level``: raised (op=max, a speck) or lowered (min, a hole)."""
    x0, x1 = max(int(cx - r - 3 * soft), 0), min(int(cx + r + 3 * soft) + 1, alpha.shape[1])
    y0, y1 = max(int(cy - r - 3 * soft), 0), min(int(cy + r + 3 * soft) + 1, alpha.shape[0])
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    t = np.clip(0.5 - (np.hypot(xx - cx, yy - cy) - r) / (2 * soft), 0.0, 1.0)
    patch = alpha[y0:y1, x0:x1]
    if op is max:
        np.maximum(patch, (t * level).astype(np.uint8), out=patch)
    else:
        np.minimum(patch, (255 - t * (255 - level)).astype(np.uint8), out=patch)


# ------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], object], repeat: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median and all times (ms) of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_engine(weights: Path | None):
    """The base network on the CPU in float32: a checkpoint when there is one (``weights``,
    ``BEN2Q_WEIGHTS`` or the hub cache), else the deterministic weights (same cost)."""
    from ben2q.engine import Engine
    from ben2q.errors import WeightsUnavailable

    try:
        engine = Engine.load(
            spec="base", weights=weights, device="cpu", precision="float32", max_batch=1
        )
        return engine, "checkpoint"
    except WeightsUnavailable:
        if weights is not None:
            raise
    from ben2q.model import build_model, deterministic_state_dict

    model = build_model("base")
    model.load_state_dict(deterministic_state_dict(model), strict=True)
    return Engine(model, device="cpu", precision="float32", max_batch=1), "deterministic weights"


def _pil(pixels: np.ndarray, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **params)
    return buf.getvalue()


def _webp(pixels: np.ndarray, **params) -> bytes:
    return _pil(pixels, "WEBP", **params)


def encoder_pairs(rgb: np.ndarray, alpha: np.ndarray, on_white: np.ndarray):
    """(name, ours, Pillow's default) on the same pixels; each callable returns bytes and
    starts from the numpy arrays (the conversion to a PIL image is part of both)."""
    jpeg, webp_ll = job_options(background="white", format="jpeg"), job_options(format="webp")
    webp_q80, png = job_options(format="webp", quality=80), job_options()
    return [
        (
            "JPEG  q90 vs Pillow q75",
            lambda: encode("RGB", on_white, alpha, jpeg),
            lambda: _pil(on_white, "JPEG"),
        ),
        (
            "WebP lossless m0/q25 vs m4/q80",
            lambda: encode("RGBA", rgb, alpha, webp_ll),
            lambda: _webp(np.dstack([rgb, alpha]), lossless=True),
        ),
        (
            "WebP lossy q80 m2/alpha 90 vs m4",
            lambda: encode("RGBA", rgb, alpha, webp_q80),
            lambda: _webp(np.dstack([rgb, alpha])),
        ),
        (
            "PNG   ben2q.png vs Pillow level 6",
            lambda: encode("RGBA", rgb, alpha, png),
            lambda: _pil(np.dstack([rgb, alpha]), "PNG"),
        ),
    ]


def explore(rgb: np.ndarray, alpha: np.ndarray, on_white: np.ndarray, repeat: int) -> None:
    """Encoder settings around ours: time and bytes, ours marked with *."""
    rgba = np.dstack([rgb, alpha])
    rows: list[tuple[str, Callable[[], bytes]]] = []
    for method in range(5):
        for quality in (0, 25, 50, 75, 100):
            rows.append(
                (
                    f"webp lossless exact method {method} quality {quality:3d}"
                    + (" *" if (method, quality) == (2, 50) else ""),
                    lambda m=method, q=quality: _webp(
                        rgba, lossless=True, exact=True, method=m, quality=q
                    ),
                )
            )
    rows.append(
        (
            "webp lossless NOT exact method 2 quality  50",
            lambda: _webp(rgba, lossless=True, method=2, quality=50),
        )
    )
    for method in range(7):
        rows.append(
            (
                f"webp lossy q80 method {method}" + (" *" if method == 2 else ""),
                lambda m=method: _webp(rgba, quality=80, method=m),
            )
        )
    for label, params in [
        ("jpeg q90 4:2:0 *", {"quality": 90}),
        ("jpeg q90 4:2:2", {"quality": 90, "subsampling": 1}),
        ("jpeg q90 4:4:4", {"quality": 90, "subsampling": 0}),
        ("jpeg q90 4:2:0 optimize", {"quality": 90, "optimize": True}),
        ("jpeg q90 4:2:0 progressive", {"quality": 90, "progressive": True}),
        ("jpeg q85 4:2:0", {"quality": 85}),
    ]:
        rows.append((label, lambda p=params: _pil(on_white, "JPEG", **p)))
    for level in (1, 2, 3, 6):
        rows.append(
            (
                f"png ben2q.png level {level}" + (" *" if level == 1 else ""),
                lambda lv=level: encode_png(rgb, alpha=alpha, level=lv),
            )
        )
    rows.append(("png ben2q.png, 1 thread", lambda: encode_png(rgb, alpha=alpha, threads=1)))
    for level in (0, 1, 6):
        rows.append(
            (
                f"png Pillow compress_level {level}",
                lambda lv=level: _pil(rgba, "PNG", compress_level=lv),
            )
        )
    # the input's colours under fully transparent pixels, zeroed (the cost of it included)
    hidden = alpha[..., None] == 0

    def zeroed() -> np.ndarray:
        return np.where(hidden, np.uint8(0), rgb)

    rows += [
        ("RGB zeroed where alpha=0 (numpy where)", zeroed),
        ("  + png ben2q.png", lambda: encode_png(zeroed(), alpha=alpha)),
        (
            "  + webp lossless exact m0 q25",
            lambda: _webp(
                np.dstack([zeroed(), alpha]), lossless=True, exact=True, quality=25, method=0
            ),
        ),
        (
            "  + webp lossless exact m2 q50",
            lambda: _webp(
                np.dstack([zeroed(), alpha]), lossless=True, exact=True, quality=50, method=2
            ),
        ),
    ]
    print(f"\nencoder settings ({rgb.shape[1]}x{rgb.shape[0]}; * = ours; median of {repeat})")
    print(f"{'setting':<46} {'ms':>9} {'bytes':>11}")
    for label, fn in rows:
        med, _ = timed(fn, repeat, warmup=0)
        out = fn()
        size = f"{len(out):11,d}" if isinstance(out, bytes) else f"{'-':>11}"
        print(f"{label:<46} {med:9.1f} {size}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,12", help="megapixels, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per case (after a warm-up)")
    ap.add_argument("--no-engine", action="store_true", help="do not measure the engine")
    ap.add_argument("--engine-ms", type=float, help="use this engine time (ms) for every size")
    ap.add_argument("--engine-repeat", type=int, default=1, help="timed engine calls per size")
    ap.add_argument(
        "--engine-warmup-each", action="store_true", help="an engine warm-up call per size"
    )
    ap.add_argument(
        "--baseline-repeat", type=int, default=1, help="timed calls of each Pillow default"
    )
    ap.add_argument("--weights", type=Path, help="a BEN2 checkpoint for the engine")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--grain", type=float, default=2.0, help="sigma of the photo's grain")
    ap.add_argument("--explore", action="store_true", help="encoder settings around ours")
    ap.add_argument("--save", type=Path, help=argparse.SUPPRESS)  # dump the content (debug)
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs), load {os.getloadavg()[0]:.2f}")
    print(
        f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}; "
        f"Pillow {Image.__version__}; numpy {np.__version__}; python {sys.version.split()[0]}"
    )
    if args.save:
        w, h = size_for(sizes[0])
        Image.fromarray(np.dstack([photo(w, h, args.grain), matte(w, h)])).save(args.save)
        return

    engine = None
    if args.engine_ms is not None:
        print(f"engine: {args.engine_ms:,.0f} ms for every size (--engine-ms)")
    elif not args.no_engine:
        t0 = time.perf_counter()
        engine, source = load_engine(args.weights)
        warm = "before each size" if args.engine_warmup_each else "before the first size"
        print(
            f"engine: BEN2 base, CPU float32, {source}, loaded in "
            f"{time.perf_counter() - t0:.1f} s; predict() on each image: "
            f"{args.engine_repeat} timed call(s), 1 warm-up call {warm}"
        )
    else:
        print("engine: not measured (--no-engine)")

    summary: list[str] = []
    encoders: list[str] = []
    explored = False
    warmed = False
    head = (
        f"{'case':<18} {'render ms':>10} {'compose':>8} {'encode':>8} "
        f"{'output':>10} {'bytes':>12} {'of engine':>10}   render times (ms)"
    )
    ehead = (
        f"{'encoder':<38} {'ours ms':>9} {'Pillow ms':>10} {'time':>6} "
        f"{'ours bytes':>12} {'Pillow bytes':>13} {'bytes':>6}"
    )
    for mp in sizes:
        width, height = size_for(mp)
        label = f"{width}x{height}"
        rgb, alpha = photo(width, height, args.grain), matte(width, height)
        engine_ms: float | None = args.engine_ms
        if engine is not None:
            img = Image.fromarray(rgb)
            warmup = 0 if warmed and not args.engine_warmup_each else 1
            engine_ms, times = timed(
                lambda img=img: engine.predict([img]), args.engine_repeat, warmup=warmup
            )
            warmed = True
            del img
            print(
                f"\n{label} ({width * height / 1e6:.1f} MP): engine {engine_ms:,.0f} ms  "
                f"[{' '.join(f'{t:,.0f}' for t in times)}]",
                flush=True,
            )
        else:
            print(f"\n{label} ({width * height / 1e6:.1f} MP)", flush=True)
        print(head)
        on_white = None
        for name, fields in CASES:
            opts = job_options(**fields)
            med, times = timed(lambda o=opts, c=rgb, a=alpha: render(c, a, o), args.repeat)
            # its two halves, each timed alone (so they need not add up exactly)
            cmed, _ = timed(lambda o=opts, c=rgb, a=alpha: compose(c, a, o), args.repeat, 0)
            part = compose(rgb, alpha, opts)
            emed, _ = timed(
                lambda o=opts, p=part: encode(p.mode, p.color, p.channel, o), args.repeat, 0
            )
            size = len(encode(part.mode, part.color, part.channel, opts))
            if name == "white + jpeg":
                on_white = part.color
            share = f"{med / engine_ms:10.2%}" if engine_ms else f"{'-':>10}"
            line = (
                f"{name:<18} {med:10.1f} {cmed:8.1f} {emed:8.1f} "
                f"{f'{part.width}x{part.height}':>10} {size:12,d} {share}   "
                f"{' '.join(f'{t:.1f}' for t in times)}"
            )
            print(line, flush=True)
            summary.append(f"{label:>10} {line}")
            del part
        print(
            f"\nencoders on the same pixels ({label}; ours / Pillow's defaults; median of "
            f"{args.repeat} / {args.baseline_repeat})"
        )
        print(ehead)
        for name, ours, pillow in encoder_pairs(rgb, alpha, on_white):
            o_ms, _ = timed(ours, args.repeat, warmup=0)
            p_ms, _ = timed(pillow, args.baseline_repeat, warmup=0)
            o_b, p_b = len(ours()), len(pillow())
            line = (
                f"{name:<38} {o_ms:9.1f} {p_ms:10.1f} {o_ms / p_ms:6.2f} "
                f"{o_b:12,d} {p_b:13,d} {o_b / p_b:6.2f}"
            )
            print(line, flush=True)
            encoders.append(f"{label:>10} {line}")
        if args.explore and not explored:
            explore(rgb, alpha, on_white, args.repeat)
            explored = True
        del rgb, alpha, on_white

    if len(sizes) > 1:
        print("\nsummary (render: median ms; share of the CPU engine's time for the same image)")
        print(f"{'size':>10} {head}")
        print("\n".join(summary))
        print(f"\n{'size':>10} {ehead}")
        print("\n".join(encoders))
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
