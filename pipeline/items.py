"""What flows on the edges, shown briefly: shapes and dtypes rather than walls of numbers."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def describe(item: Any) -> str:
    """A short summary of an item (a batch, a block of windows, a document)."""
    if isinstance(item, (torch.Tensor, np.ndarray)):
        device = f" on {item.device}" if isinstance(item, torch.Tensor) and item.device.type != "cpu" else ""
        return (
            f"{type(item).__module__.split('.')[0]} {str(item.dtype).replace('torch.', '')} {list(item.shape)}{device}"
        )
    if isinstance(item, str) and len(item) > 40:
        return f"str of {len(item):,} chars"
    if isinstance(item, dict):
        return "{" + ", ".join(f"{key}: {describe(value)}" for key, value in item.items()) + "}"
    return repr(item)
