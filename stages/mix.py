"""``mix``: interleave several document streams by weight, deterministically by seed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.registry import register
from pipeline.schema import FieldError, check_seed, one_of
from pipeline.shard import resolve_rank, worker_slot
from pipeline.stage import RunContext, Stage

STOPS = ("first", "all", "cycle")
_DRAWS = 1024  # choices drawn at a time from a generator seeded by (seed, epoch, block)


@register("mix")
class Mix(Stage[dict]):
    """Interleaves the items of several streams, each next item drawn from stream ``i`` with
    probability ``weights[i]`` (normalized).

    The choices come from generators seeded by ``(seed, epoch, worker, block)`` (``worker``: the
    global worker index over ranks and DataLoader workers, so each draws its own sequence): the order
    is a function of the seed, and the state is a position (draws made, streams' states), never data. Each item
    gains a ``mix`` field: the name of the stream it came from.

    Args:
        weights: one weight per input, in the order of ``inputs``.
        seed: seed of the draws.
        stop: ``all`` (every stream read once; exhausted ones are skipped), ``first`` (stop when the
            first stream runs out) or ``cycle`` (restart streams that run out until all have ended once).
    """

    in_workers = True
    consumes = "documents"
    produces = "documents"  # each with `mix`: the name of its stream

    def __init__(self, sources: list, weights: list[float], seed: int = 0, stop: str = "all"):
        super().__init__()
        one_of("stop", stop, STOPS)
        if len(weights) != len(sources) or not sources:
            raise FieldError("weights",
                             f"weights needs one weight per input: {len(sources)} inputs, {len(weights)} weights")
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < math.inf for w in weights) \
                or not math.isfinite(sum(weights)):
            raise FieldError("weights", f"weights must be positive finite numbers, with a finite sum, got {weights}")
        check_seed(seed)
        self.sources = list(sources)
        names = [getattr(source, "name", str(i)) for i, source in enumerate(self.sources)]
        self.stats.labels.update({f"from_{name}": f"items from {name}" for name in names})
        self.probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.seed, self.stop = seed, stop
        self._epoch = -1

    def set_context(self, context: RunContext) -> None:
        super().set_context(context)
        if context.epoch is not None:
            self._epoch = context.epoch - 1  # the next reset() starts it

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self._worker = worker_slot(*resolve_rank(self.context.rank, self.context.world_size), self.context)[0]
        if initial_state is None:
            self._epoch, self._draws, self._ended = self._epoch + 1, 0, [False] * len(self.sources)
            for source in self.sources:
                source.reset()
        else:
            self._epoch, self._draws, self._ended = (
                initial_state["epoch"],
                initial_state["draws"],
                list(initial_state["ended"]),
            )
            for source, state in zip(self.sources, initial_state["sources"]):
                source.reset(state)
        self._block = None

    def get_state(self) -> dict[str, Any]:
        sources = [source.state_dict() for source in self.sources]
        return {"epoch": self._epoch, "draws": self._draws, "ended": list(self._ended), "sources": sources}

    def next(self) -> dict:
        while not all(self._ended) and not (self.stop == "first" and any(self._ended)):
            i = self._choice()
            if self._ended[i] and self.stop == "all":
                continue
            try:
                item = next(self.sources[i])
            except StopIteration:
                self._ended[i] = True
                if self.stop != "cycle" or all(self._ended):
                    continue
                self.sources[i].reset()  # cycle: this stream starts again while others have not ended
                try:
                    item = next(self.sources[i])
                except StopIteration:
                    continue  # an empty stream
            name = self._input_name(i)
            self.stats[f"from_{name}"] += 1
            return {**item, "mix": name} if isinstance(item, dict) else item
        raise StopIteration

    def _input_name(self, i: int) -> str:
        return getattr(self.sources[i], "name", str(i))

    def metrics(self) -> dict[str, float]:
        """Per input: ``documents`` drawn, their ``share`` against the target ``weight``, and ``z``, the
        count's distance from ``n * weight`` in binomial standard deviations (within +-3 but about once in 370
        times while every input has documents left; a stream that ran out under ``stop: all`` falls behind)."""
        counts = [self.stats[f"from_{self._input_name(i)}"] for i in range(len(self.sources))]
        n, out = sum(counts), {}
        for i, (k, p) in enumerate(zip(counts, self.probabilities)):
            sd = math.sqrt(n * p * (1 - p))
            name = self._input_name(i)
            out[f"{name}/documents"], out[f"{name}/weight"] = k, float(p)
            out[f"{name}/share"], out[f"{name}/z"] = k / n if n else 0.0, (k - n * p) / sd if sd else 0.0
        return out

    def _choice(self) -> int:
        block, index = divmod(self._draws, _DRAWS)
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, self._epoch, self._worker, block])
            self._block = (block, rng.choice(len(self.sources), size=_DRAWS, p=self.probabilities))
        self._draws += 1
        return int(self._block[1][index])
