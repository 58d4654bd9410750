"""Pipeline states on disk: JSON, written atomically so a crash never leaves half a checkpoint."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


class CheckpointError(OSError):
    """A checkpoint could not be written; the message names the file."""


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


def load_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; a file that is not JSON (truncated, say) is a ``ValueError`` naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint {os.fspath(path)}: not a JSON file ({e}); was it truncated?") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by ``run --checkpoint``: ``{pipeline: state, batches: n}``, checked field by field."""
    saved = load_json(path)
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {os.fspath(path)}: expected a JSON object, got {type(saved).__name__}")
    for field, kind in (("pipeline", dict), ("batches", int)):
        if not isinstance(saved.get(field), kind) or isinstance(saved.get(field), bool):
            found = "missing" if field not in saved else f"found {saved[field]!r}"
            want = "object" if kind is dict else "integer"
            raise ValueError(f"checkpoint {os.fspath(path)}: field `{field}` must be a JSON {want} ({found})")
    if saved["batches"] < 0:
        raise ValueError(f"checkpoint {os.fspath(path)}: field `batches` must not be negative ({saved['batches']})")
    return saved
