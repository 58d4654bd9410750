"""``Workers``: run a stage and everything upstream of it in DataLoader worker processes."""

from __future__ import annotations

import ctypes
import gc
import signal
import sys
import time
import warnings
from collections import Counter
from dataclasses import replace
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info
from torchdata.nodes import BaseNode
from torchdata.stateful_dataloader import StatefulDataLoader

from pipeline.schema import Positive, check_field
from pipeline.stage import RunContext, Stage, upstream_nodes


def _as_is(item: Any) -> Any:
    return item


def _die_with_parent(worker_id: int) -> None:
    """Worker init: on Linux, be killed when the main process dies (even by SIGKILL), so no worker is
    left blocked on a pipe nobody reads."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


_END = "pipeline.workers.end"  # the last item of a worker's epoch: carries its final counters


def _stats_delta(chain: list[BaseNode], sent: list[Counter]) -> list[dict[str, int]]:
    """What each stage's counters gained since the last call (updates ``sent``)."""
    delta = []
    for node, before in zip(chain, sent):
        now = node.stats if isinstance(node, Stage) else Counter()
        delta.append({k: v - before[k] for k, v in now.items() if v != before[k]})
        before.clear()
        before.update(now)
    return delta


class _NodeDataset(IterableDataset):
    """A stage graph as a stateful IterableDataset: each worker process iterates its own copy."""

    def __init__(self, root: BaseNode):
        self.root = root
        self.context = RunContext(epoch=0)  # set in the main process before each epoch's workers start
        self._pending: dict | None = None  # a state to resume from at the next __iter__
        self._started = False

    def __iter__(self):
        info = get_worker_info()  # this copy's place among the workers, handed down with the epoch
        context = replace(self.context, worker=info.id, num_workers=info.num_workers) if info else self.context
        if isinstance(self.root, Stage):
            self.root.set_context(context if self._pending is None else replace(context, epoch=None))
        self.root.reset(self._pending)
        self._pending, self._started = None, True
        chain = upstream_nodes(self.root)
        sent = [Counter() for _ in chain]
        worker = context.worker
        while True:
            try:
                item = next(self.root)
            except StopIteration:
                yield _END, _stats_delta(chain, sent), worker  # counters set at the end (tails, drops)
                return
            yield item, _stats_delta(chain, sent), worker

    def state_dict(self) -> dict | None:
        return self.root.state_dict() if self._started else self._pending

    def load_state_dict(self, state: dict | None) -> None:
        self._pending, self._started = state, False


