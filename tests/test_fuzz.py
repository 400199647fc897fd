"""Property fuzzing of the two places untrusted data enters: decoding and request validation.

* ``load_image`` on **mutated real images of every format Pillow writes here** (PNG in all
  its modes, JPEG baseline/progressive/CMYK/EXIF, GIF and WebP animations, TIFF variants,
  BMP, ICO, QOI, JPEG 2000, AVIF...), through every in-memory source kind (bytes, stream,
  ``data:`` URL, bare base64). Mutations are structure-aware rather than uniform: header
  integers are overwritten with boundary values, slices are deleted, duplicated or
  inserted, the file is cut short, and PNG chunk CRCs are optionally repaired so that the
  mutation reaches the decoder instead of failing the checksum. The property: an RGB image
  within the pixel limit, or ``InvalidImage`` (``ImageTooLarge`` included) -- never another
  exception. ``tests/test_imageio.py`` already fuzzes arbitrary bytes and random byte edits
  of a few seeds; this goes per format and deeper.
* ``ben2q.jobs.make_request`` with arbitrary values for every field: it returns a valid,
  serializable ``JobRequest`` whose output keys stay under ``<output>/<job id>/``, or raises
  ``InvalidRequest`` whose ``.field`` is one of the request's fields -- never another exception.

Every test is deterministic (``derandomize=True``, no example database) and takes a few
seconds at most, so CI is stable.
"""

from __future__ import annotations

import base64
import io
import json
import posixpath
import re
import struct
import zlib
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from ben2q.config import Settings
from ben2q.errors import InvalidImage, InvalidRequest
from ben2q.imageio import load_image
from ben2q.jobs import (
    INPUT_SCHEMES,
    OUTPUT_SCHEMES,
    JobRequest,
    JobStatus,
    make_request,
    mask_uri,
    output_uri,
)

FUZZ_SETTINGS = Settings(max_image_pixels=1_000_000, max_image_bytes=2_000_000)

# --------------------------------------------------------------------------------------
# Seeds: small real images of each format and mode
# --------------------------------------------------------------------------------------


