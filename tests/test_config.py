"""Settings: one object from BEN2Q_* variables; the example files under config/ are valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from ben2q.config import Settings

CONFIG = Path(__file__).resolve().parents[1] / "config"


def _pairs(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


@pytest.mark.parametrize("path", sorted(CONFIG.glob("*.env*")), ids=lambda p: p.name)
def test_example_files_name_only_real_settings(path, monkeypatch):
    pairs = _pairs(path)
    assert pairs, path
    fields = {f"BEN2Q_{name.upper()}" for name in Settings.model_fields}
    unknown = {k for k in pairs if k.startswith("BEN2Q_") and k not in fields}
    assert not unknown, f"{path.name} names unknown settings {unknown}"
    for key, value in pairs.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    for key, value in pairs.items():
        if key.startswith("BEN2Q_"):
            got = getattr(s, key.removeprefix("BEN2Q_").lower())
            if isinstance(got, list):
                assert got == json.loads(value)
            elif isinstance(got, bool | int | float):
                assert got == type(got)(value.lower() == "true" if isinstance(got, bool) else value)
            else:
                assert str(got) == value or str(got) == str(Path(value))


def test_environment_overrides_and_validation(monkeypatch):
    monkeypatch.setenv("BEN2Q_MAX_BATCH", "8")
    monkeypatch.setenv("BEN2Q_MODEL_SPEC", "tiny")
    s = Settings()
    assert s.max_batch == 8 and s.model_spec == "tiny"
    assert s.status_url == s.broker_url  # no result backend: the broker stores statuses
    assert Settings(result_backend="redis://h:1/2").status_url == "redis://h:1/2"
    monkeypatch.setenv("BEN2Q_MAX_BATCH", "0")
    with pytest.raises(ValidationError, match="max_batch"):
        Settings()
    monkeypatch.setenv("BEN2Q_MAX_BATCH", "2")
    monkeypatch.setenv("BEN2Q_MODEL_SPEC", "huge")
    with pytest.raises(ValidationError, match="model_spec"):
        Settings()
