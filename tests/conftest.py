"""Shared fixtures: the public-domain texts in ../shared/data (skipped, with the reason, when absent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.fast_bpe import gigatoken_installed

# One intra-op thread for torch here and in the processes the tests start (inherited): `make test` runs a pytest
# worker per CPU, and the tests' tiny models gain nothing from more threads, whose spinning only burns CPU time.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch is already imported (by stages)

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


@pytest.fixture(scope="module")
def restorer():
    """A fresh Python process (tests/resume_child.py) that restores the states it is sent (one per test module)."""
    child = subprocess.Popen([sys.executable, "-m", "tests.resume_child"], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    yield child
    child.stdin.close()
    assert child.wait(timeout=60) == 0
