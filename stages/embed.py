"""``embed``: token plus position embeddings, on the training device, trained with the model."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline.registry import register
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


class InputEmbedding(nn.Module):
    """``tok_emb(ids) + pos_emb(arange(T))``, named as in the book's ``GPTModel``.

    ``pos_emb`` is an ``nn.Embedding`` for ``learned`` positions, a fixed (buffer) table for
    ``sinusoidal``, and absent for ``none``. With ``seed``, the tables are drawn from a generator
    seeded with it (``seed=123`` gives the book's tables after ``torch.manual_seed(123)``).
    """

    def __init__(self, vocab_size: int, d_model: int, context_length: int, positional: str = "learned", seed: int | None = None):
        super().__init__()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        if generator is not None:  # redraw, in the book's order, from the local generator
            nn.init.normal_(self.tok_emb.weight, generator=generator)
        self.positional = positional
        if positional == "learned":
            self.pos_emb = nn.Embedding(context_length, d_model)
            if generator is not None:
                nn.init.normal_(self.pos_emb.weight, generator=generator)
        elif positional == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(context_length, d_model))
        self.context_length = context_length

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[-1]
        if T > self.context_length:
            raise ValueError(f"sequence of {T} tokens is longer than context_length {self.context_length}")
        embeddings = self.tok_emb(ids)
        if self.positional == "learned":
            embeddings = embeddings + self.pos_emb(torch.arange(T, device=ids.device))
        elif self.positional == "sinusoidal":
            embeddings = embeddings + self.pos_table[:T].to(embeddings.dtype)
        return embeddings


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@register("embed")
class Embed(Stage[dict]):
    """Moves each batch to the device and adds ``embeddings`` [B, T, D] = token + position embeddings.

    ``module`` (an ``InputEmbedding``) holds the tables; give its parameters to the optimizer. On a GPU,
    batches are pinned on the host and copied with ``non_blocking=True``.

    Args:
        vocab_size: rows of the token table (50257 for GPT-2).
        d_model: embedding width.
        context_length: rows of the position table; windows must not be longer.
        positional: ``learned`` (the book's), ``sinusoidal`` or ``none``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        seed: seed of the tables' initial values (None: torch's global generator).
    """

    def __init__(
        self,
        source,
        vocab_size: int,
        d_model: int,
        context_length: int,
        positional: str = "learned",
        device: str = "auto",
        dtype: str = "float32",
        seed: int | None = None,
    ):
        super().__init__()
        for field, value in (("vocab_size", vocab_size), ("d_model", d_model), ("context_length", context_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if positional not in POSITIONAL:
            raise ValueError(f"positional must be one of {POSITIONAL}, got {positional!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        self.source = source
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.device = resolve_device(device)
        self.module = InputEmbedding(vocab_size, d_model, context_length, positional, seed).to(self.device, DTYPES[dtype])

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state["source"] if initial_state is not None else None)

    def get_state(self) -> dict[str, Any]:
        return {"source": self.source.state_dict()}

    def next(self) -> dict:
        batch = dict(next(self.source))
        inputs = batch["inputs"]
        top = int(inputs.max()) if inputs.numel() else -1
        if top >= self.vocab_size:
            raise self.error(f"token id {top} is outside the token table (vocab_size {self.vocab_size})")
        if self.device.type == "cuda":
            batch = {k: v.pin_memory().to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch["embeddings"] = self.module(batch["inputs"])
        self.stats["batches"] += 1
        self.stats["tokens"] += inputs.numel()
        return batch
