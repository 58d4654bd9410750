"""Shared fixtures: the public-domain texts in ../shared/data (skipped, with the reason, when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.fast_bpe import gigatoken_installed

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is missing: these tests use the texts in ../shared/data beside the project checkout")
    return path


@pytest.fixture
def verdict_path() -> Path:
    return shared_file("the-verdict.txt")


@pytest.fixture
def verdict_text(verdict_path: Path) -> str:
    return verdict_path.read_text(encoding="utf-8")


@pytest.fixture
def shakespeare_path() -> Path:
    return shared_file("tinyshakespeare.txt")


@pytest.fixture
def in_root(monkeypatch):
    """Run from the project root, where the example configs' relative paths point."""
    monkeypatch.chdir(ROOT)
    return ROOT


# Encode tests run with each backend; TEXTPIPE_GIGATOKEN=0 (as `make test` does once) leaves tiktoken alone.
BACKENDS = ["tiktoken"] + (["gigatoken"] if gigatoken_installed() else [])


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each ``bpe_encode`` backend available here, by name."""
    return request.param
