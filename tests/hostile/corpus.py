"""The hostile-input corpus: every case built in code, each with the stable code it must give.

A :class:`Case` is one way to attack the service and what must come of it:

* ``make()`` builds the input's bytes (``None`` when the case is a URI, not content);
* ``uri_kind`` is how the input reaches the service:

  ``s3``
      the bytes are uploaded to ``s3://hostile-in/<target or cases/<name>.png>``; the
      library gets the bytes themselves;
  ``http``
      the bytes (or a hostile behaviour, see ``httpd.py``) are served by the loopback server
      at the path ``target``; fetched by the worker that allows private URLs (test servers
      live on loopback) and by the library with the same settings;
  ``guarded``
      ``target`` is a URL (template) to a loopback server, run on the worker with
      ``BEN2Q_ALLOW_PRIVATE_URLS=false`` and by the library with default settings: each must
      be refused **before any request is sent** (the server's log proves it);
  ``uri``
      ``target`` is a literal URI (template), given as is to the client and to the library;
  ``output``
      the input is a good image and ``target`` is the hostile *output* location;
  ``redirect``
      library only: a redirect from an allowed first hop (``policy`` injected into
      ``fetch_bytes``, as ``tests/test_fetch.py`` does) to a refused one. At queue level
      both hops would be loopback servers, so "allowed" and "refused" cannot be told
      apart there; the queue-level redirect cases are the ``http`` ones (a hop to another
      scheme, to credentials, a loop), which a worker re-checks on every hop.

* ``expected_code`` is what the producer sees for the item: a stable error code, or ``None``
  for success. Cases with ``submit_field`` are refused by the client before anything is
  enqueued (``InvalidRequest`` naming ``inputs[i]``/``input``/``output``); for those,
  ``worker_code`` is what the worker's per-item guards say of such an input (defence in
  depth); a raw Celery message carrying one is refused whole before them, by the worker's
  re-check of the client's rules (``ben2q.admission``), with ``invalid_request``.
* ``library_code`` is the library's code where it differs (``SAME`` otherwise): the library
  has no ``s3://`` and no local root (it reads any path its caller gives it: see SECURITY.md).
* ``check(image)`` asserts a success's output (upright size, RGB) -- on the library's RGBA
  output and on the RGBA image the worker stored; ``message`` is a part of the worker's error
  message where the code alone would not show *why* (a path refused before it was opened).
* ``library_model=False``: in the library the case is only decoded (``load_image``), not run
  through the model too -- colour-mode conversions (the adapter returns the decoded RGB
  unchanged) and hostile names (output keys are a queue matter); the queue runs them all.

Templates in ``target``: ``{port}``/``{port6}`` (the loopback servers on 127.0.0.1 and ::1),
``{wrapped_port}`` (``port + 65536``), ``{root}`` (BEN2Q_LOCAL_ROOT), ``{base}`` (its
parent, which holds ``secret.png``), ``{good_b64}`` (base64 of the good image).
"""

from __future__ import annotations

import functools
import io
import ipaddress
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SAME = "same"
INPUT_BUCKET = "hostile-in"
OUTPUT_BUCKET = "hostile-out"
GOOD_KEY = "good/good.png"

# Limits shared by the library's Settings and the workers' environment.
MAX_IMAGE_BYTES = 1_000_000
MAX_IMAGE_PIXELS = 4_000_000
FETCH_TIMEOUT = 2.0

# Where the loopback server's /redirect/<name> routes point.
REDIRECTS = {
    "to-file": "file:///etc/passwd",
    "to-gopher": "gopher://127.0.0.1:{port}/_GET%20/",
    "to-creds": "http://user:secret@127.0.0.1:{port}/files/good.png",
    "loop": "/redirect/loop",
    "to-v6": "http://[::1]:{port6}/files/good.png",
    "to-localhost": "http://localhost:{port}/files/good.png",
    "to-127-0-0-2": "http://127.0.0.2:{port}/files/good.png",
}

