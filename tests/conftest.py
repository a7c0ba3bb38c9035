"""Shared fixtures. Integration fixtures (a real prepared model, a real `hone serve` with vLLM) live
in tests/integration_support.py and are imported by the integration tests only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.config import Settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own HONE_* variables must not leak into tests.
    for k in list(os.environ):
        if k.startswith("HONE_"):
            monkeypatch.delenv(k, raising=False)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings.load(env={"HONE_HOME": str(tmp_path / "home")})
    s.ensure_dirs()
    return s
