"""Engine benchmark: one-image latency, batched per-image time, fast (bf16) mode, allocator
setting, peak memory and page faults. Not a test; prints comparable figures, with ratios
against baselines measured in the same run.

    .venv/bin/python bench/engine.py                 # base network (slow on CPU: minutes)
    .venv/bin/python bench/engine.py --spec tiny     # the tiny network, seconds
    .venv/bin/python bench/engine.py --reps 3 --threads 2 --skip-batches --skip-refine

Every case runs in its own process (so its peak RSS and page faults are its own) on the same
deterministic weights and the same synthetic 1200x900 images; each case does a warm-up call
first, then ``--reps`` timed calls (median reported, all listed). Cases:

* ``float32``: one image through ``remove_background``, the default (conforming) path; the
  baseline of the other one-image cases.
* ``float32 keep``: the same with ``keep_freed_memory=True`` (glibc keeps freed memory).
* ``bfloat16``: fast mode (bf16 autocast on CPU); its alpha is compared with the float32
  one on the timed image and on the real photograph of the conformance fixtures.
* ``max_batch=b``: ``--images`` images, b per forward; per-image time against b = 1.

Ratios against the reference implementation come from ``../shared/refbench/run`` (the
reference is not part of this project).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "b_photo.png"


def synthetic(width: int, height: int, seed: int) -> Image.Image:
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a = np.stack(
        [
            60 + 120 * xx / width,
            80 + 100 * yy / height,
            140 + 60 * np.sin(xx / 37) * np.cos(yy / 53),
        ],
        -1,
    )
    a += rs.normal(0, 6, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def ellipse_alpha(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    r = ((xx - width / 2) / (width / 3)) ** 2 + ((yy - height / 2) / (height / 3)) ** 2
    return (np.clip((1.1 - r) * 5, 0, 1) * 255).astype(np.uint8)


def _usage() -> tuple[float, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_maxrss / 1024, ru.ru_minflt


def _timed(fn, reps: int) -> dict:
    """Warm-up, then ``reps`` timed calls: times, minor faults and system time per call."""
    fn()
    times, faults, systime = [], [], []
    for _ in range(reps):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        systime.append(r1.ru_stime - r0.ru_stime)
    return {
        "seconds": statistics.median(times),
        "times": times,
        "faults": statistics.median(faults),
        "sys_seconds": statistics.median(systime),
        "rss_mb": _usage()[0],
    }


def run_case(args: argparse.Namespace) -> dict:
    """One measurement in this process."""
    import torch

    torch.set_num_threads(args.threads)
    if args.case == "refine":
        from ben2q.refine import refine_foreground

        w, h = {1: (1200, 900), 4: (2400, 1700), 12: (4000, 3000)}[args.megapixels]
        rgb = np.asarray(synthetic(w, h, 0))
        alpha = ellipse_alpha(w, h)
        return _timed(lambda: refine_foreground(rgb, alpha), args.reps)

    from ben2q.config import Settings
    from ben2q.engine import Engine

    engine = Engine.load(
        settings=Settings(
            model_spec=args.spec,
            weights=args.weights,
            device="cpu",
            max_batch=args.batch,
            precision=args.precision,
        ),
        keep_freed_memory=args.keep,
    )
    images = [synthetic(1200, 900, seed) for seed in range(args.images)]
    if args.case == "single":
        res = _timed(lambda: engine.remove_background(images[:1]), args.reps)
    else:  # batched: max_batch = args.batch over all images
        res = _timed(lambda: engine.remove_background(images), args.reps)
    res["dtype"] = str(engine.dtype).removeprefix("torch.")  # what ran (see resolve_precision)
    if args.alpha_out:
        alphas = {"timed": engine.predict(images[:1])[0].alpha}
        if PHOTO.is_file():
            alphas["photo"] = engine.predict([Image.open(PHOTO).convert("RGB")])[0].alpha
        np.savez(args.alpha_out, **alphas)
    return res


def _spawn(args: argparse.Namespace, **case) -> dict:
    cmd = [sys.executable, __file__, "--spec", args.spec, "--reps", str(args.reps)]
    cmd += ["--threads", str(args.threads), "--images", str(args.images)]
    if args.weights:
        cmd += ["--weights", str(args.weights)]
    for key, value in case.items():
        if value is True:
            cmd.append(f"--{key.replace('_', '-')}")
        elif value is not False:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _line(label: str, res: dict, extra: str = "") -> str:
    times = " ".join(f"{t:.2f}" for t in res["times"])
    return (
        f"{label:<18s} {res['seconds']:8.3f} s  [{times}]  peak RSS {res['rss_mb']:6.0f} MB  "
        f"minor faults {res['faults'] / 1e3:7.0f} k  sys {res['sys_seconds']:5.2f} s{extra}"
    )


def _alpha_diff(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return f"within ±1 {(d <= 1).mean():.3%}, within ±4 {(d <= 4).mean():.3%}, max {d.max()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="base", choices=["base", "tiny"])
    p.add_argument("--weights", type=Path, help="checkpoint (default: deterministic weights)")
    p.add_argument("--images", type=int, default=4, help="images in the batched runs")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-batches", action="store_true")
    p.add_argument("--skip-refine", action="store_true")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--alpha-out", help=argparse.SUPPRESS)
    p.add_argument("--megapixels", type=int, default=12, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.weights is None and args.spec == "base":
            # Deterministic weights written once, so every case loads the same file.
            import torch

            from ben2q.model import build_model, deterministic_state_dict

            model = build_model("base")
            args.weights = Path(tmp) / "det.pth"
            torch.save({"model_state_dict": deterministic_state_dict(model)}, args.weights)
            del model
        print(
            f"spec={args.spec} threads={args.threads} reps={args.reps} cpu={os.cpu_count()} "
            f"image=1200x900 load={os.getloadavg()[0]:.2f}"
        )
        f32_alpha, bf16_alpha = Path(tmp) / "f32.npz", Path(tmp) / "bf16.npz"
        base = _spawn(args, case="single", alpha_out=f32_alpha)
        print(_line("one image float32", base, "  (baseline)"))
        keep = _spawn(args, case="single", keep=True)
        print(_line("  keep_freed_mem", keep, f"  x{keep['seconds'] / base['seconds']:.3f}"))
        fast = _spawn(args, case="single", precision="bfloat16", alpha_out=bf16_alpha)
        label = "  bfloat16" if fast["dtype"] == "bfloat16" else f"  bf16 -> {fast['dtype']}"
        print(_line(label, fast, f"  x{fast['seconds'] / base['seconds']:.3f}"))
        a32, a16 = np.load(f32_alpha), np.load(bf16_alpha)
        for name in a32.files:
            print(f"    bf16 vs float32 alpha ({name}): {_alpha_diff(a16[name], a32[name])}")
        if not args.skip_batches:
            per_image1 = None
            for b in (1, 2, 4):
                res = _spawn(args, case="batch", batch=b)
                per_image = res["seconds"] / args.images
                per_image1 = per_image1 or per_image
                print(
                    _line(f"max_batch={b} ({args.images} img)", res)
                    + f"\n{'':18s} per image {per_image:.3f} s  x{per_image / per_image1:.3f} "
                    f"vs max_batch=1, x{per_image / base['seconds']:.3f} vs one image"
                )
        print(f"load at the end {os.getloadavg()[0]:.2f}")
        if not args.skip_refine:
            for mp in (1, 4, 12):
                res = _spawn(args, case="refine", megapixels=mp)
                print(_line(f"refine {mp:2d} MP", res))


if __name__ == "__main__":
    main()