def _pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 9, y * 13, (x + y) * 4], axis=-1) + rng.integers(0, 40, (height, width, 3))
    return (base % 256).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _seed_builders() -> dict[str, Callable[[], bytes]]:
    rgb = Image.fromarray(_pattern(20, 14))
    grey16 = Image.fromarray(np.arange(20 * 14, dtype=np.uint16).reshape(14, 20) * 211)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray((_pattern(20, 14)[..., 0] // 2).astype(np.uint8)))
    palette = rgb.quantize(16)
    palette.info["transparency"] = 0
    frames = [Image.fromarray(_pattern(16, 12, seed=i)) for i in range(3)]
    cmyk = Image.fromarray(np.dstack([_pattern(20, 14), _pattern(20, 14, 1)[..., :1]]), "CMYK")
    return {
        "png_rgb": lambda: _encode(rgb, "PNG"),
        "png_rgba": lambda: _encode(rgba, "PNG"),
        "png_palette_trns": lambda: _encode(palette, "PNG"),
        "png_la": lambda: _encode(rgba.convert("LA"), "PNG"),
        "png_16bit": lambda: _encode(grey16, "PNG"),
        "png_1bit": lambda: _encode(rgb.convert("1"), "PNG"),
        "png_exif": lambda: _encode(rgb, "PNG", exif=_exif(6)),
        "png_interlaced": lambda: _encode(rgb, "PNG", interlace=1),
        "jpeg_baseline": lambda: _encode(rgb, "JPEG", quality=80),
        "jpeg_progressive": lambda: _encode(rgb, "JPEG", progressive=True),
        "jpeg_cmyk": lambda: _encode(cmyk, "JPEG"),
        "jpeg_exif": lambda: _encode(rgb, "JPEG", exif=_exif(8)),
        "gif_animated": lambda: _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp_lossless": lambda: _encode(rgb, "WEBP", lossless=True),
        "webp_lossy": lambda: _encode(rgb, "WEBP", quality=50),
        "webp_animated": lambda: _encode(
            frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True
        ),
        "tiff_raw": lambda: _encode(rgb, "TIFF"),
        "tiff_lzw": lambda: _encode(rgb, "TIFF", compression="tiff_lzw"),
        "tiff_deflate_16bit": lambda: _encode(grey16, "TIFF", compression="tiff_adobe_deflate"),
        "tiff_cmyk": lambda: _encode(cmyk, "TIFF"),
        "bmp": lambda: _encode(rgb, "BMP"),
        "bmp_rle8": lambda: _encode(palette.convert("P"), "BMP", compression=1),
        "ico": lambda: _encode(rgb.resize((16, 16)), "ICO", sizes=[(16, 16)]),
        "tga_rle": lambda: _encode(rgb, "TGA", compression="tga_rle"),
        "ppm": lambda: _encode(rgb, "PPM"),
        "pcx": lambda: _encode(rgb, "PCX"),
        "sgi": lambda: _encode(rgb, "SGI"),
        "qoi": lambda: _encode(rgb, "QOI"),
        "dds": lambda: _encode(rgba, "DDS"),
        "jpeg2000": lambda: _encode(rgb, "JPEG2000"),
        "avif": lambda: _encode(rgb, "AVIF", quality=50),
    }


def _seeds() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    for name, build in _seed_builders().items():
        try:
            data = build()
        except (OSError, KeyError, ValueError):  # this Pillow build cannot write the format
            continue
        # a seed must itself decode, or its mutations test nothing
        load_image(data, settings=FUZZ_SETTINGS)
        seeds[name] = data
    return seeds


SEEDS = _seeds()


def test_the_seeds_cover_the_common_formats() -> None:
    expected = {"png_rgb", "png_16bit", "jpeg_cmyk", "gif_animated", "tiff_lzw", "bmp", "ico"}
    assert expected <= set(SEEDS)
    if features.check("webp"):
        assert {"webp_lossless", "webp_animated"} <= set(SEEDS)
    assert len(SEEDS) >= 20


# --------------------------------------------------------------------------------------
# Structure-aware mutations
# --------------------------------------------------------------------------------------

_BOUNDARY = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 65500, 2**31 - 1, 2**32 - 1]

_position = st.one_of(st.integers(0, 96), st.integers(0, 1 << 20))
_mutation = st.one_of(
    st.tuples(st.just("byte"), _position, st.integers(0, 255)),
    st.tuples(
        st.just("int"),
        _position,
        st.sampled_from([1, 2, 4]),
        st.sampled_from(["<", ">"]),
        st.sampled_from(_BOUNDARY),
    ),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _position, st.integers(1, 64)),
    st.tuples(st.just("duplicate"), _position, st.integers(1, 256)),
    st.tuples(st.just("truncate"), _position),
)


def mutate(data: bytes, mutations: list[tuple], fix_png_crc: bool) -> bytes:
    out = bytearray(data)
    for op, pos, *args in mutations:
        if not out:
            break
        pos %= len(out)
        if op == "byte":
            out[pos] = args[0]
        elif op == "int":
            width, endian, value = args
            fmt = endian + {1: "B", 2: "H", 4: "I"}[width]
            packed = struct.pack(fmt, value & ((1 << (8 * width)) - 1))
            out[pos : pos + width] = packed[: max(len(out) - pos, 0)]
        elif op == "insert":
            out[pos:pos] = args[0]
        elif op == "delete":
            del out[pos : pos + args[0]]
        elif op == "duplicate":
            out[pos:pos] = out[pos : pos + args[0]]
        elif op == "truncate":
            del out[pos:]
    if fix_png_crc and out.startswith(b"\x89PNG\r\n\x1a\n"):
        _fix_png_crcs(out)
    return bytes(out)


def _fix_png_crcs(png: bytearray) -> None:
    """Recompute every chunk's CRC, so a mutated chunk is parsed rather than rejected."""
    pos = 8
    while pos + 8 <= len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        end = pos + 8 + length
        if end + 4 > len(png):
            return
        crc = zlib.crc32(bytes(png[pos + 4 : end])) & 0xFFFFFFFF
        png[end : end + 4] = struct.pack(">I", crc)
        pos = end + 4


