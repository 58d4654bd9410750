"""Pipeline states on disk: JSON, written atomically so a crash never leaves half a checkpoint."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def save_json(path: str | os.PathLike, value: dict[str, Any]) -> None:
    """Write ``value`` to ``path`` through a temporary file and an atomic rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