# --------------------------------------------------------------------------------------
# The case type
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], bytes | None]
    uri_kind: str
    expected_code: str | None
    check: Callable[[Image.Image], None] | None = None
    target: str = ""
    submit_field: str | None = None
    worker_code: str | None = None
    library_code: str | None = SAME
    library_check: Callable[[Image.Image], None] | None = None
    output_stem: str | None = None
    output_kind: str = "s3"
    policy: str | None = None
    message: str = ""
    library_model: bool = True
    note: str = ""

    @property
    def at_submit(self) -> bool:
        """Refused by the client, before enqueue."""
        return self.submit_field is not None

    @property
    def worker_expected(self) -> str | None:
        """The item's code once the input reaches a worker (a raw message for submit
        refusals: the worker's re-check refuses it with the client's rule)."""
        return "invalid_request" if self.at_submit else self.expected_code

    @property
    def library_expected(self) -> str | None:
        return self.expected_code if self.library_code == SAME else self.library_code

    @property
    def library_checker(self) -> Callable[[Image.Image], None] | None:
        return self.library_check or self.check

    @property
    def in_queue(self) -> bool:
        return self.uri_kind != "redirect"

    @property
    def in_library(self) -> bool:
        return self.uri_kind != "output"

    @property
    def worker(self) -> str:
        return "guarded" if self.uri_kind == "guarded" else "main"

    @property
    def stem(self) -> str:
        return self.output_stem or self.name

    def uri(self, ctx: dict[str, object]) -> str:
        """The input URI given to the client (``output`` cases: the good input)."""
        if self.uri_kind == "s3":
            return f"s3://{INPUT_BUCKET}/{self.key}"
        if self.uri_kind == "http":
            return f"http://127.0.0.1:{ctx['port']}{self.target}"
        if self.uri_kind == "output":
            return f"s3://{INPUT_BUCKET}/{GOOD_KEY}"
        return self.target.format_map(ctx)

    @property
    def key(self) -> str:
        return self.target or f"cases/{self.name}.png"


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colours where every pixel differs a little (any flip or shift shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack(
        [
            30 + 190 * x / max(width - 1, 1),
            40 + 170 * y / max(height - 1, 1),
            120 + 60 * np.sin((x + 2 * y) / 7.0),
        ],
        axis=-1,
    )
    rgb += rng.normal(0, 2, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def decode_raw(data: bytes) -> np.ndarray:
    """Pillow's plain decode to RGB: no EXIF, no colour management (for expectations)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def rgb_of(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB") if img.mode != "RGB" else img)


def expect(
    expected: np.ndarray, *, tolerance: int = 0, near: np.ndarray | None = None, mean: float = 0
) -> Callable[[Image.Image], None]:
    """A check: the output has ``expected``'s size and RGB (within ``tolerance``); if ``near``
    is given, the RGB is also within a mean difference ``mean`` of it (lossy formats)."""

    def check(img: Image.Image) -> None:
        height, width = expected.shape[:2]
        assert img.size == (width, height), (img.size, (width, height))
        got = rgb_of(img).astype(int)
        diff = np.abs(got - expected.astype(int))
        if img.mode == "RGBA":
            seen = np.asarray(img)[..., 3] > 0
            if img.format is not None:  # a decoded file: no hidden background in it
                assert not got[~seen].any(), "colours kept under transparent pixels"
            diff = diff[seen]  # the library's images keep them, as the reference's do
        worst = int(diff.max()) if diff.size else 0
        assert worst <= tolerance, f"RGB differs by up to {worst} (tolerance {tolerance})"
        if near is not None:
            drift = float(np.abs(got - near.astype(int)).mean())
            assert drift <= mean, f"mean difference {drift:.2f} from the intended image > {mean}"

    return check


GOOD = pattern(48, 40, seed=7)
SECRET = np.zeros((20, 30, 3), np.uint8)
SECRET[:, :15] = (200, 20, 20)
SECRET[:, 15:] = (20, 20, 200)


@functools.cache
def good_png() -> bytes:
    return encode(Image.fromarray(GOOD))


check_good = expect(GOOD)
check_secret = expect(SECRET)


def secret_png() -> bytes:
    return encode(Image.fromarray(SECRET))


def build_local_tree(base: Path) -> Path:
    """The file layout the ``file://`` cases name; returns the local root.

    ``base/root`` is BEN2Q_LOCAL_ROOT (with ``good.png``, ``out/`` for file outputs and
    ``escape-link.png``, a symlink to ``../secret.png``); ``base/secret.png`` is a valid image
    outside the root, so a traversal that worked would *succeed* rather than fail quietly.
    """
    root = base / "root"
    (root / "out").mkdir(parents=True)
    (root / "good.png").write_bytes(good_png())
    (base / "secret.png").write_bytes(secret_png())
    (root / "escape-link.png").symlink_to(base / "secret.png")
    return root


# --- crafted files -------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def crafted_png(
    width: int, height: int, depth: int, colour: int, raw: bytes, extra: bytes = b""
) -> bytes:
    """A PNG with a hand-written IHDR (any declared size) and ``raw`` scanlines as IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + extra
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


@functools.cache
def _noise_png() -> bytes:
    rng = np.random.default_rng(3)
    return encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))


