"""Checkpoint loading: formats, strictness, safety, and the Hugging Face hub cache offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from ben2q.errors import WeightsUnavailable
from ben2q.model import build_model, deterministic_state_dict, load_weights, read_state_dict
from ben2q.model.weights import checkpoint_filter_fn


@pytest.fixture(scope="module")
def tiny_state():
    return deterministic_state_dict(build_model("tiny"))


def _same(model, state) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_pth_in_the_published_format_loads_strictly(tmp_path, tiny_state):
    path = tmp_path / "ck.pth"
    torch.save({"model_state_dict": tiny_state}, path)
    model = load_weights(build_model("tiny"), path)
    assert _same(model, tiny_state)


def test_zip_checkpoints_are_memory_mapped_and_legacy_ones_still_load(tmp_path, tiny_state):
    zipped, legacy = tmp_path / "zip.pth", tmp_path / "legacy.pth"
    torch.save(tiny_state, zipped)
    torch.save(tiny_state, legacy, _use_new_zipfile_serialization=False)
    mapped = read_state_dict(zipped)
    key = next(iter(tiny_state))
    assert torch.equal(mapped[key], tiny_state[key])

    def mapped_files() -> str:
        with open("/proc/self/maps") as maps:
            return maps.read()

    assert str(zipped) in mapped_files()  # the tensors are the file's pages, not a copy
    state = read_state_dict(legacy)
    assert str(legacy) not in mapped_files() and torch.equal(state[key], tiny_state[key])
    assert _same(load_weights(build_model("tiny"), legacy), tiny_state)


def test_safetensors_and_prefixed_keys_load(tmp_path, tiny_state):
    path = tmp_path / "ck.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(path))
    assert _same(load_weights(build_model("tiny"), path), tiny_state)
    prefixed = {f"module.{k}": v for k, v in tiny_state.items()}
    assert set(checkpoint_filter_fn(prefixed, build_model("tiny"))) == set(tiny_state)


def test_missing_or_wrong_keys_are_refused(tmp_path, tiny_state):
    broken = dict(tiny_state)
    broken.pop("output.0.weight")
    path = tmp_path / "broken.pth"
    torch.save({"model_state_dict": broken}, path)
    with pytest.raises(WeightsUnavailable, match="does not fit") as info:
        load_weights(build_model("tiny"), path)
    assert info.value.code == "weights_unavailable"
    # a base checkpoint does not load into the tiny model either
    with pytest.raises(WeightsUnavailable):
        load_weights(build_model("tiny"), _save(tmp_path, build_model("base").state_dict()))


def _save(tmp_path, state):
    path = tmp_path / "other.pth"
    torch.save({"model_state_dict": state}, path)
    return path


class _Payload:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"x": _Payload()}}, path)
    with pytest.raises(WeightsUnavailable, match="cannot read checkpoint"):
        read_state_dict(path)


def test_missing_file_says_how_to_supply_weights(tmp_path):
    with pytest.raises(WeightsUnavailable, match="BEN2Q_WEIGHTS"):
        read_state_dict(tmp_path / "nope.pth")


def _run_offline(code: str, hf_home, extra_env=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "BEN2Q_"))}
    env.update({"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", **(extra_env or {})})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_weights_come_from_a_prepopulated_hub_cache_offline(tmp_path, tiny_state):
    # The layout huggingface_hub itself writes: refs/main -> snapshots/<commit>/<file>.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--PramaLLC--BEN2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.save({"model_state_dict": tiny_state}, snapshot / "BEN2_Base.pth")
    out = _run_offline(
        """
        import json, torch
        from ben2q.config import Settings
        from ben2q.model import build_model, get_spec, load_weights, resolve_checkpoint
        path = resolve_checkpoint(get_spec("base"), None, Settings())
        model = load_weights(build_model("tiny"), path)
        print(json.dumps({"path": str(path),
                          "bias": model.state_dict()["output.0.bias"].tolist()}))
        """,
        tmp_path / "hf",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["path"] == str(snapshot / "BEN2_Base.pth")
    assert result["bias"] == tiny_state["output.0.bias"].tolist()


def test_offline_without_cached_weights_gives_one_clear_error(tmp_path):
    out = _run_offline(
        """
        from ben2q import BEN2BackgroundRemoverAdapter
        BEN2BackgroundRemoverAdapter(device="cpu")
        """,
        tmp_path / "empty-hf",
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ben2q.errors.WeightsUnavailable:")
    assert "PramaLLC/BEN2" in last and "BEN2Q_WEIGHTS" in last


def test_cli_reports_missing_weights_in_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "ben2q.cli", "remove", "x.png"],
        env={**os.environ, "BEN2Q_WEIGHTS": str(tmp_path / "missing.pth")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: weights_unavailable: no checkpoint file at {tmp_path}")
    assert "BEN2Q_WEIGHTS" in lines[0]
