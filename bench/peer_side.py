"""One side of ``bench/peer.py``, run in its own process (and, for rembg, its own venv).

    python bench/peer_side.py export OUT.onnx             # BEN2 Base, deterministic weights
    python bench/peer_side.py rembg  MODEL.onnx IMAGE N  # rembg's ben_custom session, remove()
    python bench/peer_side.py ort    MODEL.onnx IMAGE N  # plain onnxruntime session.run
    python bench/peer_side.py ben2q  PRECISION IMAGE N   # ben2q's library, remove_background

Each timing side makes N calls on the same image and prints one JSON line: every call's
seconds, the process's peak RSS in MB, the alpha it produced (saved next to the image as
``<side>-alpha.png``), and what ran. Thread counts come from ``THREADS`` (torch's threads;
onnxruntime's intra-op threads), as ``../shared/refbench/run`` does.

Imports are per side: the rembg venv has no ben2q dependencies beyond torch and numpy,
which ``export`` needs for ``ben2q.model`` (put ``src`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

THREADS = int(os.environ.get("THREADS", "2"))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _report(side: str, times: list[float], alpha: np.ndarray, image: Path, **extra) -> None:
    out = image.parent / f"{side}-alpha.png"
    Image.fromarray(alpha).save(out)
    print(
        json.dumps(
            {"side": side, "times": times, "peak_mb": _peak_mb(), "alpha": str(out), **extra}
        )
    )


def export(path: Path) -> None:
    """BEN2 Base with the conformance's deterministic weights to ONNX (float32, 1024²)."""
    import torch

    from ben2q.model import build_model, deterministic_state_dict

    torch.set_num_threads(THREADS)
    model = build_model("base")
    model.load_state_dict(deterministic_state_dict(model), strict=True)
    model.eval().requires_grad_(False)
    model.pack_weights(False)  # plain aten ops only: what an exporter can express
    x = torch.zeros(1, 3, 1024, 1024)
    started = time.perf_counter()
    with torch.no_grad():
        model(x)  # fills the window-group caches (pure functions of the geometry) for export
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=["input"],
            output_names=["mask"],
            opset_version=18,
            dynamo=True,
            external_data=False,
        )
    print(
        json.dumps(
            {
                "side": "export",
                "seconds": time.perf_counter() - started,
                "bytes": path.stat().st_size,
            }
        )
    )


def rembg_side(model: Path, image: Path, calls: int) -> None:
    """rembg's own API, as its users call it: ``remove(img, session=new_session(...))``."""
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # what rembg reads for its session threads
    os.environ["U2NET_HOME"] = str(model.parent)  # rembg loads custom models from its home only
    import rembg

    session = rembg.new_session("ben_custom", model_path=str(model))
    img = Image.open(image).convert("RGB")
    times, out = [], None
    for _ in range(calls):
        started = time.perf_counter()
        out = rembg.remove(img, session=session)
        times.append(time.perf_counter() - started)
    alpha = np.asarray(out.getchannel("A"))
    _report(
        "rembg",
        times,
        alpha,
        image,
        version=rembg.__version__ if hasattr(rembg, "__version__") else "",
    )


def ort_side(model: Path, image: Path, calls: int) -> None:
    """onnxruntime alone on the same graph, BEN2's own preprocessing (ImageNet statistics)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    img = Image.open(image).convert("RGB")
    times, mask = [], None
    for _ in range(calls):
        started = time.perf_counter()
        x = np.asarray(img.resize((1024, 1024), Image.Resampling.LANCZOS), np.float32) / 255
        x = (x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)
        x = x.transpose(2, 0, 1)[None].astype(np.float32)
        mask = session.run(None, {session.get_inputs()[0].name: x})[0][0, 0]
        times.append(time.perf_counter() - started)
    m = Image.fromarray(mask.astype(np.float32), "F").resize(img.size, Image.Resampling.BILINEAR)
    m = np.asarray(m)
    alpha = ((m - m.min()) / max(float(m.max() - m.min()), 1e-12) * 255).astype(np.uint8)
    _report("ort", times, alpha, image, version=ort.__version__)


def ben2q_side(precision: str, image: Path, calls: int) -> None:
    """ben2q's library as its users call it (``remove_background``), deterministic weights."""
    import torch

    from ben2q.engine import Engine
    from ben2q.model import build_model, deterministic_state_dict

    torch.set_num_threads(THREADS)
    model = build_model("base")  # the exported graph's deterministic weights
    model.load_state_dict(deterministic_state_dict(model), strict=True)
    engine = Engine(model, device="cpu", precision=precision)
    img = Image.open(image).convert("RGB")
    times, result = [], None
    for _ in range(calls):
        started = time.perf_counter()
        result = engine.remove_background([img])[0]
        times.append(time.perf_counter() - started)
    alpha = np.asarray(result.getchannel("A"))
    _report(
        f"ben2q-{precision}",
        times,
        alpha,
        image,
        dtype=engine.precision.name,
        reason=engine.precision.reason,
    )


def main(argv: list[str]) -> None:
    cmd, *rest = argv
    if cmd == "export":
        export(Path(rest[0]))
    elif cmd == "rembg":
        rembg_side(Path(rest[0]), Path(rest[1]), int(rest[2]))
    elif cmd == "ort":
        ort_side(Path(rest[0]), Path(rest[1]), int(rest[2]))
    elif cmd == "ben2q":
        ben2q_side(rest[0], Path(rest[1]), int(rest[2]))
    else:
        raise SystemExit(f"unknown side {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
