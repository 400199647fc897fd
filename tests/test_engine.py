"""The engine on the tiny spec: batching, chunking, alpha semantics, precision, refinement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ben2q.config import Settings
from ben2q.engine import (
    Engine,
    PrecisionChoice,
    choose_precision,
    resolve_device,
    resolve_precision,
)
from ben2q.errors import InvalidImage


def test_auto_precision_is_bfloat16_where_the_cpu_has_it_and_says_why(monkeypatch):
    import ben2q.engine as engine_mod

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_precision("auto", cuda) == PrecisionChoice(
        torch.float16, "auto: float16 autocast on CUDA"
    )
    monkeypatch.setattr(engine_mod, "cpu_runs_natively", lambda dtype: True)
    monkeypatch.setattr(engine_mod, "cpu_matrix_units", lambda: "AMX")
    native = choose_precision("auto", cpu)
    assert native == PrecisionChoice(
        torch.bfloat16, "auto: this CPU computes bfloat16 natively (AMX)"
    )
    assert native.name == "bfloat16"
    monkeypatch.setattr(engine_mod, "cpu_runs_natively", lambda dtype: dtype == torch.float32)
    plain = choose_precision("auto", cpu)
    assert plain.dtype == torch.float32 and "no native bfloat16" in plain.reason
    assert choose_precision("float32", cpu) == PrecisionChoice(torch.float32, "float32 asked for")
    monkeypatch.undo()
    # this machine: the real probes
    units = engine_mod.cpu_matrix_units()
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert resolve_precision("auto", cpu) == expected
    assert units in ("AMX", "AVX512-BF16", "none")
    if units != "none":
        assert expected == torch.bfloat16 and units in choose_precision("auto", cpu).reason


def test_reduced_precision_on_the_cpu_only_where_it_is_native(monkeypatch, caplog):
    import ben2q.engine as engine_mod

    cpu = torch.device("cpu")
    monkeypatch.setattr(engine_mod, "cpu_runs_natively", lambda dtype: True)
    assert resolve_precision("bfloat16", cpu) == torch.bfloat16
    assert resolve_precision("float16", cpu) == torch.float16
    monkeypatch.setattr(engine_mod, "cpu_runs_natively", lambda dtype: dtype == torch.float32)
    with caplog.at_level("WARNING", logger="ben2q.engine"):
        assert resolve_precision("bfloat16", cpu) == torch.float32
    assert "no native bfloat16" in caplog.text
    # CUDA is not second-guessed; the real probe answers for this machine's CPU
    assert resolve_precision("bfloat16", torch.device("cuda")) == torch.bfloat16
    monkeypatch.undo()
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    expected = torch.bfloat16 if native else torch.float32
    assert resolve_precision("bfloat16", cpu) == expected
    assert resolve_device("cpu") == cpu
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_outputs_are_rgba_of_the_input_size_with_the_input_colours(tiny_engine, make_image):
    images = [make_image(97, 61, seed=1), make_image(64, 200, seed=2)]
    outs = tiny_engine.remove_background(images)
    for src, out in zip(images, outs, strict=True):
        assert out.mode == "RGBA" and out.size == src.size
        assert np.array_equal(np.asarray(out)[..., :3], np.asarray(src))
        alpha = np.asarray(out)[..., 3]
        assert alpha.min() == 0 and alpha.max() == 255  # min-max normalised


def test_batches_and_chunks_equal_single_images(make_image):
    images = [make_image(120 + 13 * i, 90 + 7 * i, seed=i) for i in range(5)]
    chunked = Engine.load(settings=Settings(model_spec="tiny", device="cpu", max_batch=2))
    assert [list(r) for r in chunked.chunks(5)] == [[0, 1], [2, 3], [4]]
    batched = chunked.predict(images)
    singles = [chunked.predict([img])[0] for img in images]
    for b, s in zip(batched, singles, strict=True):
        diff = np.abs(b.alpha.astype(int) - s.alpha.astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999
    # different images give different alphas: the comparison is not vacuous
    assert not np.array_equal(batched[0].alpha[:60, :60], batched[1].alpha[:60, :60])


def test_mask_to_alpha_min_max_normalises_and_truncates():
    mask = torch.tensor([[[0.2, 0.4], [0.6, 0.7]]])
    alpha = Engine.mask_to_alpha(mask, 2, 2)
    # (m - 0.2) / 0.5 * 255 truncated: 0, 102, 204, 255
    assert alpha.tolist() == [[0, 102], [204, 255]]
    assert alpha.dtype == torch.uint8
    flat = Engine.mask_to_alpha(torch.full((1, 4, 4), 0.5), 3, 5)
    assert flat.shape == (3, 5) and torch.all(flat == 127)  # no NaN for a constant mask


def test_refinement_changes_colours_not_alpha(tiny_engine, make_image):
    img = make_image(150, 100, seed=4)
    plain, refined = tiny_engine.predict([img])[0], tiny_engine.predict([img], refine=True)[0]
    assert np.array_equal(plain.alpha, refined.alpha)
    assert refined.rgb.shape == (100, 150, 3) and refined.rgb.dtype == np.uint8
    assert not np.array_equal(refined.rgb, plain.rgb)
    # where the matte is opaque the colour stays the image's
    opaque = plain.alpha == 255
    if opaque.any():
        diff = np.abs(refined.rgb[opaque].astype(int) - plain.rgb[opaque].astype(int))
        assert diff.max() <= 2


def test_bfloat16_autocast_on_cpu_stays_close_to_float32(make_image, reduced_precision_on_cpu):
    img = make_image(128, 128, seed=5)
    fp32 = Engine.load(settings=Settings(model_spec="tiny", device="cpu")).predict([img])[0]
    bf16_engine = Engine.load(
        settings=Settings(model_spec="tiny", device="cpu", precision="bfloat16")
    )
    assert bf16_engine.dtype == torch.bfloat16
    bf16 = bf16_engine.predict([img])[0]
    diff = np.abs(fp32.alpha.astype(int) - bf16.alpha.astype(int))
    assert diff.mean() < 8 and np.percentile(diff, 90) <= 16


def test_preprocess_rejects_non_rgb_and_warmup_runs(tiny_engine):
    with pytest.raises(InvalidImage, match="RGB"):
        tiny_engine.preprocess(Image.new("L", (10, 10)))
    x = tiny_engine.preprocess(Image.new("RGB", (10, 30), (255, 0, 0)))
    assert x.shape == (3, 512, 512) and x.dtype == torch.uint8
    assert x[0].min() == 255 and x[1].max() == 0
    assert tiny_engine.warmup() > 0
    with pytest.raises(ValueError):
        Engine(tiny_engine.model, precision="float32", max_batch=0)


def test_warmup_modes_run_the_network_at_the_size_they_name(tiny_engine, monkeypatch):
    seen: list[tuple[int, ...]] = []
    real = tiny_engine.forward
    monkeypatch.setattr(
        tiny_engine, "forward", lambda batch: seen.append(batch.shape) or real(batch)
    )
    size = tiny_engine.spec.input_size
    assert tiny_engine.warmup("full") > 0
    assert tiny_engine.warmup("quick") > 0
    assert tiny_engine.warmup("auto") > 0  # on the CPU: quick
    assert tiny_engine.warmup("none") == 0.0
    quarter = (1, 3, size // 4, size // 4)
    assert seen == [(1, 3, size, size), quarter, quarter]


def test_cpu_forwards_one_image_at_a_time_by_default_with_the_same_result(tiny_engine):

    assert tiny_engine.forward_batch == 1  # CPU default
    stacked = Engine(
        tiny_engine.model, device="cpu", precision="float32", max_batch=3, forward_batch=3
    )
    assert stacked.forward_batch == 3
    batch = torch.randint(0, 256, (3, 3, 512, 512), dtype=torch.uint8)
    one_by_one, together = tiny_engine.forward(batch), stacked.forward(batch)
    assert one_by_one.shape == together.shape == (3, 1, 512, 512)
    assert (one_by_one - together).abs().max() < 1e-4
    with pytest.raises(ValueError, match="forward_batch"):
        Engine(tiny_engine.model, device="cpu", precision="float32", forward_batch=0)


def test_a_device_that_is_not_here_is_refused_at_once():
    from ben2q.engine import resolve_device
    from ben2q.errors import DeviceUnavailable

    with pytest.raises(DeviceUnavailable, match="BEN2Q_DEVICE=cudo is not a device name"):
        resolve_device("cudo")
    with pytest.raises(DeviceUnavailable, match="only cpu and cuda are supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="BEN2Q_DEVICE=cuda:1: .*BEN2Q_DEVICE=cpu"):
            resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")


def test_device_failures_are_told_apart_from_bad_inputs_and_memory():
    from ben2q.engine import is_device_failure

    assert is_device_failure(torch.AcceleratorError("CUDA error: an illegal memory access"))
    assert is_device_failure(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_device_failure(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling ..."))
    assert not is_device_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to ..."))
    assert not is_device_failure(RuntimeError("shape '[1, 3]' is invalid for input of size 4"))
    assert not is_device_failure(ValueError("CUDA error"))


def test_the_warm_up_and_later_forwards_translate_device_failures(tiny_engine, monkeypatch):
    from ben2q.errors import DeviceUnavailable

    engine = Engine(tiny_engine.model, device="cpu", precision="float32")

    def out_of_memory(x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.model, "forward", out_of_memory)
    with pytest.raises(DeviceUnavailable, match="out of memory in the warm-up forward on cpu"):
        engine.warmup()

    def failed(x):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.model, "forward", failed)
    with pytest.raises(DeviceUnavailable, match="cpu failed: CUDA error: an illegal memory"):
        engine.predict([Image.new("RGB", (32, 24))])