def as_source(data: bytes, kind: str) -> object:
    if kind == "stream":
        return io.BytesIO(data)
    if kind == "data_url":
        return "data:image/png;base64," + base64.b64encode(data).decode()
    if kind == "base64":
        return base64.b64encode(data).decode()
    return data


def check_decode(source: object) -> None:
    try:
        img = load_image(source, settings=FUZZ_SETTINGS)  # type: ignore[arg-type]
    except InvalidImage as exc:  # ImageTooLarge included
        assert exc.code in ("invalid_image", "image_too_large")
        return
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert img.width >= 1 and img.height >= 1
    assert img.width * img.height <= FUZZ_SETTINGS.max_image_pixels
    assert np.asarray(img).shape == (img.height, img.width, 3)


def test_mutate_really_changes_headers() -> None:
    png = SEEDS["png_rgb"]
    wide = mutate(png, [("int", 16, 4, ">", 2**31 - 1)], fix_png_crc=True)
    assert wide[16:20] == b"\x7f\xff\xff\xff" and wide != png
    with pytest.raises(InvalidImage) as info:  # a CRC-valid IHDR claiming 2**31-1 columns
        load_image(wide, settings=FUZZ_SETTINGS)
    assert info.value.code == "image_too_large"


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "corrupt EXIF" notes
@pytest.mark.parametrize("fmt", sorted(SEEDS))
@settings(
    max_examples=40,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    mutations=st.lists(_mutation, min_size=1, max_size=6),
    fix_crc=st.booleans(),
    kind=st.sampled_from(["bytes", "stream", "data_url", "base64"]),
)
def test_fuzz_mutated_images_of_each_format(
    fmt: str, mutations: list[tuple], fix_crc: bool, kind: str
) -> None:
    check_decode(as_source(mutate(SEEDS[fmt], mutations, fix_crc), kind))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    base = tmp_path_factory.mktemp("fuzz-paths")
    (base / "a.png").write_bytes(SEEDS["png_rgb"])
    (base / "d").mkdir()
    (base / "link.png").symlink_to(base / "a.png")
    return str(base)


_PATH_PIECES = [
    "a.png", "d", "link.png", "missing.png", "..", ".", "", "%00", "\x00", "%2e%2e", "%2f",
    "%zz", "%", "\ud800", "é", " ", "?x", "#y", "[", "[::1", "]", ":", "@", "~", "\\", "\n",
]  # fmt: skip


PREFIXES = [
    "", "{dir}/", "file://{dir}/", "file://localhost{dir}/", "file://", "file:", "FILE://",
    "file://host{dir}/", "file://[", "data:image/png;base64,", "data:text/plain;base64,",
    "data:,", "ftp://h/", "s3://b/", "x-y+z.a://", "  ",
]  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    prefix=st.sampled_from(PREFIXES),
    parts=st.lists(st.one_of(st.sampled_from(_PATH_PIECES), st.text(max_size=4)), max_size=5),
    payload=st.one_of(st.none(), st.sampled_from(sorted(SEEDS))),
)
def test_fuzz_load_image_strings(
    fuzz_dir: str, prefix: str, parts: list[str], payload: str | None
) -> None:
    """Paths, ``file://`` and ``data:`` URLs, base64 and unknown schemes (never http(s): no
    network): an RGB image or ``InvalidImage``, never ``ValueError``/``OSError``/...."""
    text = prefix.replace("{dir}", fuzz_dir) + "/".join(parts)
    if payload is not None:
        text += base64.b64encode(SEEDS[payload]).decode()
    assert not text.strip().lower().startswith(("http://", "https://"))
    check_decode(text)


# --------------------------------------------------------------------------------------
# Request validation
# --------------------------------------------------------------------------------------

LOCAL_ROOT = "/srv/ben2q-root"
_FIELD = re.compile(
    r"^(input|inputs|inputs\[(\d+)\]|output|format|refine|mask|webhook_url|webhook_events)$"
)
_KEY_NAME = re.compile(r"^\d{4}-[A-Za-z0-9][A-Za-z0-9_.-]*\.(png|webp)$")

