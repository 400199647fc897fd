"""Loading input images: every accepted kind of source, with limits, upright and in sRGB RGB.

Inputs are untrusted, so decoding is guarded: the encoded size is checked before Pillow sees
the bytes, the pixel count is checked from the header *before* pixels are decoded, the pixels
are then fully decoded inside the guard (so a truncated file fails here, with a clear error,
and not later inside the model), and every error Pillow raises on bad input is translated
into :class:`~ben2q.errors.InvalidImage` or :class:`~ben2q.errors.ImageTooLarge` at this one
boundary.

The result is always what the model expects and what a user would expect to see:

* upright: the EXIF orientation is applied (phones store rotated pixels plus a tag);
* RGB with 8 bits per channel. Alpha is dropped, not composited: the model looks at
  colours, and the colour under a transparent pixel is the best guess of what is there;
  16-bit grey is scaled to 8 bits (65535 -> 255), float grey is clipped to 0..255;
* sRGB: an embedded ICC profile other than sRGB (Display P3, Adobe RGB, CMYK press
  profiles...) is converted to sRGB, since the model was trained on sRGB images; if the
  profile is broken, the pixels are converted as if untagged;
* only the first frame of an animation (GIF, WebP, APNG...).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import struct
import threading
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ben2q.config import Settings, get_settings
from ben2q.errors import ImageTooLarge, InvalidImage
from ben2q.fetch import fetch_bytes

try:  # Pillow is normally built with LittleCMS; without it ICC profiles are ignored.
    from PIL import ImageCms
except ImportError:  # pragma: no cover - depends on the Pillow build
    ImageCms = None  # type: ignore[assignment]

__all__ = ["ImageSource", "load_image", "decode_image", "configure_pillow"]

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | Image.Image
"""What :func:`load_image` accepts (any object with a binary ``read()`` is a file-like)."""

# Errors Pillow raises on malformed input. Besides the documented ones (OSError for
# truncated data, SyntaxError/ValueError/struct.error/EOFError from the parsers), hostile
# files make some plugins fail with IndexError, KeyError, TypeError, ZeroDivisionError,
# OverflowError or NotImplementedError (an unsupported variant of a format, e.g. a DDS
# pixel format); for an untrusted input all of these mean "not a decodable image".
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    NotImplementedError,
)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)

# EPS is decoded by running Ghostscript on the input: never for untrusted bytes.
_REFUSED_FORMATS = frozenset({"EPS"})

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BASE64_MIN_CHARS = 16
# Leading bytes of the formats a base64 string is believed to carry (see _looks_like_image).
_IMAGE_MAGICS = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"II+\x00",  # BigTIFF
    b"MM\x00+",
    b"\x00\x00\x01\x00",  # ICO
    b"\x00\x00\x02\x00",  # CUR
    b"\x00\x00\x00\x0cjP  ",  # JPEG 2000 (JP2)
    b"\xff\x4f\xff\x51",  # JPEG 2000 codestream
    b"8BPS",  # PSD
    b"qoif",  # QOI
    b"DDS ",
)

_pillow_lock = threading.Lock()
_pillow_configured = False


# --------------------------------------------------------------------------------------
# Pillow's process-wide guard
# --------------------------------------------------------------------------------------


def configure_pillow(settings: Settings | None = None) -> None:
    """Set Pillow's decompression-bomb guard from ``settings`` (process-wide).

    ``Image.MAX_IMAGE_PIXELS`` is a global of Pillow, so it is set here once (at startup,
    or lazily from the process settings by the first decode) instead of per call, which
    would race between threads. Its warning (over the limit) is made an error, like its
    error (over twice the limit). :func:`decode_image` also checks each call's own
    ``max_image_pixels`` explicitly, which is the limit that counts; this guard is the
    backstop inside Pillow. A call whose settings allow more pixels than the process
    settings is still bounded by this guard: call ``configure_pillow`` with those settings.
    """
    global _pillow_configured
    settings = settings or get_settings()
    with _pillow_lock:
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
        _pillow_configured = True


def _ensure_pillow_configured() -> None:
    if not _pillow_configured:
        configure_pillow(get_settings())


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


def load_image(source: ImageSource, *, settings: Settings | None = None) -> Image.Image:
    """Load an image from any supported source; return it upright, RGB, 8-bit, sRGB.

    ``source`` may be: a PIL image (copied, never mutated); ``bytes``, ``bytearray`` or
    ``memoryview`` of an encoded image; a binary file-like object (anything with
    ``read()``); an ``os.PathLike`` path; or a ``str``, read in this order:

    1. ``data:image/...;base64,...`` URL;
    2. ``http://`` or ``https://`` URL, fetched with :func:`ben2q.fetch.fetch_bytes`;
    3. ``file:///abs/path`` (a local path); any other ``scheme://`` is refused;
    4. the path of an existing file;
    5. base64 of an image (whitespace and newlines allowed) -- only if it decodes strictly
       and the result starts like an image, so a mistyped path is never reported as
       bad base64;
    6. otherwise :class:`InvalidImage` saying there is no such file.

    Raises :class:`InvalidImage` (or its :class:`ImageTooLarge`), and for URLs the
    :class:`~ben2q.errors.FetchError` family.
    """
    settings = settings or get_settings()
    if isinstance(source, Image.Image):
        return _from_pil(source, settings)
    if isinstance(source, bytes | bytearray | memoryview):
        return decode_image(bytes(source), settings=settings)
    if isinstance(source, str):
        return _from_str(source, settings)
    if isinstance(source, os.PathLike):
        return decode_image(_read_path(os.fspath(source), settings), settings=settings)
    if callable(getattr(source, "read", None)):
        return decode_image(_read_stream(source, settings), settings=settings)
    raise InvalidImage(f"unsupported image source of type {type(source).__name__}")


def _from_str(text: str, settings: Settings) -> Image.Image:
    stripped = text.strip()
    lowered = stripped[:16].lower()
    if lowered.startswith("data:"):
        return decode_image(_decode_data_url(stripped), settings=settings)
    if lowered.startswith(("http://", "https://")):
        return decode_image(fetch_bytes(stripped, settings=settings), settings=settings)
    scheme = _SCHEME_RE.match(stripped)
    if scheme:
        if scheme.group(1).lower() != "file":
            raise InvalidImage(f"unsupported URI scheme {scheme.group(1).lower()!r}")
        return decode_image(_read_path(_file_url_path(stripped), settings), settings=settings)
    if os.path.exists(text):
        return decode_image(_read_path(text, settings), settings=settings)
    data = _strict_base64(stripped)
    if data is not None and _looks_like_image(data):
        return decode_image(data, settings=settings)
    raise InvalidImage(f"no such file: {_shorten(text)}")


def _decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise InvalidImage("malformed data: URL (no comma)")
    params = header[len("data:") :].split(";")
    media_type = params[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise InvalidImage(f"data: URL of media type {media_type!r} is not an image")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise InvalidImage("data: URL must be base64-encoded (';base64,')")
    data = _strict_base64(urllib.parse.unquote(payload))
    if data is None:
        raise InvalidImage("data: URL has invalid base64")
    return data


def _strict_base64(text: str) -> bytes | None:
    """Decode standard or URL-safe base64, ignoring whitespace; None unless it is clean."""
    compact = "".join(text.split())
    if len(compact) < _BASE64_MIN_CHARS:
        return None
    if "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _looks_like_image(data: bytes) -> bool:
    """Whether decoded base64 starts like an image (common formats only, by magic bytes).

    Sniffing with Pillow itself would be too lenient: formats without a signature (TGA)
    accept many random headers, and random path-like strings decode to random bytes.
    """
    if data.startswith(_IMAGE_MAGICS):
        return True
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1")


def _file_url_path(url: str) -> str:
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError as exc:  # e.g. "file://[::1/x": a bad IPv6 literal
        raise InvalidImage(f"malformed file: URL: {exc}") from exc
    if parsed.netloc not in ("", "localhost"):
        raise InvalidImage(f"file: URL with a remote host {parsed.netloc!r} is not supported")
    return urllib.request.url2pathname(parsed.path)


def _read_path(path: str, settings: Settings) -> bytes:
    limit = settings.max_image_bytes
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > limit:
                raise ImageTooLarge(f"{path}: {size} bytes, over the limit of {limit} bytes")
            return _read_limited(file, limit, path)
    except InvalidImage:
        raise
    except FileNotFoundError as exc:
        raise InvalidImage(f"no such file: {_shorten(path)}") from exc
    except IsADirectoryError as exc:
        raise InvalidImage(f"not a file: {_shorten(path)}") from exc
    except OSError as exc:
        raise InvalidImage(f"cannot read {_shorten(path)}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL in the path, or text that is not valid Unicode
        raise InvalidImage(f"cannot read {_shorten(path)}: {exc}") from exc


def _read_stream(stream: Any, settings: Settings) -> bytes:
    try:
        return _read_limited(stream, settings.max_image_bytes, "the stream")
    except OSError as exc:
        raise InvalidImage(f"cannot read the stream: {exc}") from exc


def _read_limited(stream: Any, limit: int, what: str) -> bytes:
    """Read at most ``limit`` bytes, failing if there are more (never reads it all first)."""
    data = stream.read(limit + 1)
    if isinstance(data, str):
        raise InvalidImage(f"{what} is open in text mode; open it in binary mode ('rb')")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidImage(f"{what}: read() returned {type(data).__name__}, not bytes")
    data = bytes(data)
    if len(data) > limit:
        raise ImageTooLarge(f"{what} is over the limit of {limit} bytes")
    return data


def _shorten(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def decode_image(data: bytes, *, settings: Settings | None = None) -> Image.Image:
    """Decode encoded image bytes under the limits; return an upright 8-bit sRGB RGB image.

    Checks the byte limit first, then the pixel count from the header before any pixel is
    decoded, then decodes fully (``load()``) so truncated data fails here.
    """
    settings = settings or get_settings()
    if not data:
        raise InvalidImage("empty input")
    if len(data) > settings.max_image_bytes:
        raise ImageTooLarge(
            f"image is {len(data)} bytes, over the limit of {settings.max_image_bytes} bytes"
        )
    _ensure_pillow_configured()
    with _pillow_errors(), Image.open(io.BytesIO(data), formats=_allowed_formats()) as img:
        _check_pixels(img.size, settings)
        img.load()
        out = _normalize(img)
        # Closing the opened image (leaving the ``with``) invalidates it: return another.
        return out.copy() if out is img else out


def _from_pil(source: Image.Image, settings: Settings) -> Image.Image:
    _check_pixels(source.size, settings)
    with _pillow_errors():
        return _normalize(source.copy())  # the copy is ours to change in place


def _allowed_formats() -> list[str]:
    Image.init()  # registers the plugins; cheap after the first call
    return [name for name in Image.OPEN if name not in _REFUSED_FORMATS]


def _check_pixels(size: tuple[int, int], settings: Settings) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    if width * height > settings.max_image_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{settings.max_image_pixels} pixels"
        )


_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-f]+>")


@contextmanager
def _pillow_errors() -> Iterator[None]:
    """Translate what Pillow raises on bad input into our errors, ``from`` the original."""
    try:
        yield
    except InvalidImage:
        raise
    except _BOMB_ERRORS as exc:
        raise ImageTooLarge(f"image is too large (decompression bomb guard): {exc}") from exc
    except _DECODE_ERRORS as exc:
        # Pillow names the file object it read ("<_io.BytesIO object at 0x7f...>"): noise
        raise InvalidImage(f"cannot decode image: {_OBJECT_REPR.sub('', str(exc))}") from exc


# --------------------------------------------------------------------------------------
# Normalization to upright 8-bit sRGB RGB
# --------------------------------------------------------------------------------------


def _normalize(img: Image.Image) -> Image.Image:
    """Upright, then 8-bit base mode, then sRGB, then RGB, with a clean ``info``.

    ``img`` is owned by the caller and may be changed in place; the result may be ``img``.
    """
    icc = img.info.get("icc_profile")
    dpi = img.info.get("dpi")
    _upright(img)
    img = _to_8bit_base(img)
    if icc and ImageCms is not None:
        img = _to_srgb(img, icc)
    if img.mode != "RGB":
        img = img.convert("RGB")
    # The pixels are now upright sRGB: the source's profile and EXIF no longer describe them.
    img.info = {"dpi": dpi} if dpi else {}
    return img


def _upright(img: Image.Image) -> None:
    """Apply the EXIF orientation in place. Broken EXIF is ignored rather than rejecting the
    image: the pixels are fine, and cameras and editors write plenty of malformed EXIF."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except (SyntaxError, ValueError, struct.error, KeyError, TypeError, IndexError, OSError):
        pass


