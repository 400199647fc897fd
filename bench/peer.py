"""ben2q against the runtime users pick instead: rembg's ``ben_custom`` session (ONNX Runtime)
on BEN2 Base exported to ONNX, and plain ``onnxruntime`` on the same graph. Not a test.

    .venv/bin/python bench/peer.py --onnx BEN2_Base.onnx   # the graph rembg's users run
    .venv/bin/python bench/peer.py --rounds 5 --calls 5 --threads 2 --image photo.jpg

``--onnx``: a BEN2 Base graph, e.g. PramaLLC's published ``BEN2_Base.onnx`` or the reference
implementation exported with ``torch.onnx.export(..., dynamo=True)`` (the README's figures);
it must hold the deterministic weights for the alpha comparison to mean anything. Without
it, ben2q's own network is exported (about 20 minutes, once): a correct graph, but one
ONNX Runtime runs about twice as slowly as the reference's, so not a fair peer.

The first run builds a venv for the peer under ``~/.cache/ben2q-peer`` (torch 2.13.0 from
this disk for the export, ``rembg==2.0.86``, ``onnxruntime==1.32.0``, ``onnx``): rembg pins
numpy and onnxruntime versions the project should not have to share. The graph is exported
once (deterministic weights, float32, 1024² input, opset 18) and cached there.

Sides, each in its own process, alternating in every round (rembg, ort, ben2q auto,
ben2q float32), each making ``--calls`` calls on the same image: a call's time is its
median over the calls after the second (onnxruntime's second call is slow while its memory
patterns settle) and over rounds. Prints ratios against rembg from the same run, the peak
RSS of each process, and how far each side's alpha is from ben2q float32's (rembg
normalises with mean 0.5 / std 1.0 instead of BEN2's ImageNet statistics, so its mattes
differ; ``ort`` uses BEN2's own preprocessing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SIDE = ROOT / "bench" / "peer_side.py"
PHOTO = ROOT / "tests" / "fixtures" / "b_photo.png"
PEER_PACKAGES = [
    "rembg==2.0.86",
    "onnxruntime==1.32.0",
    "onnx",
    "pooch",
    "scikit-image",
    "pymatting",
    "jsonschema",
    "tqdm",
]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "?").strip()
    family, model = fields.get("CPU family", "?").strip(), fields.get("Model", "?").strip()
    return f"{name} (family {family}, model {model})"


def ensure_peer_venv(venv: Path) -> Path:
    """The peer's interpreter, installing it on first use."""
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if marker.exists():
        return python
    print(f"building the peer venv in {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # CPU build, from this disk
    subprocess.run([*pip, *PEER_PACKAGES], check=True)
    marker.touch()
    return python


def run_side(python: Path, args: list[str], threads: int) -> dict:
    env = {**os.environ, "THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    env.pop("BEN2Q_PRECISION", None)
    proc = subprocess.run([str(python), str(SIDE), *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steady(times: list[float]) -> float:
    """The median of the calls after the second (all of them if there are fewer)."""
    later = times[2:] or times
    return statistics.median(later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--image",
        type=Path,
        default=None,
        help="default: the conformance photograph resized to 1200x900",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "ben2q-peer")
    parser.add_argument("--skip-ort", action="store_true", help="rembg and ben2q only")
    parser.add_argument(
        "--onnx",
        type=Path,
        default=None,
        help="a BEN2 Base graph to give rembg (default: ben2q's network exported here)",
    )
    args = parser.parse_args()

    peer = ensure_peer_venv(args.venv)
    model = args.onnx or args.venv / "ben2_base_deterministic.onnx"
    if not model.exists():
        done = run_side(peer, ["export", str(model)], args.threads)
        print(f"exported {model} ({done['bytes'] / 1e6:.0f} MB) in {done['seconds']:.0f} s")

    work = Path(tempfile.mkdtemp(prefix="ben2q-peer-"))
    image = work / "image.png"
    if args.image is None:
        Image.open(PHOTO).convert("RGB").resize((1200, 900), Image.Resampling.LANCZOS).save(image)
    else:
        Image.open(args.image).convert("RGB").save(image)

    sides: list[tuple[str, Path, list[str]]] = [
        ("rembg", peer, ["rembg", str(model), str(image), str(args.calls)]),
        ("ort", peer, ["ort", str(model), str(image), str(args.calls)]),
        ("ben2q auto", Path(sys.executable), ["ben2q", "auto", str(image), str(args.calls)]),
        ("ben2q float32", Path(sys.executable), ["ben2q", "float32", str(image), str(args.calls)]),
    ]
    if args.skip_ort:
        sides = [s for s in sides if s[0] != "ort"]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in sides}
    for r in range(args.rounds):
        for name, python, side_args in sides:
            res = run_side(python, side_args, args.threads)
            results[name].append(res)
            calls = ", ".join(f"{t:.2f}" for t in res["times"])
            print(
                f"round {r + 1} {name:14s} calls {calls} s  peak {res['peak_mb']:.0f} MB",
                flush=True,
            )

    reference = np.asarray(Image.open(results["ben2q float32"][-1]["alpha"])).astype(int)
    base = statistics.median(steady(x["times"]) for x in results["rembg"])
    base_mb = max(x["peak_mb"] for x in results["rembg"])
    print(
        f"\nCPU: {cpu_name()}; {args.threads} threads; image {Image.open(image).size}; "
        f"{args.rounds} rounds x {args.calls} calls, steady state = calls after the second"
    )
    auto = results["ben2q auto"][-1]
    print(f"ben2q auto ran {auto.get('dtype')} ({auto.get('reason')})\n")
    print("| side | one image (steady) | vs rembg | peak RSS | vs rembg | alpha vs ben2q float32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in results:
        t = statistics.median(steady(x["times"]) for x in results[name])
        mb = max(x["peak_mb"] for x in results[name])
        alpha = np.asarray(Image.open(results[name][-1]["alpha"])).astype(int)
        diff = np.abs(alpha - reference)
        print(
            f"| {name} | {t:.2f} s | {t / base:.3f} | {mb / 1024:.2f} GB | {mb / base_mb:.3f} "
            f"| mean {diff.mean():.2f}, ±4: {(diff <= 4).mean():.2%} |"
        )


if __name__ == "__main__":
    main()
