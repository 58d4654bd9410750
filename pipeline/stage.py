"""The base every stage builds on: a torchdata ``BaseNode`` with a name, counters and errors that say where."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
from torchdata.nodes import BaseNode

from pipeline.schema import fields, item_kinds

T = TypeVar("T")


class StageError(RuntimeError):
    """A record could not be processed; the message names the stage, the source and the record.

    It takes one message argument, so it crosses DataLoader worker processes intact.
    """

    def __init__(self, message: str, stage: str | None = None, source: str | None = None, record: Any = None):
        super().__init__(message)
        self.stage, self.source, self.record = stage, source, record


class Counters(Counter):
    """A stage's counters, by identifier key (``tail_tokens``), each shown by its label (``label(key)``:
    from ``labels``, else the key with spaces). A label also reads its counter (``stats["tail tokens"]``)."""

    def __init__(self, *args: Any, labels: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.labels: dict[str, str] = dict(labels or {})

    def label(self, key: str) -> str:
        return self.labels.get(key, key.replace("_", " "))

    def __missing__(self, key: str) -> int:
        return next((self[k] for k in list(self) if self.label(k) == key), 0)

    def __reduce__(self):  # a Counter pickles its counts only; the labels go along
        return type(self), (dict(self),), {"labels": self.labels}


@dataclass(frozen=True)
class RunContext:
    """Where and when a pass runs, handed from the output stage down to every input (``Stage.set_context``).

    ``rank``/``world_size``: this process among the ranks (None: each reader's own, from its arguments
    or the environment); ``worker``/``num_workers``: this DataLoader worker among its rank's (0 of 1
    in the main process); ``epoch``: the epoch the next ``reset()`` starts (None: the one after the last).
    """

    rank: int | None = None
    world_size: int | None = None
    worker: int = 0
    num_workers: int = 1
    epoch: int | None = None


class Stage(BaseNode[T]):
    """A resumable pipeline stage.

    Subclasses implement ``next``, ``get_state`` and ``reset`` as any ``torchdata.nodes.BaseNode``;
    this base adds ``name`` (the stage's name in its graph, set by the builder), ``stats`` (``Counters``
    the CLI reports, with ``items`` given and ``seconds`` spent, inputs included) and ``error`` (a
    ``StageError`` naming this stage).

    What the engine knows of a stage is written here, as class attributes and hooks with defaults:
    the item kinds taken and given, whether it is worth running in workers, its parameters, a module
    to train, its branches, its check against the stages upstream of it, and the run context. For
    ``Pipeline.metrics`` a stage may declare ``tokens_in`` (tokens in an item it gives), ``wait_seconds``
    (when its inputs do not run inside its ``next``) and ``metrics`` (numbers of its own).
    """

    type_name = "stage"
    in_workers = False  # True for stages worth running in DataLoader workers (read, encode, window)
    consumes: str | tuple[str, ...] | None = None  # the kind(s) of item taken; None: reads files
    produces: str | None = None  # the kind of item given
    params: dict[str, Any] | None = None  # the arguments it was built with (set by ``register``)
    module: torch.nn.Module | None = None  # parameters to train with the model (``Pipeline.embedding``)
    branches: tuple[str, ...] | list[str] = ()  # the names of its outputs besides itself (``name.branch``)
    context = RunContext()

    def __init__(self) -> None:
        super().__init__()
        self.name = self.type_name
        self.stats = Counters()
        self._counts_tokens = type(self).tokens_in is not Stage.tokens_in  # decided once, not per item

    @classmethod
    def branch_names(cls, spec: Mapping[str, Any]) -> list[str]:
        """The branches a config entry of this type makes (checked before anything is built)."""
        return []

    def branch(self, name: str) -> BaseNode:
        """The stage that gives branch ``name`` of this one."""
        raise ValueError(f"stage `{self.name}` has no branch `{name}`")

    def check_upstream(self, upstream: list[BaseNode]) -> None:
        """Refuse (``ConfigError`` naming this stage and field) stages upstream that this one cannot follow."""

    def set_context(self, context: RunContext) -> None:
        """Run the coming passes in ``context``; handed on to every input."""
        self.context = context
        for source in inputs_of(self):
            if isinstance(source, Stage):
                source.set_context(context)

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self.stats.clear()  # counters describe the pass since the last reset

    def __next__(self) -> T:
        start = time.perf_counter()  # ~0.3 us an item; items are documents, blocks or batches
        try:
            item = super().__next__()
        finally:
            self.stats["seconds"] += time.perf_counter() - start  # with the time of its inputs
        self.stats["items"] += 1
        if self._counts_tokens:
            self.stats["tokens"] += self.tokens_in(item)
        return item

    def next_many(self, budget: int, size: Callable[[T], int]) -> list[T]:
        """Items as ``next()`` gives them, until their ``size`` adds up to ``budget`` or the stream ends (then
        fewer; none at its end), counted as ``__next__`` counts them but without its wrapping of each item:
        for a consumer that takes many at once (an encoder reading a call's documents)."""
        try:
            first = next(self)  # through __next__: it starts the stream if it has not started
        except StopIteration:
            return []
        start = time.perf_counter()
        try:
            more = self._more(budget - size(first), size)
        finally:
            self.stats["seconds"] += time.perf_counter() - start
        self.stats["items"] += len(more)
        if self._counts_tokens:
            self.stats["tokens"] += sum(map(self.tokens_in, more))
        return [first, *more]

    def _more(self, budget: int, size: Callable[[T], int]) -> list[T]:
        """``next_many``'s next items after its first, until their ``size`` adds up to ``budget`` (none when it
        is not positive) or the stream ends; a stage that can give many items for less than a ``next`` each
        overrides it."""
        items: list[T] = []
        try:
            while budget > 0:
                items.append(self.next())
                budget -= size(items[-1])
        except StopIteration:
            pass
        return items

    def read_rows(self, budget: int) -> Any | None:
        """The next documents, about ``budget`` bytes of text, as Arrow text arrays (``stages.text_rows.TextRows``)
        for an encoder that takes them so (no dict a document), counted as ``next_many`` counts its items; or None
        (nothing read): a stage that cannot give them so, or not at this point, and the encoder then reads with
        ``next_many``. A stage that can (``read_arrow``) overrides the hook ``_read_rows``."""
        start = time.perf_counter()
        try:
            rows = self._read_rows(budget)
        finally:
            self.stats["seconds"] += time.perf_counter() - start
        if rows:
            self.stats["items"] += len(rows)
        return rows

    def _read_rows(self, budget: int) -> Any | None:
        """``read_rows``'s documents, or None."""
        return None

    def tokens_in(self, item: T) -> int:
        """Tokens in ``item``, an item this stage gives, added to ``stats["tokens"]`` (declared by the stages
        whose items hold tokens and that do not count them as they make them)."""
        return 0

    def wait_seconds(self) -> float:
        """Seconds this stage waited on its inputs: the time they spent inside its ``next`` calls."""
        return sum((node.stats["seconds"] for node in inputs_of(self) if isinstance(node, Stage)), 0.0)

    def metrics(self) -> dict[str, float]:
        """Numbers of this stage's own for ``Pipeline.metrics``, under keys ``<stage>/<key>``."""
        return {}

    def source_states(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """The states of this stage's inputs kept in its own ``state``: where a restore restarts them."""
        return [state["source"]]

    def consumed(self, state: dict[str, Any]) -> int:
        """Items (rows) of its one input past ``source_states(state)`` already used (see ``Batch``)."""
        return 0

    def scattered(self, state: dict[str, Any]) -> tuple[int, str] | None:
        """None when the rows ``consumed`` counts are the input's next ones; else they were taken scattered
        over more of it (a shuffled group partly batched): ``(most, why)``, they are its next rows only if at
        most ``most`` rows follow them, rows this stage would drop (``drop_last``); ``why`` for a refusal."""
        return None

    def error(self, message: str, source: str | None = None, record: Any = None) -> StageError:
        """A ``StageError`` whose message starts with this stage, the file and the record."""
        where = f"stage '{self.name}'" + (f", file {source}" if source else "")
        where += f", {record}" if record is not None else ""
        return StageError(f"{where}: {message}", self.name, source, record)

    def settings(self) -> str:
        """The parameters this stage was built with that differ from their defaults, as ``k=v, ...``."""
        defaults = {name: f.default for name, f in fields(type(self)).items()} if self.params is not None else {}
        return ", ".join(f"{k}={v!r}" for k, v in (self.params or {}).items() if defaults.get(k, object()) != v)

    def __repr__(self) -> str:
        params = self.settings()
        flow = f"; {' or '.join(item_kinds(self.consumes)) or 'files'} -> {self.produces}" if self.produces else ""
        return f"<{type(self).__name__} '{self.name}' {params}{flow}>"


class PassThrough(Stage[T]):
    """A stage that gives at most one item per item in: its state is its source's state."""

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state["source"] if initial_state is not None else None)

    def get_state(self) -> dict[str, Any]:
        return {"source": self.source.state_dict()}


def inputs_of(node: BaseNode) -> list[BaseNode]:
    """The stages ``node`` reads from: its ``source``, or its ``sources`` (fan-in)."""
    if getattr(node, "source", None) is not None:
        return [node.source]
    return list(getattr(node, "sources", None) or [])


def upstream_nodes(node: BaseNode) -> list[BaseNode]:
    """``node`` and every stage it reads from, depth first (a node reached twice appears twice)."""
    out = [node]
    for source in inputs_of(node):
        out += upstream_nodes(source)
    return out
