"""``ben2q remove`` and the seed-compatible ``bg_remove.py``, run as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ben2q.cli import output_names

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEN2Q_")}
    env.update({"BEN2Q_MODEL_SPEC": "tiny", "BEN2Q_DEVICE": "cpu", "BEN2Q_PRECISION": "float32"})
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def test_output_names_never_collide_nor_overwrite_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    local = [str(tmp_path / p) for p in ("a/x.jpg", "b/x.jpg")]
    remote = ["https://h.example/p/x.webp?s=1"]
    inputs = local + remote + [str(tmp_path / "out/y.png"), "data:image/png;base64,AA"]
    names = output_names(inputs, tmp_path / "out")
    assert [n.name for n in names] == ["x.png", "x_1.png", "x_2.png", "y_1.png", "image.png"]
    assert len(set(names)) == len(names)


def test_remove_writes_rgba_pngs_and_reports_each_failure(tmp_path, make_image):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_image(80, 60, seed=1).save(tmp_path / "a" / "cat.jpg")
    make_image(50, 90, seed=2).save(tmp_path / "b" / "cat.png")
    (tmp_path / "bad.png").write_text("this is not a png")
    out = _run(
        [
            sys.executable,
            "-m",
            "ben2q.cli",
            "remove",
            "a/cat.jpg",
            "bad.png",
            "b/cat.png",
            "missing.jpg",
            "-o",
            "outs",
            "--refine",
        ],
        tmp_path,
    )
    assert out.returncode == 1, out.stderr
    failures = [line for line in out.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failures) == 2
    assert failures[0].startswith("failed: bad.png: invalid_image: ")
    assert failures[1].startswith("failed: missing.jpg: invalid_image: ")
    assert "2 of 4 images written" in out.stderr
    first = Image.open(tmp_path / "outs" / "cat.png")
    second = Image.open(tmp_path / "outs" / "cat_1.png")
    assert first.mode == second.mode == "RGBA"
    assert first.size == (80, 60) and second.size == (50, 90)
    assert np.asarray(first)[..., 3].max() == 255


def test_ben2q_console_script_succeeds_with_exit_zero(tmp_path, make_image):
    make_image(40, 40).save(tmp_path / "one.png")
    script = Path(sys.executable).parent / "ben2q"
    out = _run([str(script), "remove", "one.png", "--output-dir", "o"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "o" / "one.png").size == (40, 40)


def test_bg_remove_single_and_batch_modes(tmp_path, make_image):
    make_image(64, 48, seed=3).save(tmp_path / "m1.jpg")
    make_image(48, 64, seed=4).save(tmp_path / "m2.jpg")
    single = _run(
        [sys.executable, str(ROOT / "bg_remove.py"), "--mode", "single", "--image", "m1.jpg"],
        tmp_path,
    )
    assert single.returncode == 0, single.stderr
    assert Image.open(tmp_path / "ben2_outputs" / "m1.png").size == (64, 48)
    batch = _run(
        [
            sys.executable,
            str(ROOT / "bg_remove.py"),
            "--mode",
            "batch",
            "--images",
            "m1.jpg",
            "m2.jpg",
            "--output_dir",
            "res",
            "--refine",
        ],
        tmp_path,
    )
    assert batch.returncode == 0, batch.stderr
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["m1.png", "m2.png"]
    usage = _run([sys.executable, str(ROOT / "bg_remove.py"), "--mode", "batch"], tmp_path)
    assert usage.returncode == 2 and "--images" in usage.stderr
