"""Before/after pictures of every output option, for the README (``docs/pictures/``).

    python scripts/make_pictures.py             # (re)writes docs/pictures/
    python scripts/make_pictures.py --check     # regenerates into a temporary directory;
                                                # exit 1 if any picture differs from docs/pictures
    python scripts/make_pictures.py --weights BEN2_Base.pth --image photo.jpg --out /tmp/pics

Every picture goes through ``ben2q.render.render``, the very step jobs, the CLI, the HTTP API
and the library run after the engine. By default the input is a synthetic scene whose matte
is known (a shaded vase with dried grass: soft anti-aliased edges and fine semi-transparent
strands, over a busy wallpaper and table), so the pictures show what the options do, not
how good a model is: no BEN2 checkpoint is available where this was written. With
``--weights`` the script instead runs ``Engine.load(weights=...)`` on ``--image`` and uses
BEN2's real matte (then give ``--out``, or the synthetic set in docs/pictures is replaced).

Transparent outputs are shown flattened on a light checkerboard; ``format=jpeg`` is saved as
the very bytes ``render`` wrote. Deterministic (fixed seeds, no clock), a second or two.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ben2q.jobs import job_options
from ben2q.render import Rendered, render, subject_box
from ben2q.render.compose import over_opaque

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "pictures"
WIDTH, HEIGHT = 320, 400
SUPER = 4  # supersampling of the strands
SEED = 20240611
BRAND = "#2D6CDF"
SEMI = "#2D6CDF66"  # the brand colour at 40 % opacity
CHECKER = (255, 255, 255), (224, 224, 224)
CHECKER_SQUARE = 10
ZOOM = 2  # the mask_threshold pictures: a detail, enlarged (nearest neighbour)


# ----------------------------------------------------------------------------- the scene
def wallpaper(width: int, height: int) -> np.ndarray:
    """A busy background: patterned wallpaper over a wooden table (RGB uint8)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    stripes = 0.5 + 0.5 * np.sin((x + y) / 6.0)
    warm = np.array([232, 128, 84], np.float32)
    cool = np.array([54, 132, 146], np.float32)
    img = warm * stripes[..., None] + cool * (1 - stripes[..., None])
    # a grid of cream dots with dark centres
    gx, gy = (x % 36) - 18, (y % 36) - 18
    d = np.hypot(gx, gy)
    dots = np.clip(7.5 - d, 0, 1)[..., None]
    img = img * (1 - dots) + np.array([246, 232, 196], np.float32) * dots
    img *= 1 - 0.5 * np.clip(3.0 - d, 0, 1)[..., None]
    # a picture frame on the wall, left, and a window, right
    frame = (np.abs(x - 52) < 34) & (np.abs(y - 112) < 44)
    inner = (np.abs(x - 52) < 28) & (np.abs(y - 112) < 38)
    img[frame] = (70, 44, 30)
    img[inner] = np.stack([90 + y[inner] * 0.6, 150 - y[inner] * 0.3, 200 + 0 * y[inner]], -1)
    window = (np.abs(x - 268) < 40) & (np.abs(y - 92) < 62)
    img[window] = (236, 240, 244)
    pane = window & ((np.abs(x - 268) < 2) | (np.abs(y - 92) < 2))
    img[pane] = (120, 110, 100)
    # the table
    table = y >= 0.78 * height
    grain = 0.5 + 0.5 * np.sin(y * 1.7 + 3 * np.sin(x / 23.0) + np.sin(x / 5.0) * 0.6)
    wood = np.array([122, 78, 44], np.float32) * (0.8 + 0.3 * grain[..., None])
    img[table] = wood[table]
    edge = np.abs(y - 0.78 * height) < 1.5
    img[edge] = (70, 42, 24)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def vase(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A shaded ceramic vase: colours (float RGB) and anti-aliased coverage (0-1)."""
    from scipy.interpolate import PchipInterpolator

    cx, top, bottom = width / 2, 0.44 * height, 0.93 * height
    profile = PchipInterpolator(
        [0.0, 0.07, 0.2, 0.45, 0.66, 0.86, 1.0],
        [25.0, 19.0, 27.0, 66.0, 74.0, 60.0, 47.0],
    )
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    t = np.clip((y - top) / (bottom - top), 0, 1)
    r = profile(t).astype(np.float32) * width / 320
    cover = np.clip(r - np.abs(x - cx) + 0.5, 0, 1)
    cover *= np.clip(y - top + 0.5, 0, 1) * np.clip(bottom - y + 0.5, 0, 1)
    nx = np.clip((x - cx) / np.maximum(r, 1), -1, 1)
    nz = np.sqrt(1 - nx**2)
    light = np.clip(0.75 * nz - 0.4 * nx, 0, 1)
    glaze = np.array([34, 112, 124], np.float32)
    rgb = glaze * (0.35 + 0.85 * light[..., None])
    band = np.clip(1.5 - np.abs(t - 0.58) * 90, 0, 1)[..., None]
    rgb = (
        rgb * (1 - band)
        + np.array([214, 172, 70], np.float32) * (0.5 + 0.6 * light)[..., None] * band
    )
    rgb += (200 * np.exp(-(((nx + 0.42) / 0.09) ** 2)) * (t > 0.12))[..., None]
    # the opening: a dark ellipse at the rim
    opening = np.clip(1.5 - np.hypot((x - cx) / 21, (y - top - 2) / 4.5) * 1.5, 0, 1)
    rgb = rgb * (1 - opening[..., None]) + np.array([18, 34, 38], np.float32) * opening[..., None]
    return np.clip(rgb, 0, 255), cover


def strands(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Dried grass from the vase's neck: thin stalks and fluffy plumes (RGBA, anti-aliased
    by drawing at SUPER× and averaging with premultiplied alpha)."""
    s = SUPER
    layer = Image.new("RGBA", (width * s, height * s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cx, neck = width / 2, 0.45 * height
    for i in range(34):
        straw = (int(rng.uniform(196, 228)), int(rng.uniform(164, 196)), int(rng.uniform(100, 134)))
        lean = (i / 33 - 0.5) * 1.5 + rng.normal(0, 0.12)
        heading = -np.pi / 2 + lean
        px, py = cx + rng.uniform(-9, 9), neck + 6
        length = rng.uniform(90, 165) * (1 - 0.3 * abs(lean))
        points = [(px * s, py * s)]
        steps = 24
        for _ in range(steps):
            heading += rng.normal(0, 0.025) + 0.012 * np.sign(lean)
            px += length / steps * np.cos(heading)
            py += length / steps * np.sin(heading)
            points.append((px * s, py * s))
        draw.line(points, fill=(*straw, 255), width=int(rng.choice([2, 3, 4])), joint="curve")
        if rng.random() < 0.7:  # a plume: many fine hairs around the stalk's tip
            for _ in range(60):
                u = rng.uniform(0.6, 1.0)
                k = int(u * steps)
                bx, by = points[k]
                a = heading + rng.normal(0, 0.9) + np.pi * (rng.random() < 0.5)
                reach = rng.uniform(4, 13) * s
                ex, ey = bx + reach * np.cos(a), by + reach * np.sin(a) - 3 * s
                tone = tuple(min(255, c + 30) for c in straw)
                draw.line([(bx, by), (ex, ey)], fill=(*tone, int(rng.uniform(150, 255))), width=1)
    return layer.resize((width, height), Image.Resampling.BOX)  # premultiplied by Pillow


def scene(seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The input (RGB uint8) and its true matte (uint8): vase and grass over the wallpaper."""
    rng = np.random.default_rng(seed)
    bg = wallpaper(WIDTH, HEIGHT).astype(np.float32)
    grass = np.asarray(strands(WIDTH, HEIGHT, rng)).astype(np.float32)
    g_rgb, g_a = grass[..., :3], grass[..., 3] / 255
    v_rgb, v_a = vase(WIDTH, HEIGHT)
    # subject = vase over grass (straight alpha, sRGB), then subject over the background
    a = v_a + g_a * (1 - v_a)
    safe = np.maximum(a, 1e-6)[..., None]
    s_rgb = (v_rgb * v_a[..., None] + g_rgb * (g_a * (1 - v_a))[..., None]) / safe
    image = s_rgb * a[..., None] + bg * (1 - a[..., None])
    return (
        np.clip(image + 0.5, 0, 255).astype(np.uint8),
        np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8),
    )


def noisy(alpha: np.ndarray, seed: int = SEED) -> np.ndarray:
    """The matte with what a model sometimes leaves: faint specks on the background and
    pinholes in the subject (each well under mask_smooth's 0.05 % of the image)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed + 1)
    out = alpha.copy()
    near = ndimage.binary_dilation(alpha > 0, iterations=6)
    h, w = alpha.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    placed = 0
    while placed < 16:
        cx, cy = rng.uniform(8, w - 8), rng.uniform(8, 0.76 * h)
        if near[int(cy) - 6 : int(cy) + 7, int(cx) - 6 : int(cx) + 7].any():
            continue
        r, level = rng.uniform(1.2, 2.8), rng.uniform(90, 255)
        spot = np.clip(r - np.hypot(x - cx, y - cy) + 0.5, 0, 1) * level
        np.maximum(out, spot.astype(np.uint8), out=out)
        placed += 1
    solid = ndimage.binary_erosion(alpha == 255, iterations=5)
    candidates = np.argwhere(solid)
    for i in rng.choice(len(candidates), 10, replace=False):
        cy, cx = candidates[i] + 0.5
        r, level = rng.uniform(1.0, 2.2), rng.uniform(0, 120)
        hole = np.clip(r - np.hypot(x - cx, y - cy) + 0.5, 0, 1)
        np.minimum(out, (255 - hole * (255 - level)).astype(np.uint8), out=out)
    return out


def backdrop(width: int = 480, height: int = 640) -> Image.Image:
    """A studio backdrop (a soft sweep with a vignette), another size and aspect than the
    output's, so the picture shows it scaled to cover and centred."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    v = y / height
    top, floor = np.array([226, 222, 214], np.float32), np.array([170, 160, 148], np.float32)
    sweep = np.clip((v - 0.55) / 0.3, 0, 1) ** 1.5
    img = top * (1 - sweep[..., None]) + floor * sweep[..., None]
    glow = np.exp(
        -(((x - width / 2) / (0.45 * width)) ** 2 + ((y - 0.4 * height) / (0.5 * height)) ** 2)
    )
    img *= (0.78 + 0.22 * glow)[..., None]
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- pictures
def checkerboard(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    odd = ((x // CHECKER_SQUARE + y // CHECKER_SQUARE) % 2).astype(bool)
    out = np.empty((height, width, 3), np.uint8)
    out[~odd], out[odd] = CHECKER
    return out


def shown(result: Rendered) -> np.ndarray:
    """What the picture shows: opaque outputs as they are, transparent ones flattened on a
    light checkerboard (sRGB, as a browser shows them), mattes as grayscale."""
    if result.mode == "L":
        return result.alpha
    if result.mode == "RGB":
        return result.color
    # the alpha channel written (over a semi-transparent colour it is not the matte)
    return over_opaque(
        result.color, result.channel, Image.fromarray(checkerboard(result.width, result.height))
    )


@dataclass
class Picture:
    name: str
    """File name in docs/pictures."""
    options: dict = field(default_factory=dict)
    """Output options (None: the input itself)."""
    matte: str = "true"
    """Which matte: ``true`` or ``noisy`` (the mask_smooth pair)."""
    zoom: bool = False
    """A detail, enlarged ZOOM× (the mask_threshold pair)."""
    raw: bool = False
    """Save the rendered bytes as they are (format=jpeg)."""


PICTURES = [
    Picture("input.png", None),
    Picture("cutout.png", {}),
    Picture("bg_white.png", {"background": "white"}),
    Picture("bg_brand.png", {"background": BRAND}),
    Picture("bg_semi.png", {"background": SEMI}),
    Picture("bg_image.png", {"background": "<backdrop>"}),
    Picture("format_jpeg.jpg", {"background": "#EEEEEE", "format": "jpeg"}, raw=True),
    Picture("alpha.png", {"channels": "alpha"}),
    Picture("crop.png", {"crop": True, "crop_margin": "5%"}),
    Picture("max_side.png", {"max_side": 160}),
    Picture("threshold_before.png", {}, zoom=True),
    Picture("threshold_after.png", {"mask_threshold": 128}, zoom=True),
    Picture("smooth_before.png", {"channels": "alpha"}, matte="noisy"),
    Picture("smooth_after.png", {"channels": "alpha", "mask_smooth": True}, matte="noisy"),
]
BACKDROP = "backdrop.jpg"


def zoom_window(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """A detail of the subject's top edge (strands, hair): (left, top, right, bottom)."""
    box = subject_box(alpha)
    h, w = alpha.shape
    cw, ch = WIDTH // ZOOM, HEIGHT // ZOOM
    if box is None:
        return 0, 0, min(cw, w), min(ch, h)
    left = min(max(box.left + box.width // 2 - cw // 2, 0), max(w - cw, 0))
    top = min(max(box.top - 8, 0), max(h - ch, 0))
    return left, top, min(left + cw, w), min(top + ch, h)


def save(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path, format="PNG", optimize=True)


def caption(source: str) -> str:
    return (
        "# Output option pictures\n\n"
        "Generated by `python scripts/make_pictures.py` through `ben2q.render.render`, the "
        "step every job runs after the engine.\n\n"
        f"{source}\n\n"
        "Transparent outputs are shown flattened on a light checkerboard; `format_jpeg.jpg` "
        "is the rendered JPEG itself; `threshold_*.png` are a detail enlarged "
        f"{ZOOM}× (nearest neighbour); `smooth_*.png` are mattes (`channels=alpha`) of the "
        "matte with specks and pinholes added; `backdrop.jpg` is the `background` image of "
        "`bg_image.png`.\n"
    )


def make(out: Path, rgb: np.ndarray, alpha: np.ndarray, rough: np.ndarray, source: str) -> None:
    """Write every picture of ``PICTURES`` (and the backdrop and caption) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    backdrop().save(buf, format="JPEG", quality=90)
    (out / BACKDROP).write_bytes(buf.getvalue())
    decoded = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")  # as a job fetches it
    uri = (out / BACKDROP).resolve().as_uri()
    for pic in PICTURES:
        if pic.options is None:
            save(out / pic.name, rgb)
            continue
        fields = dict(pic.options)
        background = None
        if fields.get("background") == "<backdrop>":
            fields["background"], background = uri, decoded
        matte = rough if pic.matte == "noisy" else alpha
        result = render(rgb, matte, job_options(**fields), background=background)
        if pic.raw:
            (out / pic.name).write_bytes(result.data)
            continue
        pixels = shown(result)
        if pic.zoom:
            left, top, right, bottom = zoom_window(alpha)
            pixels = pixels[top:bottom, left:right].repeat(ZOOM, 0).repeat(ZOOM, 1)
        save(out / pic.name, pixels)
    (out / "README.md").write_text(caption(source))


def synthetic_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    rgb, alpha = scene()
    return (
        rgb,
        alpha,
        noisy(alpha),
        (
            "The input is a synthetic scene whose matte is known (a vase with dried grass over a "
            "busy wallpaper), not a photograph, and the matte is the scene's own, not a BEN2 "
            "prediction: these pictures show what each option does, not BEN2's quality. The "
            "cut-out's colours are the input's (as without `refine`), so the background shows "
            "through the semi-transparent strands."
        ),
    )


def model_inputs(weights: Path, image: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    from ben2q.engine import Engine
    from ben2q.imageio import load_image

    engine = Engine.load(weights=weights)
    picture = load_image(str(image))
    [pred] = engine.predict([picture])
    height = max(1, round(pred.alpha.shape[0] * WIDTH / pred.alpha.shape[1]))
    lanczos = Image.Resampling.LANCZOS
    rgb = np.asarray(Image.fromarray(pred.rgb).resize((WIDTH, height), lanczos))
    alpha = np.asarray(Image.fromarray(pred.alpha).resize((WIDTH, height), lanczos))
    return (
        rgb,
        alpha,
        alpha,
        (
            f"The input is `{image.name}` and the matte is BEN2's prediction with the checkpoint "
            f"`{weights.name}` ({engine.spec.name} network), scaled to {WIDTH} px wide; the "
            "`smooth_*` pictures use that matte as it is (no specks added)."
        ),
    )


# ----------------------------------------------------------------------------- checking
def compare(expected: Path, actual: Path, tolerance: float) -> list[str]:
    """Differences between two picture directories (empty: the same within tolerance).
    Pixels may differ by at most ``tolerance`` on average and by more than 8 on at most
    0.1 % of the values (encoders of other library versions)."""
    problems = []
    names = {p.name for p in expected.iterdir()} | {p.name for p in actual.iterdir()}
    for name in sorted(names):
        a, b = expected / name, actual / name
        if not a.exists() or not b.exists():
            problems.append(f"{name}: only in {'the new set' if b.exists() else expected}")
            continue
        if name.endswith(".md"):
            if a.read_text() != b.read_text():
                problems.append(f"{name}: text differs")
            continue
        with Image.open(a) as ia, Image.open(b) as ib:
            if ia.size != ib.size or ia.mode != ib.mode:
                problems.append(f"{name}: {ia.mode} {ia.size} != {ib.mode} {ib.size}")
                continue
            pa = np.asarray(ia).astype(np.int16)
            pb = np.asarray(ib).astype(np.int16)
        d = np.abs(pa - pb)
        mean, far = float(d.mean()), float((d > 8).mean())
        if mean > tolerance or far > 0.001:
            problems.append(f"{name}: mean |Δ| {mean:.3f}, {far:.3%} of values off by more than 8")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help="where to write (default docs/pictures)")
    ap.add_argument("--check", action="store_true", help="compare a fresh set with --out")
    ap.add_argument("--tolerance", type=float, default=0.5, help="mean |Δ| allowed by --check")
    ap.add_argument("--weights", type=Path, help="a BEN2 checkpoint: use its real matte")
    ap.add_argument(
        "--image",
        type=Path,
        default=ROOT / "tests" / "fixtures" / "b_photo.png",
        help="the input with --weights",
    )
    args = ap.parse_args()
    if args.weights is not None:
        inputs = model_inputs(args.weights, args.image)
    else:
        inputs = synthetic_inputs()
    if not args.check:
        make(args.out, *inputs)
        total = sum(p.stat().st_size for p in args.out.iterdir())
        print(f"wrote {len(list(args.out.iterdir()))} files to {args.out} ({total / 1e3:.0f} kB)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        make(Path(tmp), *inputs)
        problems = compare(args.out, Path(tmp), args.tolerance)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(
            f"{len(problems)} picture(s) differ; run: python scripts/make_pictures.py",
            file=sys.stderr,
        )
        return 1
    print(f"{args.out}: every picture matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