def _to_8bit_base(img: Image.Image) -> Image.Image:
    """Reduce to one of RGB, CMYK or L (the modes ICC profiles describe), 8 bits each.

    Alpha is dropped, not composited (see the module docstring).
    """
    mode = img.mode
    if mode in ("RGB", "CMYK", "L"):
        return img
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (and 'I', which Pillow also uses for 16-bit data): 0..65535 -> 0..255,
        # rounded. Pillow's own convert('L') would clip everything above 255 to white.
        values = np.asarray(img).astype(np.int64)
        scaled = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(scaled.astype(np.uint8), "L")
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if mode in ("1", "LA"):
        return img.convert("L")
    if mode == "La":  # premultiplied grey+alpha: Pillow converts it to nothing else
        return img.getchannel(0)
    if mode == "LAB" and ImageCms is not None:
        lab = ImageCms.createProfile("LAB")
        return ImageCms.profileToProfile(img, lab, _srgb_profile(), outputMode="RGB")
    if mode in ("P", "PA") or "A" in mode or "a" in mode:
        # Palette (maybe with transparency), RGBA, RGBa...: through RGBA, then drop alpha.
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")  # YCbCr, HSV, RGBX...


_SRGB: Any = None


def _srgb_profile() -> Any:
    global _SRGB
    if _SRGB is None:
        _SRGB = ImageCms.createProfile("sRGB")
    return _SRGB


def _to_srgb(img: Image.Image, icc: bytes) -> Image.Image:
    """Convert from the embedded profile to sRGB; unchanged if already sRGB or unusable."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(profile).lower():
            return img
        space = profile.profile.xcolor_space.strip()
        if (space, img.mode) not in (("RGB", "RGB"), ("CMYK", "CMYK"), ("GRAY", "L")):
            return img  # the profile does not describe these pixels: ignore it
        converted = ImageCms.profileToProfile(img, profile, _srgb_profile(), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError, AttributeError):
        return img
    return converted if converted is not None else img
