"""A streaming data pipeline: text -> BPE -> sliding windows -> batches -> input embeddings.

``pipeline`` is the engine (stages, graphs, state); the stages themselves live in ``stages``.
"""

import gc

from pipeline.config import load_config
from pipeline.graph import Pipeline
from pipeline.registry import STAGES, ConfigError, provided, register
from pipeline.stage import Stage, StageError

# The objects made by importing torch (through torchdata) live as long as the process; frozen, no full
# garbage collection walks them again (one walk took 0.1-0.4 s, often inside the first batch's time).
gc.freeze()

__all__ = [
    "STAGES",
    "ConfigError",
    "Pipeline",
    "Stage",
    "StageError",
    "create_dataloader_v1",
    "load_config",
    "register",
]


def __getattr__(name: str):
    if name == "create_dataloader_v1":  # the book's drop-in, from the stage types' package (see pipeline.registry)
        return provided(name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