class Workers(Stage):
    """Iterates ``source`` in ``num_workers`` processes through torchdata's ``StatefulDataLoader``.

    Each worker runs its own copy of the upstream stages; readers give each worker its own shard
    units (``pipeline.shard``). Items come back in a fixed round-robin order over the workers, so a
    run is deterministic and its state (the loader's ``state_dict``) resumes exactly. Workers start
    afresh each epoch (persistent workers took 5 s each to shut down), told the epoch to read. Pass large
    items (blocks of windows, not single windows): moving an item between processes costs ~0.2 ms.

    Args:
        num_workers: worker processes.
        prefetch_factor: items each worker prepares ahead.
    """

    type_name = "workers"

    def __init__(self, source: BaseNode, num_workers: int, prefetch_factor: int = 4):
        super().__init__()
        check_field("num_workers", Positive, num_workers)
        self.source = source
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self._epoch = -1
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata 0.11 calls a deprecated torch API
            self._dataset = _NodeDataset(source)
            self._loader = StatefulDataLoader(
                self._dataset,
                batch_size=None,
                collate_fn=_as_is,  # items cross as pickles: numpy blocks move cheaply, tensors would not
                worker_init_fn=_die_with_parent,
                num_workers=num_workers,
                prefetch_factor=prefetch_factor,
                persistent_workers=False,
                in_order=True,
            )

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        for node in upstream_nodes(self.source):
            if isinstance(node, Stage):
                node.stats.clear()
        if initial_state is None:
            self._epoch += 1
        else:
            self._epoch = initial_state["epoch"]
            self._loader.load_state_dict(initial_state["loader"])
        self._dataset.context = replace(self.context, epoch=self._epoch)
        self._closed, self._waited, self._made = False, 0.0, {}
        # Forked workers inherit the parent's uncollected garbage; an old loader iterator collected
        # there would try to shut down workers that are not its children. Collect it here first.
        gc.collect()
        self._iterator = iter(self._loader)

    def get_state(self) -> dict[str, Any]:
        return {"loader": self._loader.state_dict(), "epoch": self._epoch}

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``reset()`` start epoch ``epoch``."""
        self._epoch = epoch - 1

    @staticmethod
    def worker_states(state: dict[str, Any]) -> tuple[int, list[dict[str, Any] | None]]:
        """``(epoch, [each worker's state of the stages it runs, None if it had not started])`` in ``state``."""
        workers = state["loader"]["_snapshot"]["_worker_snapshots"]
        return state["epoch"], [workers[f"worker_{w}"]["dataset_state"] for w in range(len(workers))]

    @staticmethod
    def last_worker(state: dict[str, Any]) -> int:
        """The worker whose item came last before ``state`` was saved (the next is the one after it)."""
        return state["loader"]["_snapshot"]["_last_yielded_worker_id"]

    def close(self) -> None:
        """Stop this epoch's worker processes now.

        Left to the garbage collector, a loader caught in a reference cycle (torchdata's Loader and
        its iterator form one) has its queues finalized before its iterator, so the workers never
        hear the stop signal and each is killed after a 5 s timeout. Called by ``Pipeline.close``.
        """
        iterator = getattr(self, "_iterator", None)
        # torch 2.13 / torchdata 0.11: no public call stops a DataLoader iterator's workers (nodes have no shutdown())
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._closed = True

    def next(self) -> Any:
        if getattr(self, "_closed", False):  # the workers were stopped: ending quietly would lose data
            raise RuntimeError(f"stage '{self.name}': the pipeline was closed; iterate it again to start a new pass")
        chain = upstream_nodes(self.source)
        while True:
            start = time.perf_counter()
            try:
                item, delta, worker = next(self._iterator)
            except StopIteration:
                raise
            except Exception:
                self.close()  # a worker failed: stop the others now, not when a traceback lets go of them
                raise
            finally:
                self._waited += time.perf_counter() - start
            for node, gained in zip(chain, delta):  # the workers' counters, summed on the main copies
                if isinstance(node, Stage):
                    node.stats.update(gained)
            made = self._made.setdefault(worker, Counter())  # and per worker: items, and the time making them
            made["busy_s"] += delta[0].get("seconds", 0.0)
            if not (isinstance(item, str) and item == _END):
                made["items"] += 1
                return item

    def wait_seconds(self) -> float:
        """Seconds blocked on the workers' results (the stages upstream run in other processes)."""
        return getattr(self, "_waited", 0.0)

    def metrics(self) -> dict[str, float]:
        """``queued``: items the workers have made that wait to be taken; ``queue_fill``: that over the
        ``num_workers * prefetch_factor`` items they may prepare ahead (near 1: the workers are ahead);
        ``<worker>/items`` and ``<worker>/busy_s``: what each worker process gave, and its time making it."""
        queued = _queued(getattr(self, "_iterator", None))
        out = {"queued": queued, "queue_fill": queued / (self.num_workers * self.prefetch_factor)}
        for worker, made in sorted(getattr(self, "_made", {}).items()):
            out.update({f"{worker}/items": int(made["items"]), f"{worker}/busy_s": made["busy_s"]})
        return out


def _queued(iterator: Any) -> int:
    """Results received or in the result queue, not yet taken. torch's multiprocessing iterator has no
    public view of its queues, so this reads its documented-in-code fields, and counts 0 without them."""
    queue, tasks = getattr(iterator, "_data_queue", None), getattr(iterator, "_task_info", None)
    if queue is None or tasks is None:
        return 0
    try:
        waiting = queue.qsize()
    except NotImplementedError:  # macOS multiprocessing queues
        waiting = 0
    # a task is (worker,) while sent, (worker, data) once it arrived ahead of its turn
    return waiting + sum(len(info) == 2 for info in list(tasks.values()))
