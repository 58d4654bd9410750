"""``embed``: token plus position embeddings, on the training device, trained with the model."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from stages.batch import BatchDict
from pipeline.registry import ConfigError, register
from pipeline.schema import FieldError, MissingFileError, Positive, one_of
from pipeline.stage import Stage

POSITIONAL = ("learned", "sinusoidal", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sinusoidal_table(context_length: int, d_model: int) -> torch.Tensor:
    """The fixed table of "Attention Is All You Need": PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    position = torch.arange(context_length, dtype=torch.float64)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    table = torch.zeros(context_length, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
    return table.float()


def _embedding(rows: int, dim: int, generator: torch.Generator | None) -> nn.Embedding:
    """An ``nn.Embedding`` drawn from ``generator``; from torch's global generator (moving it) only when None."""
    if generator is None:
        return nn.Embedding(rows, dim)
    table = nn.utils.skip_init(nn.Embedding, rows, dim)  # no default draw: the global generator stays where it is
    nn.init.normal_(table.weight, generator=generator)
    return table


class InputEmbedding(nn.Module):
    """``tok_emb(ids) + pos_emb(arange(T))`` as in the book's ``GPTModel``; packed rows: ``pos_emb(position_ids)``.

    ``pos_emb`` is an ``nn.Embedding`` for ``learned`` positions, a fixed table (``pos_table``, a
    buffer left out of ``state_dict``: it is the formula's) for ``sinusoidal``, and absent for ``none``.
    With ``seed``, the tables are drawn from a generator seeded with it, and only from it (``seed=123``
    gives the book's tables after ``torch.manual_seed(123)``; torch's global generator does not move).
    The output has the tables' dtype, under autocast too.
    """

    def __init__(
        self, vocab_size: int, d_model: int, context_length: int, positional: str = "learned", seed: int | None = None
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.tok_emb = _embedding(vocab_size, d_model, generator)  # drawn in the book's order: tokens, then positions
        self.positional = positional
        if positional == "learned":
            self.pos_emb = _embedding(context_length, d_model, generator)
        elif positional == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(context_length, d_model), persistent=False)
        self.context_length = context_length

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of ``ids`` [B, T] at ``position_ids`` [B, T] (packed rows), else at ``0..T-1``."""
        T = ids.shape[-1]
        if T > self.context_length:
            raise ValueError(f"sequence of {T} tokens is longer than context_length {self.context_length}")
        positions = torch.arange(T, device=ids.device) if position_ids is None else position_ids
        embeddings = self.tok_emb(ids)
        if self.positional == "learned":
            embeddings = embeddings + self.pos_emb(positions)
        elif self.positional == "sinusoidal":
            embeddings = embeddings + self.pos_table[positions].to(embeddings.dtype)
        return embeddings


def load_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """Copy the tables of a saved state dict into ``module`` (stage field ``weights``).

    The file holds ``tok_emb.weight`` (and ``pos_emb.weight`` for learned positions), as an
    ``InputEmbedding``'s or the book's ``GPTModel``'s ``state_dict()`` does; other keys are ignored.
    """
    if not os.path.isfile(path):
        raise MissingFileError("weights",
                               f"weights: no such file {os.fspath(path)!r} (working directory {os.getcwd()})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or weights_only errors: all mean "not a state dict file"
        raise FieldError("weights",
            f"weights {os.fspath(path)!r}: not a file saved by torch.save ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, Mapping):
        raise FieldError("weights", f"weights {os.fspath(path)!r}: expected a state dict, got {type(state).__name__}")
    needed = module.state_dict()
    missing = [key for key in needed if key not in state]
    if missing:
        raise FieldError("weights",
                         f"weights {os.fspath(path)!r}: no {missing} in the file (it has {sorted(state)[:8]})")
    for key, table in needed.items():
        found = state[key]
        if not torch.is_tensor(found) or found.shape != table.shape:
            shape = tuple(found.shape) if torch.is_tensor(found) else type(found).__name__
            raise FieldError("weights",
                f"weights {os.fspath(path)!r}: `{key}` is {shape}, the stage's table is {tuple(table.shape)}"
            )
    module.load_state_dict({key: state[key] for key in needed})


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise FieldError("device", f"device {device!r}: {e}") from None
    if resolved.type == "meta":  # tensors without data: every embedding would be a placeholder
        raise FieldError("device", f"device {device!r}: the meta device holds no data; use auto, cpu or cuda")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FieldError("device", f"device {device!r}: CUDA is not available on this machine (use auto or cpu)")
    return resolved


@register("embed")
class Embed(Stage[dict]):
    """Moves each batch to the device and adds ``embeddings`` [B, T, D] = token + position embeddings.

    ``module`` (an ``InputEmbedding``) holds the tables; give its parameters to the optimizer. The
    embeddings are computed in ``next()``, in the caller's thread, with the tables as they are then:
    with grad in training, without a graph under ``torch.no_grad()``.

    On a GPU, each batch is pinned on the host and copied on a side stream with ``non_blocking=True``,
    one batch ahead: when ``next()`` returns batch k, batch k+1's copy is already issued and overlaps
    the model's step on k. The state stays the position after the last batch *returned*.

    Args:
        vocab_size: rows of the token table (50257 for GPT-2).
        d_model: embedding width.
        context_length: rows of the position table; windows must not be longer.
        positional: ``learned`` (the book's), ``sinusoidal`` or ``none``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        seed: seed of the tables' initial values (None: torch's global generator).
        weights: a state dict file (``torch.save``) to load the tables from, e.g. a trained model's.
        prefetch: fetch one batch ahead (default: on a GPU only; on the CPU it only reads ahead).
    """

    consumes = "batches"
    produces = "batches"  # with `embeddings`, on the device

    def __init__(
        self,
        source,
        vocab_size: Positive,
        d_model: Positive,
        context_length: Positive,
        positional: str = "learned",
        device: str = "auto",
        dtype: str = "float32",
        seed: int | None = None,
        weights: str | None = None,
        prefetch: bool | None = None,
    ):
        super().__init__()
        one_of("positional", positional, POSITIONAL)
        one_of("dtype", dtype, tuple(DTYPES))
        if weights is not None and not isinstance(weights, (str, os.PathLike)):
            raise FieldError("weights", f"weights must be a file path, got {weights!r}")
        if prefetch is not None and not isinstance(prefetch, bool):
            raise FieldError("prefetch", f"prefetch must be true or false, got {prefetch!r}")
        self.source = source
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.device = resolve_device(device)
        module = InputEmbedding(vocab_size, d_model, context_length, positional, seed)
        if weights is not None:
            load_weights(module, weights)
        self.module = module.to(self.device, DTYPES[dtype])
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def check_upstream(self, upstream: list) -> None:
        """Windows no longer than the position table, ids within the token table."""
        for node in upstream:
            max_length = getattr(node, "max_length", None)
            if max_length is not None and max_length > self.context_length:
                raise ConfigError(
                    f"context_length {self.context_length} is shorter than the windows of stage `{node.name}` "
                    f"(max_length {max_length})",
                    self.name,
                    "context_length",
                )
            ids = getattr(node, "vocab_size", None)
            if ids is not None and ids > self.vocab_size:
                raise ConfigError(
                    f"vocab_size {self.vocab_size} is smaller than the {ids} token ids stage `{node.name}` can produce",
                    self.name,
                    "vocab_size",
                )

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state["source"] if initial_state is not None else None)
        self._ahead: dict | Exception | None = None  # the next batch, its copy issued (or what fetching it raised)
        self._after_last: dict | None = None  # the source's state after the last batch returned, while one is ahead

    def get_state(self) -> dict[str, Any]:
        return {"source": self._after_last if self._ahead is not None else self.source.state_dict()}

    def next(self) -> dict:
        if not self.prefetch:
            return self._embed(self._fetch())
        if self._ahead is None:
            self._ahead = self._fetch_or_error()
        if isinstance(self._ahead, Exception):
            raise self._ahead  # StopIteration included: raised when its batch would have been returned
        batch = self._embed(self._ahead)  # first: the model's stream then waits for this batch's copy only
        self._after_last = self.source.state_dict()
        self._ahead = self._fetch_or_error()
        return batch

    def _fetch_or_error(self) -> dict | Exception:
        try:
            return self._fetch()
        except Exception as e:
            return e

    def _fetch(self) -> dict:
        """The source's next batch, checked, its tensors on their way to the device."""
        batch = BatchDict(next(self.source))
        inputs = batch["inputs"]
        top = int(inputs.max()) if inputs.numel() else -1
        if top >= self.vocab_size:
            raise self.error(f"token id {top} is outside the token table (vocab_size {self.vocab_size})")
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                batch = BatchDict(
                    {
                        k: v.pin_memory().to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                        for k, v in batch.items()
                    }
                )
        return batch

    def _embed(self, batch: dict) -> dict:
        if (
            self._stream is not None
        ):  # the consumer's stream waits for the copy; the allocator learns who uses the memory
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_stream(self._stream)
            for value in batch.values():
                if torch.is_tensor(value):
                    value.record_stream(consumer)
        batch["embeddings"] = self.module(batch["inputs"], batch.get("position_ids"))
        self.stats["batches"] += 1
        self.stats["tokens"] += batch["inputs"].numel()
        return batch
