"""Output options, folders and ``--watch`` of ``ben2q remove`` (and the flags' other users).

The real engine runs (tiny spec, deterministic weights, CPU), mostly in-process through
``ben2q.cli.main`` to keep the file fast; ``--watch`` and ``bg_remove.py`` run as real
processes. Every expected value is computed here independently (numpy/PIL) from the plain
RGBA output of the same input, never by calling ``ben2q.render``.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ben2q import folders
from ben2q.cli import build_parser, main, output_fields, output_names, run_submit

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
PORTRAIT = FIXTURES / "c_portrait.png"  # 333 x 517
LANDSCAPE = FIXTURES / "a_input.png"  # 640 x 427


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEN2Q_")}
    env.update({"BEN2Q_MODEL_SPEC": "tiny", "BEN2Q_DEVICE": "cpu", "BEN2Q_PRECISION": "float32"})
    return env


@pytest.fixture(scope="module", autouse=True)
def _tiny_engine_env():
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("BEN2Q_")]:
            mp.delenv(key)
        mp.setenv("BEN2Q_MODEL_SPEC", "tiny")
        mp.setenv("BEN2Q_DEVICE", "cpu")
        mp.setenv("BEN2Q_PRECISION", "float32")
        yield


def remove(*args: object) -> tuple[int, str]:
    """``ben2q remove ARGS`` in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["remove", *map(str, args)])
    return code, err.getvalue()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img).copy()


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, np.ndarray]:
    """The default output (RGBA PNG) of each fixture: what every option is checked against."""
    out = tmp_path_factory.mktemp("plain")
    code, err = remove(PORTRAIT, LANDSCAPE, "-o", out)
    assert code == 0, err
    return {p.stem: pixels(out / f"{p.stem}.png") for p in (PORTRAIT, LANDSCAPE)}


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if anything loads the model."""
    from ben2q.engine import Engine

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Engine, "load", classmethod(refuse))


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom), right/bottom exclusive, of the True pixels."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def padded_crop(plane: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """``plane[top:bottom, left:right]`` where the rectangle may pass the edges (zeros)."""
    left, top, right, bottom = rect
    pad = max(0, -left, -top, right - plane.shape[1], bottom - plane.shape[0])
    big = np.pad(plane, pad)
    return big[top + pad : bottom + pad, left + pad : right + pad]


# --- output options ----------------------------------------------------------------------


def test_bg_color_white_as_jpeg_is_the_composite_of_the_plain_output(tmp_path, plain):
    code, err = remove(PORTRAIT, "--bg-color", "white", "--format", "jpg", "-o", tmp_path)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c_portrait.jpg"]
    with Image.open(tmp_path / "c_portrait.jpg") as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (333, 517))
        got = np.asarray(img).astype(np.int32)
    rgba = plain["c_portrait"].astype(np.int32)
    a = rgba[..., 3:]
    want = (rgba[..., :3] * a + 255 * (255 - a) + 127) // 255  # round half up, exact ints
    # JPEG at quality 90 (4:2:0): small losses, mostly at edges
    assert np.abs(got - want).mean() < 3


def test_crop_with_margin_is_the_subject_box_grown_past_the_edges(tmp_path, plain):
    alpha = plain["c_portrait"][..., 3]
    code, err = remove(PORTRAIT, "--crop", "--crop-margin", "10px", "-o", tmp_path / "a")
    assert code == 0, err
    left, top, right, bottom = bbox(alpha >= 8)
    rect = (left - 10, top - 10, right + 10, bottom + 10)
    got = pixels(tmp_path / "a" / "c_portrait.png")
    assert got.shape == (bottom - top + 20, right - left + 20, 4)
    assert np.array_equal(got[..., 3], padded_crop(alpha, rect))  # alpha 0 beyond the image

    # a binary matte (threshold 230) has a smaller box: it touches the left edge only
    code, err = remove(
        PORTRAIT, "--crop", "--crop-margin", "10", "--mask-threshold", "230", "-o", tmp_path / "b"
    )
    assert code == 0, err
    binary = np.where(alpha >= 230, 255, 0).astype(np.uint8)
    left, top, right, bottom = bbox(binary >= 8)
    assert left == 0 and 0 < top and right < 333 and bottom < 517  # the case meant here
    rect = (left - 10, top - 10, right + 10, bottom + 10)
    got = pixels(tmp_path / "b" / "c_portrait.png")
    assert got.shape[:2] == (bottom - top + 20, right - left + 20)
    assert np.array_equal(got[..., 3], padded_crop(binary, rect))


def test_max_side_shrinks_keeping_the_aspect(tmp_path):
    code, err = remove(LANDSCAPE, PORTRAIT, "--max-side", "200", "-o", tmp_path)
    assert code == 0, err
    with Image.open(tmp_path / "a_input.png") as img:
        assert img.size == (200, round(427 * 200 / 640))
    with Image.open(tmp_path / "c_portrait.png") as img:
        assert img.size == (round(333 * 200 / 517), 200)


def test_alpha_only_is_the_plain_alpha_channel_exactly(tmp_path, plain):
    code, err = remove(LANDSCAPE, "--alpha-only", "-o", tmp_path)
    assert code == 0, err
    with Image.open(tmp_path / "a_input.png") as img:
        assert (img.format, img.mode) == ("PNG", "L")
        got = np.asarray(img)
    assert np.array_equal(got, plain["a_input"][..., 3])


def test_mask_writes_the_outputs_matte_beside_it(tmp_path, plain):
    code, err = remove(PORTRAIT, "--mask", "-o", tmp_path / "plain")
    assert code == 0, err
    assert np.array_equal(
        pixels(tmp_path / "plain" / "c_portrait.mask.png"), plain["c_portrait"][..., 3]
    )
    code, err = remove(PORTRAIT, "--mask", "--crop", "--max-side", "100", "-o", tmp_path / "c")
    assert code == 0, err
    out = pixels(tmp_path / "c" / "c_portrait.png")
    mask = pixels(tmp_path / "c" / "c_portrait.mask.png")
    assert mask.ndim == 2 and max(mask.shape) == 100
    assert np.array_equal(mask, out[..., 3])


def test_bg_image_path_is_composited_under_the_subject(tmp_path, plain):
    Image.new("RGB", (7, 5), (200, 30, 60)).save(tmp_path / "bg.png")
    code, err = remove(LANDSCAPE, "--bg-image", tmp_path / "bg.png", "-o", tmp_path / "o")
    assert code == 0, err
    got = pixels(tmp_path / "o" / "a_input.png").astype(np.int32)
    assert got.shape == (427, 640, 3)  # opaque: RGB
    rgba = plain["a_input"].astype(np.int32)
    a = rgba[..., 3:]
    want = (rgba[..., :3] * a + np.array([200, 30, 60]) * (255 - a) + 127) // 255
    assert np.abs(got - want).max() <= 1  # a flat backdrop stays flat when resized


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--format", "jpg"], "format"),
        (["--crop", "--crop-margin", "-5"], "crop_margin"),
        (["--bg-color", "notacolour"], "background"),
        (["--max-side", "10", "--scale", "0.5"], "scale"),
        (["--alpha-only", "--bg-color", "white"], "background"),
        (["--quality", "80"], "quality"),
    ],
)
def test_invalid_options_exit_2_naming_the_field_before_any_model(tmp_path, no_model, flags, field):
    code, err = remove(PORTRAIT, *flags, "-o", tmp_path / "out")
    assert code == 2
    assert err.startswith(f"error: invalid_request: {field}: "), err
    assert not (tmp_path / "out").exists()


def test_unusable_background_or_both_backgrounds_exit_2(tmp_path, no_model):
    code, err = remove(PORTRAIT, "--bg-image", tmp_path / "missing.png", "-o", tmp_path / "o")
    assert code == 2 and err.startswith("error: invalid_image: background: "), err
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()):
        main(["remove", str(PORTRAIT), "--bg-color", "red", "--bg-image", "x.png"])
    assert exc.value.code == 2


def test_output_fields_pass_only_the_flags_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parse = build_parser().parse_args
    assert output_fields(parse(["remove", "x.png"])) == {}
    args = parse(["remove", "x.png", "--bg-image", "bg.png", "--alpha-only", "--mask-smooth"])
    assert output_fields(args) == {
        "background": (tmp_path / "bg.png").resolve().as_uri(),
        "channels": "alpha",
        "mask_smooth": True,
    }
    args = parse(["remove", "x.png", "--bg-image", "s3://bucket/bg.jpg", "--format", "JPG"])
    assert output_fields(args) == {"background": "s3://bucket/bg.jpg", "format": "jpg"}


def test_submit_passes_the_output_options_to_the_client(capsys):
    calls = []

    class FakeClient:
        def submit(self, input, output, **kwargs):
            calls.append((input, output, kwargs))
            return SimpleNamespace(id="job-1")

        submit_batch = submit

    parse = build_parser().parse_args
    args = parse(["submit", "s3://bucket/a.png", "--output", "s3://bucket/o/"])
    assert run_submit(FakeClient(), args) == 0
    args = parse(
        ["submit", "s3://bucket/a.png", "s3://bucket/b.png", "--output", "s3://bucket/o/"]
        + ["--bg-color", "white", "--format", "jpg", "--crop", "--max-side", "100", "--mask"]
    )
    assert run_submit(FakeClient(), args) == 0
    assert calls[0][2] == {"refine": False, "mask": False}
    assert calls[1][0] == ["s3://bucket/a.png", "s3://bucket/b.png"]
    assert calls[1][2] == {
        "refine": False,
        "mask": True,
        "background": "white",
        "format": "jpg",
        "crop": True,
        "max_side": 100,
    }
    assert capsys.readouterr().out == "job-1\njob-1\n"


def test_submit_reports_an_invalid_option_before_reaching_redis(capsys):
    argv = ["submit", "s3://bucket/a.png", "--output", "s3://bucket/o/", "--format", "jpg"]
    assert main([*argv, "--broker", "redis://127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.startswith("error: invalid_request: format: ")


# --- names and writes ----------------------------------------------------------------------


def test_output_names_take_the_extension_and_keep_mask_files_apart(tmp_path):
    inputs = [str(tmp_path / "a/x.jpg"), str(tmp_path / "b/x.mask.jpg"), str(tmp_path / "p.jpg")]
    names = output_names(inputs, tmp_path, mask=True)
    # x.jpg's mask is x.mask.png, so x.mask.jpg's output moves aside
    assert [n.name for n in names] == ["x.png", "x.mask_1.png", "p.png"]
    assert [n.name for n in output_names(inputs, tmp_path)] == ["x.png", "x.mask.png", "p.png"]
    # as JPEG, p.jpg's output would be p.jpg itself: an input is never overwritten
    names = output_names(inputs, tmp_path, extension="jpg", mask=True)
    assert [n.name for n in names] == ["x.jpg", "x.mask.jpg", "p_1.jpg"]


def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(folders.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        folders.atomic_write(target, b"new bytes")
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    assert target.read_bytes() == b"old"


def test_a_watched_file_is_released_once_it_held_still(tmp_path):
    path = tmp_path / "new.png"
    path.write_bytes(b"half")
    settler = folders.Settler(0.5)
    settler.observe(path, now=100.0)
    assert settler.ready(now=100.4) == []
    with open(path, "ab") as file:  # the copy goes on: the clock restarts
        file.write(b" and the rest")
    assert settler.ready(now=100.6) == []
    assert settler.ready(now=101.0) == []
    assert settler.ready(now=101.2) == [(path, folders.signature(path))]
    assert settler.ready(now=102.0) == []  # released once
    settler.observe(path, now=103.0)
    path.unlink()
    assert settler.ready(now=104.0) == []  # gone before it settled


# --- folders -------------------------------------------------------------------------------


def _tree(root: Path, make_image: Callable, files: list[str]) -> None:
    for i, name in enumerate(files):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = {".jpg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
        make_image(40 + i, 32, seed=i).save(path, format=fmt)


def _outputs(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def test_folder_is_mirrored_images_only_and_resumes(tmp_path, make_image, monkeypatch):
    src = tmp_path / "photos"
    _tree(src, make_image, ["a.png", "b.JPG", "sub/deep/d.webp", "sub/e.png"])
    _tree(src, make_image, [".hidden.png", ".git/c.png", "out/stale.png"])
    (src / "notes.txt").write_text("not an image")
    (src / "sub" / "data.json").write_text("{}")
    out = src / "out"  # inside the input folder: never walked
    stale = {"stale.png"}

    code, err = remove(src, "-o", out)  # top level only
    assert code == 0, err
    assert _outputs(out) == stale | {"a.png", "b.png"}
    assert "2 of 2 images written" in err and "0 skipped" in err

    code, err = remove(src, "-r", "-o", out)
    assert code == 0, err
    assert _outputs(out) == stale | {"a.png", "b.png", "sub/deep/d.png", "sub/e.png"}
    assert "2 of 4 images written" in err and "2 skipped (already done), 0 failed" in err
    with Image.open(out / "sub" / "deep" / "d.png") as img:
        assert (img.mode, img.size) == ("RGBA", (42, 32))

    (out / "sub" / "e.png").unlink()  # as if the run had been interrupted before it
    code, err = remove(src, "-r", "-o", out)
    assert code == 0 and "1 of 4 images written" in err and "3 skipped" in err, err

    for p in out.rglob("*.png"):
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    with monkeypatch.context() as mp:  # all done: not even the model is loaded
        from ben2q.engine import Engine

        mp.setattr(Engine, "load", classmethod(lambda *a, **k: pytest.fail("model loaded")))
        code, err = remove(src, "-r", "-o", out)
    assert code == 0 and "0 of 4 images written" in err and "4 skipped" in err, err

    code, err = remove(src, "-r", "-o", out, "--overwrite")
    assert code == 0 and "4 of 4 images written" in err, err
    redone = {p.name for p in out.rglob("*.png") if p.stat().st_mtime_ns > 1_000_000_000}
    assert redone == {"a.png", "b.png", "d.png", "e.png"}


def test_folder_and_file_inputs_together(tmp_path, make_image):
    src = tmp_path / "in"
    _tree(src, make_image, ["x.png", "y.png", "sub/z.png"])
    _tree(tmp_path, make_image, ["x.png"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code, err = remove(src, tmp_path / "x.png", tmp_path / "broken.png", "-o", tmp_path / "out")
    assert code == 1
    assert "failed: " + str(tmp_path / "broken.png") + ": invalid_image: " in err
    assert "3 of 4 images written" in err and "1 failed" in err
    # the folder's outputs keep their mirrored names; the named file moves aside
    assert _outputs(tmp_path / "out") == {"x.png", "y.png", "x_1.png"}
    assert pixels(tmp_path / "out" / "x_1.png").shape == (32, 40, 4)  # the 40 x 32 x.png
    assert pixels(tmp_path / "out" / "x.png").shape == (32, 40, 4)
    assert pixels(tmp_path / "out" / "y.png").shape == (32, 41, 4)


def test_output_dir_equal_to_the_input_folder_is_refused(tmp_path, no_model):
    code, err = remove(tmp_path, "-o", tmp_path)
    assert code == 2 and "output directory" in err


def test_watch_needs_a_folder(tmp_path, no_model):
    code, err = remove(PORTRAIT, "--watch", "-o", tmp_path)
    assert code == 2 and "--watch" in err


def _wait_for(check: Callable[[], bool], timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, "the watcher exited early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_watch_processes_new_images_once_settled_and_stops_on_sigint(tmp_path, make_image):
    src, out = tmp_path / "in", tmp_path / "out"
    _tree(src, make_image, ["first.png"])
    buf = io.BytesIO()
    make_image(64, 48, seed=7).save(buf, format="PNG")
    data = buf.getvalue()
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ben2q.cli", "remove", "in", "--watch", "-o", "out"],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        _wait_for(lambda: (out / "first.png").exists(), 60, proc)
        with open(src / "new.png", "wb") as file:  # copied in slowly: read only when whole
            file.write(data[: len(data) // 2])
            file.flush()
            time.sleep(0.2)
            file.write(data[len(data) // 2 :])
        (src / "notes.txt").write_text("ignored")
        _wait_for(lambda: (out / "new.png").exists(), 30, proc)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert code == 0, err
    assert "failed:" not in err
    assert "written: in/new.png -> out/new.png" in err
    assert "2 of 2 images written" in err
    assert pixels(out / "new.png").shape == (48, 64, 4)
    assert _outputs(out) == {"first.png", "new.png"}


def test_bg_remove_takes_the_output_flags(tmp_path, make_image):
    make_image(64, 48, seed=3).save(tmp_path / "m1.png")
    out = subprocess.run(
        [sys.executable, str(ROOT / "bg_remove.py"), "--mode", "single", "--image", "m1.png"]
        + ["--bg-color", "#102030", "--format", "jpg", "--max-side", "32", "--mask"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert _outputs(tmp_path / "ben2_outputs") == {"m1.jpg", "m1.mask.png"}
    with Image.open(tmp_path / "ben2_outputs" / "m1.jpg") as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (32, 24))
    bad = subprocess.run(
        [sys.executable, str(ROOT / "bg_remove.py"), "--image", "m1.png", "--format", "jpeg"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "error: invalid_request: format: " in bad.stderr