@functools.cache
def _noise_jpeg() -> bytes:
    rng = np.random.default_rng(4)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return encode(img, "JPEG", quality=90)


def truncated_png() -> bytes:
    data = _noise_png()
    return data[: len(data) // 2]


def truncated_jpeg() -> bytes:
    data = _noise_jpeg()
    return data[: len(data) * 3 // 5]


def decompression_bomb() -> bytes:
    """6000 x 6000 black pixels (36 MP, nine times the limit) in about 35 KB."""
    return encode(Image.new("L", (6000, 6000)), "PNG")


def huge_declared_png() -> bytes:
    return crafted_png(100_000, 100_000, 8, 2, b"\0" * 16)


def declared_under_limit_png() -> bytes:
    return crafted_png(1900, 1900, 8, 2, b"\0" * 16)  # 3.6 MP declared, 16 bytes of rows


def huge_declared_jpeg() -> bytes:
    """A real JPEG whose SOF0 header is patched to 60000 x 60000."""
    data = bytearray(encode(Image.fromarray(GOOD), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


def huge_declared_bmp() -> bytes:
    width = height = 50_000
    header = struct.pack("<2sIHHI", b"BM", 14 + 40 + 16, 0, 0, 14 + 40)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info + b"\0" * 16


def zero_width_png() -> bytes:
    return crafted_png(0, 10, 8, 2, b"\0" * 10)


def text_chunk_bomb() -> bytes:
    """A 4 x 4 PNG with a zTXt chunk that inflates to 50 MB (48 KB on the wire)."""
    bomb = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a" * 50_000_000, 9))
    return crafted_png(4, 4, 8, 0, b"\x00" * 5 * 4, extra=bomb)


def eps_file() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(owned) print showpage\n%%EOF\n"


def oversized_object() -> bytes:
    return _noise_png()[:64] + b"\0" * MAX_IMAGE_BYTES


# --- valid but unusual images (expected success) ----------------------------------------------


@functools.cache
def _thin(width: int, height: int) -> tuple[bytes, np.ndarray]:
    array = pattern(width, height, seed=width % 97)
    return encode(Image.fromarray(array)), array


@functools.cache
def _cmyk(fmt: str) -> tuple[bytes, np.ndarray]:
    rgb = pattern(40, 30, seed=11)
    cmyk = np.concatenate([255 - rgb, np.zeros((30, 40, 1), np.uint8)], axis=2)
    return encode(
        Image.fromarray(cmyk, "CMYK"), fmt, **({"quality": 95} if fmt == "JPEG" else {})
    ), rgb


@functools.cache
def _grey16() -> tuple[bytes, np.ndarray]:
    values = (np.arange(24 * 18, dtype=np.uint32).reshape(18, 24) * 151) % 65536
    expected = ((values * 255 + 32767) // 65535).astype(np.uint8)
    img = Image.fromarray(values.astype(np.uint16))
    return encode(img, "PNG"), np.repeat(expected[..., None], 3, axis=2)


@functools.cache
def _rgb48() -> tuple[bytes, np.ndarray]:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    rng = np.random.default_rng(5)
    values = rng.integers(0, 65536, (12, 16, 3)).astype(">u2")
    raw = b"".join(b"\x00" + values[y].tobytes() for y in range(values.shape[0]))
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    return crafted_png(16, 12, 16, 2, raw), expected


@functools.cache
def _palette() -> tuple[bytes, np.ndarray]:
    colours = np.array([(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)], np.uint8)
    index = (np.add.outer(np.arange(20), np.arange(30)) % 4).astype(np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(colours.flatten().tolist())
    img.info["transparency"] = 0  # index 0 transparent: its colour must still come through
    return encode(img, "PNG", transparency=0), colours[index]


@functools.cache
def _la() -> tuple[bytes, np.ndarray]:
    grey = pattern(30, 20, seed=13)[..., 0]
    alpha = np.tile(np.linspace(0, 255, 30).astype(np.uint8), (20, 1))
    img = Image.fromarray(np.dstack([grey, alpha]), "LA")
    return encode(img, "PNG"), np.repeat(grey[..., None], 3, axis=2)


@functools.cache
def _rgba() -> tuple[bytes, np.ndarray]:
    rgb = pattern(30, 20, seed=17)
    alpha = np.zeros((20, 30, 1), np.uint8)  # fully transparent: the colours stay
    return encode(Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA")), rgb


@functools.cache
def _one_bit() -> tuple[bytes, np.ndarray]:
    bits = (np.add.outer(np.arange(20), np.arange(30)) % 3 == 0).astype(np.uint8) * 255
    img = Image.fromarray(bits).convert("1")
    return encode(img, "PNG"), np.repeat(bits[..., None], 3, axis=2)


def _frames() -> list[np.ndarray]:
    """Three 2-colour frames (exact in a GIF palette): red/blue, green/yellow, white/black."""
    mask = (np.add.outer(np.arange(24), np.arange(32)) // 4 % 2).astype(bool)
    pairs = [((220, 0, 0), (0, 0, 220)), ((0, 220, 0), (220, 220, 0)), ((255,) * 3, (0,) * 3)]
    return [
        np.where(mask[..., None], np.array(a, np.uint8), np.array(b, np.uint8)) for a, b in pairs
    ]


@functools.cache
def _animated(fmt: str) -> tuple[bytes, np.ndarray]:
    frames = [Image.fromarray(f) for f in _frames()]
    params: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 100}
    if fmt == "WEBP":
        params["lossless"] = True
    data = encode(frames[0], fmt, **params)
    with Image.open(io.BytesIO(data)) as img:  # really animated, or the case proves nothing
        assert getattr(img, "n_frames", 1) == 3
    return data, _frames()[0]


# EXIF orientation -> the transpose that makes the stored pixels upright, and its inverse.
_TO_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_FROM_UPRIGHT = {**_TO_UPRIGHT, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
EXIF_UPRIGHT = pattern(64, 40, seed=21)  # landscape, so a missed rotation changes the size


@functools.cache
def _exif_image(orientation: int, fmt: str) -> tuple[bytes, np.ndarray, bool]:
    """Upright pixels stored rotated, plus the EXIF tag that says how to turn them back.

    Returns the file, the expected upright RGB, and whether that expectation is exact (PNG,
    lossless WebP) or the lossy decode turned by the table above (JPEG).
    """
    stored = Image.fromarray(EXIF_UPRIGHT).transpose(_FROM_UPRIGHT[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    params: dict[str, object] = {"exif": exif.tobytes()}
    if fmt == "JPEG":
        params["quality"] = 95
    if fmt == "WEBP":
        params["lossless"] = True
    data = encode(stored, fmt, **params)
    if fmt == "JPEG":
        raw = Image.fromarray(decode_raw(data)).transpose(_TO_UPRIGHT[orientation])
        return data, np.asarray(raw), False
    return data, EXIF_UPRIGHT, True


def _exif_check(orientation: int, fmt: str) -> Callable[[Image.Image], None]:
    def check(img: Image.Image) -> None:
        _data, expected, exact = _exif_image(orientation, fmt)
        if exact:
            expect(expected)(img)
        else:  # exactly the decoded pixels turned upright, and close to the intended image
            expect(expected, near=EXIF_UPRIGHT, mean=3.0)(img)

    return check


@functools.cache
def _broken_exif() -> tuple[bytes, np.ndarray]:
    """A PNG whose eXIf chunk is garbage after its TIFF header (its first IFD offset points
    past the end): the pixels decode, the EXIF is ignored, nothing is rotated."""
    array = pattern(32, 24, seed=23)
    data = encode(Image.fromarray(array), "PNG", exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff")
    return data, array


def _first(build: Callable[[], tuple]) -> Callable[[], bytes]:
    return lambda: build()[0]


def _check_from(build: Callable[[], tuple], **kw: object) -> Callable[[Image.Image], None]:
    return lambda img: expect(build()[1], **kw)(img)  # type: ignore[arg-type]


def _thin_case(name: str, width: int, height: int) -> Case:
    return Case(
        name,
        lambda: _thin(width, height)[0],
        "s3",
        None,
        check=lambda img: expect(_thin(width, height)[1])(img),
        note=f"{width}x{height}: extreme aspect ratio, output of the same size",
    )


def _nothing() -> None:
    return None


# --------------------------------------------------------------------------------------
# Loopback names that resolve without DNS (from /etc/hosts), for the guarded cases
# --------------------------------------------------------------------------------------


def loopback_names_from_hosts(path: str = "/etc/hosts") -> list[str]:
    """Names other than ``localhost`` that /etc/hosts maps to a loopback address.

    Only names found there are used, so resolving them never sends a DNS query.
    """
    names: list[str] = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return names
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            loopback = ipaddress.ip_address(fields[0].split("%", 1)[0]).is_loopback
        except ValueError:
            continue
        if loopback:
            names += [n for n in fields[1:] if n.lower() != "localhost" and n not in names]
    return names


# --------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------


def _decoding_cases() -> list[Case]:
    def text(body: bytes) -> Callable[[], bytes]:
        return lambda: body

    return [
        Case("zero_bytes", lambda: b"", "s3", "invalid_image", note="empty object"),
        Case("truncated_png", truncated_png, "s3", "invalid_image", note="cut in the IDAT"),
        Case("truncated_jpeg", truncated_jpeg, "s3", "invalid_image", note="cut in the scan"),
        Case(
            "text_named_png",
            text(b"hello, I am a text file with a .png name\n" * 4),
            "s3",
            "invalid_image",
            target="cases/readme.png",
            output_stem="readme",
        ),
        Case(
            "svg_named_png",
            text(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'),
            "s3",
            "invalid_image",
            note="SVG is not decoded (no rasteriser, no external references)",
        ),
        Case(
            "eps_refused",
            eps_file,
            "s3",
            "invalid_image",
            note="EPS would run Ghostscript on the input: the format is never opened",
        ),
        Case(
            "decompression_bomb",
            decompression_bomb,
            "s3",
            "image_too_large",
            note="36 MP of black in 35 KB; refused from the header, before decoding",
        ),
        Case("huge_declared_png", huge_declared_png, "s3", "image_too_large", note="10^10 px IHDR"),
        Case(
            "huge_declared_jpeg", huge_declared_jpeg, "s3", "image_too_large", note="SOF0 patched"
        ),
        Case("huge_declared_bmp", huge_declared_bmp, "s3", "image_too_large", note="50000^2 BMP"),
        Case(
            "declared_under_limit_tiny_data",
            declared_under_limit_png,
            "s3",
            "invalid_image",
            note="3.6 MP declared (under the limit), 16 bytes of rows: truncated",
        ),
        Case("zero_width_png", zero_width_png, "s3", "invalid_image"),
        Case(
            "text_chunk_bomb",
            text_chunk_bomb,
            "s3",
            "invalid_image",
            note="zTXt inflating to 50 MB: Pillow stops at MAX_TEXT_CHUNK; a malformed file, "
            "not a large image",
        ),
        Case(
            "oversized_object",
            oversized_object,
            "s3",
            "image_too_large",
            note="over BEN2Q_MAX_IMAGE_BYTES: refused from ContentLength, body not read",
        ),
    ]


def _success_cases() -> list[Case]:
    exif_cases = [
        Case(
            f"exif_{fmt.lower()}_orientation_{orientation}",
            (lambda o=orientation, f=fmt: _exif_image(o, f)[0]),
            "s3",
            None,
            check=_exif_check(orientation, fmt),
            note=f"EXIF orientation {orientation}: output upright, 64x40",
        )
        for fmt, orientation in (("JPEG", 6), ("JPEG", 8), ("JPEG", 3), ("PNG", 5), ("WEBP", 7))
    ]
    return [
        Case(
            "one_by_one",
            _first(lambda: _thin(1, 1)),
            "s3",
            None,
            check=_check_from(lambda: _thin(1, 1)),
        ),
        _thin_case("one_by_100000", 1, 100_000),
        _thin_case("w100000_by_one", 100_000, 1),
        Case(
            "cmyk_tiff",
            _first(lambda: _cmyk("TIFF")),
            "s3",
            None,
            check=_check_from(lambda: _cmyk("TIFF")),
            library_model=False,
            note="CMYK with K=0: exactly the RGB it encodes",
        ),
        Case(
            "cmyk_jpeg",
            _first(lambda: _cmyk("JPEG")),
            "s3",
            None,
            check=lambda img: expect(
                _cmyk("JPEG")[1], tolerance=255, near=_cmyk("JPEG")[1], mean=4
            )(img),
            library_model=False,
            note="Adobe CMYK JPEG: converted to RGB (lossy, close to the source)",
        ),
        Case(
            "grey_16bit",
            _first(_grey16),
            "s3",
            None,
            check=_check_from(_grey16),
            library_model=False,
            note="I;16: scaled 65535 -> 255 (rounded), not clipped",
        ),
        Case(
            "rgb_48bit",
            _first(_rgb48),
            "s3",
            None,
            check=_check_from(_rgb48, tolerance=1),
            library_model=False,
            note="16 bits per channel: 8-bit within 1 of the exact scaling",
        ),
        Case(
            "palette_transparency",
            _first(_palette),
            "s3",
            None,
            check=_check_from(_palette),
            library_model=False,
            note="P with tRNS: palette colours, transparency dropped",
        ),
        Case(
            "la",
            _first(_la),
            "s3",
            None,
            check=_check_from(_la),
            library_model=False,
            note="alpha dropped",
        ),
        Case(
            "rgba_transparent",
            _first(_rgba),
            "s3",
            None,
            check=_check_from(_rgba),
            library_model=False,
            note="fully transparent: the stored colours are kept (not composited)",
        ),
        Case(
            "one_bit",
            _first(_one_bit),
            "s3",
            None,
            check=_check_from(_one_bit),
            library_model=False,
        ),
        Case(
            "animated_gif",
            _first(lambda: _animated("GIF")),
            "s3",
            None,
            check=_check_from(lambda: _animated("GIF")),
            note="3 frames: the first frame",
        ),
        Case(
            "animated_webp",
            _first(lambda: _animated("WEBP")),
            "s3",
            None,
            check=_check_from(lambda: _animated("WEBP")),
            note="3 frames, lossless: the first frame",
        ),
        *exif_cases,
        Case(
            "broken_exif",
            _first(_broken_exif),
            "s3",
            None,
            check=_check_from(_broken_exif),
            library_model=False,
            note="malformed EXIF is ignored; the pixels are fine",
        ),
    ]


def _name_cases() -> list[Case]:
    """Good images under hostile names: the output key stays ``<output>/<job id>/NNNN-<safe>``."""

    def name(case: str, kind: str, target: str, stem: str, note: str) -> Case:
        return Case(
            case,
            good_png,
            kind,
            None,
            check=check_good,
            target=target,
            output_stem=stem,
            output_kind="file",
            library_model=False,
            note=note,
        )

    return [
        name(
            "name_dotdot_url", "http", "/files/a/../../x.png", "x", "httpx drops the dot segments"
        ),
        name("name_encoded_dotdot_url", "http", "/%2e%2e%2f%2e%2e%2fx.png", "x", "%2e%2e%2f"),
        name("name_nul_url", "http", "/files/x%00y.png", "x_y", "%00 in the name"),
        name("name_encoded_dotdot_key", "s3", "names/%2e%2e%2f%2e%2e%2fx.png", "x", "key"),
        Case(
            "name_nul_key",
            _nothing,
            "uri",
            "invalid_request",
            target=f"s3://{INPUT_BUCKET}/names/a\x00b.png",
            library_code="invalid_image",
            note="a NUL in the S3 key: AWS stores it, SeaweedFS refuses it (400 InvalidRequest),"
            " so the item fails at once, not retried; name_control_key has the stored form",
        ),
        name("name_control_key", "s3", "names/a\x01b.png", "a_b", "a control character"),
        name("name_unicode_key", "s3", "names/фото 🐱.png", "image", "nothing ASCII left"),
        name("name_encoded_slashes_key", "s3", "names/a%2Fb%2F..%2F..%2Fc.png", "c", "%2F"),
        name(
            "name_backslashes_key",
            "s3",
            "names/a\\b\\x.png",
            "a_b_x",
            "Windows separators (SeaweedFS takes them for '/': with '..' segments after them"
            " it refuses the key, see name_backslash_dotdot_key)",
        ),
        Case(
            "name_backslash_dotdot_key",
            _nothing,
            "uri",
            "invalid_request",
            target=f"s3://{INPUT_BUCKET}/names/..\\..\\x.png",
            library_code="invalid_image",
            note="AWS stores the key as it is; SeaweedFS reads '\\' as '/' and refuses the"
            " '..' segments (400 InvalidRequest): the item fails at once, not retried",
        ),
        name("name_dots_only_key", "s3", "names/....png", "image", "only dots"),
        name(
            "name_long_key",
            "s3",
            "names/" + "n" * 250 + ".png",
            "n" * 100,
            "cut to 100 (SeaweedFS stores no key segment over 255 bytes; AWS: 1024 in all)",
        ),
    ]


def _http_cases() -> list[Case]:
    return [
        Case(
            "http_body_declared_over_limit",
            _nothing,
            "http",
            "image_too_large",
            target="/huge-declared",
            note="Content-Length 10^12: refused before reading the body",
        ),
        Case(
            "http_body_streamed_over_limit",
            _nothing,
            "http",
            "image_too_large",
            target="/huge-streamed",
            note="no Content-Length: counted while streaming, stopped at the limit",
        ),
        Case(
            "http_slow_drip",
            _nothing,
            "http",
            "fetch_failed",
            target="/drip",
            note=f"one byte per 0.2 s: the whole fetch is limited to {FETCH_TIMEOUT:g} s",
        ),
        Case("http_404", _nothing, "http", "fetch_failed", target="/status/404"),
        Case(
            "http_html_as_png",
            lambda: b"<html><body>not an image</body></html>",
            "http",
            "invalid_image",
            target="/files/page.png",
        ),
        Case(
            "http_redirect_to_file",
            _nothing,
            "http",
            "forbidden_url",
            target="/redirect/to-file",
            note="Location: file:///etc/passwd",
        ),
        Case(
            "http_redirect_to_gopher",
            _nothing,
            "http",
            "forbidden_url",
            target="/redirect/to-gopher",
        ),
        Case(
            "http_redirect_to_credentials",
            _nothing,
            "http",
            "forbidden_url",
            target="/redirect/to-creds",
        ),
        Case(
            "http_redirect_loop",
            _nothing,
            "http",
            "fetch_failed",
            target="/redirect/loop",
            note="more than BEN2Q_FETCH_MAX_REDIRECTS hops",
        ),
    ]


def _guarded_cases() -> list[Case]:
    """Loopback in every spelling that resolves here without DNS: refused before connecting."""
    hosts = [
        ("loopback_127_0_0_1", "127.0.0.1:{port}"),
        ("loopback_ipv6", "[::1]:{port6}"),
        ("loopback_localhost", "localhost:{port}"),
        ("loopback_localhost_upper", "LOCALHOST:{port}"),
        ("loopback_127_1", "127.1:{port}"),
        ("loopback_hex", "0x7f000001:{port}"),
        ("loopback_decimal", "2130706433:{port}"),
        ("loopback_octal", "0177.0.0.1:{port}"),
        ("loopback_zero", "0:{port}"),
        ("loopback_127_0_0_2", "127.0.0.2:{port}"),
        ("loopback_ipv4_mapped", "[::ffff:127.0.0.1]:{port}"),
        ("loopback_ipv6_long", "[0:0:0:0:0:0:0:1]:{port6}"),
    ]
    hosts += [
        (f"loopback_hosts_{n.replace('.', '_').replace('-', '_')}", f"{n}:{{port}}")
        for n in loopback_names_from_hosts()[:2]
    ]
    cases = [
        Case(
            name,
            _nothing,
            "guarded",
            "forbidden_url",
            target=f"http://{host}/guarded/{name}.png",
            note="refused with no request sent",
        )
        for name, host in hosts
    ]
    cases.append(
        Case(
            "loopback_https",
            _nothing,
            "guarded",
            "forbidden_url",
            target="https://localhost:{port}/guarded/loopback_https.png",
            note="refused before any TLS handshake",
        )
    )
    cases.append(
        Case(
            "loopback_redirect_entry",
            _nothing,
            "guarded",
            "forbidden_url",
            target="http://127.0.0.1:{port}/redirect/to-v6?entry=guarded",
            note="a redirector on loopback: its first hop is already refused",
        )
    )
    return cases


def _uri_cases() -> list[Case]:
    def refused(
        name: str, target: str, worker: str | None, library: str | None, note: str = "", **kw
    ) -> Case:
        return Case(
            name,
            _nothing,
            "uri",
            "invalid_request",
            target=target,
            submit_field="inputs",
            worker_code=worker,
            library_code=library,
            note=note,
            **kw,
        )

    return [
        refused(
            "scheme_ftp",
            "ftp://127.0.0.1:{port}/files/good.png",
            "invalid_request",
            "invalid_image",
        ),
        refused(
            "scheme_gopher",
            "gopher://127.0.0.1:{port}/_GET%20/",
            "invalid_request",
            "invalid_image",
        ),
        refused(
            "scheme_data_url",
            "data:image/png;base64,{good_b64}",
            "invalid_request",
            None,
            check=check_good,
            note="the library decodes data: URLs; the job service takes none",
        ),
        refused(
            "file_dotdot",
            "file://{root}/../secret.png",
            "invalid_request",
            None,
            library_check=check_secret,
            message="outside the local root",
            note="the library has no local root: it reads what its caller names",
        ),
        refused(
            "file_encoded_dotdot",
            "file://{root}/%2e%2e/secret.png",
            "invalid_request",
            None,
            library_check=check_secret,
            message="outside the local root",
        ),
        refused(
            "file_outside_root",
            "file://{base}/secret.png",
            "invalid_request",
            None,
            library_check=check_secret,
            message="outside the local root",
        ),
        refused(
            "file_proc_environ",
            "file:///proc/self/environ",
            "invalid_request",
            "invalid_image",
            message="outside the local root",
        ),
        refused(
            "file_remote_host",
            "file://example.com{root}/good.png",
            "invalid_request",
            "invalid_image",
            note="no host is ever contacted",
        ),
        refused("file_malformed", "file://[::1/x.png", "invalid_request", "invalid_image"),
        Case(
            "file_symlink_escape",
            _nothing,
            "uri",
            "invalid_request",
            target="file://{root}/escape-link.png",
            library_code=None,
            message="outside the local root",
            library_check=check_secret,
            note="accepted at submit (a lexical check), refused by the worker after realpath",
        ),
        Case(
            "file_nul",
            _nothing,
            "uri",
            "invalid_request",
            target="file://{root}/good.png%00.txt",
            library_code="invalid_image",
            note="a NUL in the decoded path",
        ),
        Case(
            "s3_missing_key",
            _nothing,
            "uri",
            "not_found",
            target=f"s3://{INPUT_BUCKET}/missing/nothing.png",
            library_code="invalid_image",
            note="the library reads no s3:// (unsupported scheme)",
        ),
        Case(
            "s3_missing_bucket",
            _nothing,
            "uri",
            "not_found",
            target="s3://no-such-bucket-hostile/x.png",
            library_code="invalid_image",
        ),
        refused(
            "s3_dotdot_key",
            f"s3://{INPUT_BUCKET}/a/../../x.png",
            "invalid_request",
            "invalid_image",
            note="S3 keys are literal: on AWS a raw message reads the object named"
            " a/../../x.png; SeaweedFS refuses '..' segments (400 InvalidRequest) and the item"
            " fails at once, not retried",
        ),
        refused(
            "url_port_wraps",
            "http://127.0.0.1:{wrapped_port}/files/good.png",
            "forbidden_url",
            "forbidden_url",
            note="port + 65536 used to reach port (the OS truncates it to 16 bits)",
        ),
        refused(
            "url_malformed_ipv6", "http://[::1/files/good.png", "invalid_request", "forbidden_url"
        ),
        refused("url_no_host", "http:///files/good.png", "forbidden_url", "forbidden_url"),
        Case(
            "url_credentials",
            _nothing,
            "uri",
            "forbidden_url",
            target="http://user:secret@127.0.0.1:{port}/files/good.png",
            note="user:password@ is refused (and never logged)",
        ),
    ]


def _output_cases() -> list[Case]:
    def out(name: str, target: str, worker: str | None, note: str, **kw) -> Case:
        return Case(
            name,
            good_png,
            "output",
            "invalid_request",
            target=target,
            submit_field="output",
            worker_code=worker,
            note=note,
            **kw,
        )

    return [
        out(
            "output_dotdot_file",
            "file://{root}/out/../../escape/",
            "invalid_request",
            "a raw message's output outside the root: nothing written",
        ),
        out(
            "output_encoded_dotdot_file",
            "file://{root}/out/%2e%2e/%2e%2e/escape/",
            "invalid_request",
            "the same, percent-encoded",
        ),
        out(
            "output_dotdot_s3",
            f"s3://{OUTPUT_BUCKET}/odd/../../",
            "invalid_request",
            "S3 keys are literal: on AWS a raw message's output goes under the key"
            " odd/../../<job>/ of the output bucket; SeaweedFS refuses '..' segments (400"
            " InvalidRequest): the item fails at once, not retried, nothing written",
        ),
    ]


def _redirect_cases() -> list[Case]:
    return [
        Case(
            "redirect_allowed_to_ipv6",
            _nothing,
            "redirect",
            "forbidden_url",
            target="/redirect/to-v6",
            policy="only-127.0.0.1",
            note="127.0.0.1 plays an allowed public host; the hop to ::1 is refused",
        ),
        Case(
            "redirect_allowed_to_127_0_0_2",
            _nothing,
            "redirect",
            "forbidden_url",
            target="/redirect/to-127-0-0-2",
            policy="only-127.0.0.1",
        ),
        Case(
            "redirect_allowed_to_localhost",
            _nothing,
            "redirect",
            "forbidden_url",
            target="/redirect/to-localhost",
            policy="first-hop-only",
            note="the same address by name: every hop is checked again",
        ),
    ]


CASES: list[Case] = [
    *_decoding_cases(),
    *_success_cases(),
    *_name_cases(),
    *_http_cases(),
    *_guarded_cases(),
    *_uri_cases(),
    *_output_cases(),
    *_redirect_cases(),
]

# Addresses that must be refused but that a test must never connect to: unit tests of the
# address guard only (``tests/test_hostile.py::test_guard_*``).
GUARD_ONLY = [
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # AWS/GCP/Azure metadata
    "100.100.100.200",  # Alibaba metadata (CGNAT range)
    "100.64.0.1",
    "169.254.0.1",
    "0.0.0.0",
    "fd00:ec2::254",  # AWS metadata over IPv6
    "fe80::1",
    "fc00::1",
    "::ffff:169.254.169.254",
    "::ffff:10.0.0.1",
    "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata address
    "2002:a9fe:a9fe::1",  # 6to4 of the metadata address
]

assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"
