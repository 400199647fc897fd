"""Engine benchmark: latency, batched throughput against a one-at-a-time loop, refinement,
peak memory. Not a test; prints comparable figures (ratios measured in the same run).

    .venv/bin/python bench/engine.py                 # base network (slow on CPU: minutes)
    .venv/bin/python bench/engine.py --spec tiny     # the tiny network, seconds
    .venv/bin/python bench/engine.py --images 8 --reps 2 --threads 2

Every case runs in its own process (so its peak RSS is its own) on the same deterministic
weights and the same synthetic 1200x900 images.
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


def run_case(args: argparse.Namespace) -> dict:
    """One measurement in this process; returns seconds (best of reps) and peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    if args.case == "refine":
        from ben2q.refine import refine_foreground

        w, h = {1: (1200, 900), 4: (2400, 1700), 12: (4000, 3000)}[args.megapixels]
        rgb = np.asarray(synthetic(w, h, 0))
        alpha = ellipse_alpha(w, h)
        refine_foreground(rgb, alpha)  # warm-up
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            refine_foreground(rgb, alpha)
            times.append(time.perf_counter() - t)
        return {"seconds": min(times), "times": times, "rss_mb": _peak_rss_mb()}

    from ben2q.config import Settings
    from ben2q.engine import Engine

    engine = Engine.load(
        settings=Settings(
            model_spec=args.spec, weights=args.weights, device="cpu", max_batch=args.batch
        )
    )
    images = [synthetic(1200, 900, seed) for seed in range(args.images)]
    engine.remove_background(images[:1])  # warm-up
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        if args.case == "single":
            engine.remove_background(images[:1])
        elif args.case == "loop":
            for img in images:
                engine.remove_background([img])
        else:  # batched: max_batch = args.batch
            engine.remove_background(images)
        times.append(time.perf_counter() - t)
    return {"seconds": min(times), "times": times, "rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spawn(args: argparse.Namespace, **case) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--spec",
        args.spec,
        "--reps",
        str(args.reps),
        "--threads",
        str(args.threads),
        "--images",
        str(args.images),
    ]
    if args.weights:
        cmd += ["--weights", str(args.weights)]
    for key, value in case.items():
        cmd += [f"--{key}", str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="base", choices=["base", "tiny"])
    p.add_argument("--weights", type=Path, help="checkpoint (default: deterministic weights)")
    p.add_argument("--images", type=int, default=4, help="images in the throughput runs")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--megapixels", type=int, default=12, help=argparse.SUPPRESS)
    p.add_argument("--skip-refine", action="store_true")
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
            f"spec={args.spec} threads={args.threads} images={args.images} reps={args.reps} "
            f"cpu={os.cpu_count()} image=1200x900"
        )
        single = _spawn(args, case="single")
        print(
            f"one image        {single['seconds']:8.3f} s            peak RSS "
            f"{single['rss_mb']:7.0f} MB"
        )
        loop = _spawn(args, case="loop")
        loop_ips = args.images / loop["seconds"]
        print(
            f"loop of {args.images}        {loop['seconds']:8.3f} s  {loop_ips:6.3f} img/s"
            f"  peak RSS {loop['rss_mb']:7.0f} MB  (baseline)"
        )
        for b in (1, 2, 4):
            res = _spawn(args, case="batch", batch=b)
            ips = args.images / res["seconds"]
            print(
                f"max_batch={b}      {res['seconds']:8.3f} s  {ips:6.3f} img/s"
                f"  peak RSS {res['rss_mb']:7.0f} MB  throughput x{ips / loop_ips:.3f}"
                " vs loop"
            )
        if not args.skip_refine:
            for mp in (1, 4, 12):
                res = _spawn(args, case="refine", megapixels=mp)
                print(
                    f"refine {mp:2d} MP     {res['seconds']:8.3f} s (median of runs "
                    f"{statistics.median(res['times']):.3f} s)  peak RSS {res['rss_mb']:7.0f} MB"
                )


if __name__ == "__main__":
    main()
