"""Shared fixtures. Everything runs offline on CPU; GPU tests are marked ``gpu`` and skipped without CUDA.

Area-specific fixtures are appended below in delimited blocks (one per area); keep each block small.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network or the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test reads the user's project or HF cache."""
    home = tmp_path_factory.getbasetemp() / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("FLYWHEEL_PROJECT", raising=False)


@pytest.fixture
def project(tmp_path: Path):
    """A fresh, empty project (opened; closed after the test)."""
    from flywheel.project import init_project, open_project

    init_project(tmp_path / "proj", name="Test Character", trigger="fw_test")
    p = open_project(tmp_path / "proj")
    yield p
    p.close()