_PIECES = [
    "s3://", "http://", "https://", "file://", "ftp://", "gopher://", "data:", "FILE://",
    "//", "/", "..", "../", "%2e%2e", "%2f", "%2F", "%00", "\x00", "%", "%zz", "\\", "~",
    "[", "]", "[::1]", "[::1", "::1", "@", "user:pw@", ":", ":80", ":99999", ":-1", "?", "#",
    " ", "\n", "\t", "\ud800", "é", "фото", "🐱", "bucket", "my-bucket", "in.put", "a.png",
    "x.webp", "localhost", "127.0.0.1", "0x7f000001", LOCAL_ROOT, LOCAL_ROOT + "/in/",
]  # fmt: skip


def _pick(*weighted: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Choose a strategy with the given weights (``st.one_of`` flattens nested choices into
    equally likely leaves, which would drown the valid-looking values in junk)."""
    choices = [strategy for weight, strategy in weighted for _ in range(weight)]
    return st.sampled_from(choices).flatmap(lambda strategy: strategy)


_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.binary(max_size=8),
    st.text(max_size=12),
    st.lists(st.text(max_size=4), max_size=3),
    st.lists(st.lists(st.integers(), max_size=2), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.tuples(st.integers(), st.text(max_size=3)),
    st.sets(st.integers(), max_size=2),
)
_plain = st.sampled_from(["a", "dir", "x.png", "photo 1.jpg", "in", "2024", "b.webp"])
_piece = _pick((4, _plain), (3, st.sampled_from(_PIECES)), (1, st.text(max_size=5)))
_soup = st.lists(_piece, max_size=8).map("".join)
_path = st.lists(_piece, max_size=4).map("/".join)
_tail = st.sampled_from(["", "/", ".png", "a.png", "?q=1", "#f", "%00.png", "/..", "\ud800"])
_HOSTS = [
    "example.com", "cdn.example", "127.0.0.1", "[::1]", "[::1", "h:99999", "h:0", "[x]", "a b",
    "éxample.com", "user@h", "", "localhost:8080", "h:-1", "h:", "[fe80::1%25eth0]",
]  # fmt: skip
_host = st.sampled_from(_HOSTS)
_bucket = st.sampled_from(["my-bucket", "in.put", "b" * 63, "UPPER", "a", "-x-", "my-bucket:1"])
_valid_ish = st.one_of(
    st.builds(lambda b, p, t: f"s3://{b}/{p}{t}", _bucket, _path, _tail),
    st.builds(
        lambda s, h, p, t: f"{s}://{h}/{p}{t}",
        st.sampled_from(["http", "https"]),
        _host,
        _path,
        _tail,
    ),
    st.builds(lambda p, t: f"file://{LOCAL_ROOT}/{p}{t}", _path, _tail),
    st.builds(lambda p, t: f"file://localhost{LOCAL_ROOT}/{p}{t}", _path, _tail),
)
_uri = _pick((6, _valid_ish), (1, _soup), (1, st.text(max_size=30)))
_output = _pick(
    (3, st.builds(lambda b, p: f"s3://{b}/{p}", _bucket, _path)),
    (3, st.builds(lambda p: f"file://{LOCAL_ROOT}/{p}", _path)),
    (1, _uri),
    (1, _junk),
)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    kind=st.sampled_from(["single", "batch"]),
    inputs=_pick(
        (6, st.lists(_pick((8, _uri), (1, _junk)), min_size=1, max_size=1)),
        (6, st.lists(_pick((8, _uri), (1, _junk)), min_size=1, max_size=3)),
        (1, st.lists(_uri, max_size=4)),
        (1, _uri),
        (1, _junk),
    ),
    output=_output,
    refine=_pick((6, st.booleans()), (1, _junk)),
    fmt=_pick((6, st.sampled_from(["png", "webp"])), (1, st.sampled_from(["PNG", ""])), (1, _junk)),
    mask=_pick((6, st.booleans()), (1, _junk)),
    webhook_url=_pick((3, st.none()), (3, _uri), (1, _junk)),
    webhook_events=_pick(
        (4, st.lists(st.sampled_from(["final", "progress"]), min_size=1, max_size=2)),
        (
            1,
            st.lists(st.one_of(st.sampled_from(["final", "progress", "other"]), _junk), max_size=3),
        ),
        (1, _junk),
    ),
    local_root=st.sampled_from([None, LOCAL_ROOT]),
)
def test_fuzz_make_request(
    kind: str,
    inputs: object,
    output: object,
    refine: object,
    fmt: object,
    mask: object,
    webhook_url: object,
    webhook_events: object,
    local_root: str | None,
) -> None:
    try:
        request = make_request(
            kind,  # type: ignore[arg-type]
            inputs,  # type: ignore[arg-type]
            output,  # type: ignore[arg-type]
            refine=refine,
            format=fmt,
            mask=mask,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            max_items=3,
            local_root=local_root,
        )
    except InvalidRequest as exc:
        match = _FIELD.match(exc.field)
        assert match, exc.field
        if match.group(2) is not None:  # inputs[i] names an existing item of a batch
            assert kind == "batch" and int(match.group(2)) < len(inputs)  # type: ignore[arg-type]
        assert exc.code == "invalid_request"
        return
    check_request(request, kind, inputs, local_root)


def check_request(request: JobRequest, kind: str, inputs: object, local_root: str | None) -> None:
    assert isinstance(request, JobRequest) and request.kind == kind
    assert request.inputs == list(inputs)  # type: ignore[call-overload]
    assert 1 <= len(request.inputs) <= 3 and (kind == "batch" or len(request.inputs) == 1)
    assert request.options.format in ("png", "webp")
    assert isinstance(request.options.refine, bool) and isinstance(request.options.mask, bool)
    assert request.output.endswith("/")
    # what crosses the queue and the status store must serialize and read back the same
    assert JobRequest.model_validate_json(request.model_dump_json()) == request
    assert JobRequest.model_validate(json.loads(json.dumps(request.model_dump(mode="json"))))
    JobStatus.queued(request).model_dump_json()
    for uri in request.inputs:
        scheme = urlsplit(uri).scheme.lower()
        assert scheme in INPUT_SCHEMES
        if scheme == "file":
            assert_inside_root(uri, local_root)
    out_scheme = urlsplit(request.output).scheme.lower()
    assert out_scheme in OUTPUT_SCHEMES
    if out_scheme == "file":
        assert_inside_root(request.output, local_root)
    prefix = f"{request.output}{request.id}/"
    for index in range(len(request.inputs)):
        for key in (output_uri(request, index), mask_uri(request, index)):
            assert key.startswith(prefix)
            assert _KEY_NAME.match(key[len(prefix) :]), key


def assert_inside_root(uri: str, root: str | None) -> None:
    assert root is not None
    path = posixpath.normpath(unquote(urlsplit(uri).path))
    assert posixpath.commonpath([root, path]) == root, uri


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("inputs[0]", {"inputs": ["http://[::1/x.png"]}),
        ("inputs[0]", {"inputs": ["http://127.0.0.1:99999/x.png"]}),
        ("inputs[0]", {"inputs": ["s3://my-bucket/\ud800.png"]}),
        ("output", {"output": "s3://[bad/"}),
        ("format", {"format": ["png"]}),
        ("format", {"format": {}}),
        ("webhook_url", {"webhook_url": "http://[::1"}),
        ("webhook_url", {"webhook_url": "http://h\ud800/"}),
        ("webhook_events", {"webhook_url": "https://h/", "webhook_events": [["final"]]}),
        ("webhook_events", {"webhook_url": "https://h/", "webhook_events": [{}]}),
    ],
)
def test_examples_the_fuzzer_found(field: str, kwargs: dict[str, object]) -> None:
    """Each of these once escaped as ValueError, TypeError or a serialization error."""
    args = {"inputs": ["s3://my-bucket/a.png"], "output": "s3://out-bucket/p/", **kwargs}
    with pytest.raises(InvalidRequest) as info:
        make_request("batch", args.pop("inputs"), args.pop("output"), **args)  # type: ignore[arg-type]
    assert info.value.field == field
