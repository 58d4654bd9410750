"""Resharding: continue an epoch on another topology (ranks x workers) from every old rank's state.

Readers share units out by striding (``pipeline.shard``), so a reader's state ``{epoch, index,
position}`` under global worker ``g`` of ``G`` says which of its units are done (``index`` of them),
which one it is in (at ``position``) and which remain. The states of all old global workers, read
off where each old rank's state would restart its readers (the deepest state, below every stage's
buffer), are a seam: ``{epoch, workers: G, groups: [{among: [first, count], at: {g: frontier}}],
previous}``. Each new global worker of a group deals itself, from the same seam, its share of the
units in progress (continued from their positions) and of the units never started, so every unit is
read once; the seam is O(G) numbers, never a list of documents. ``previous`` keeps an earlier seam
of the same epoch, which the old workers' unit lists came from.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from pipeline.shard import Reader
from pipeline.stage import RunContext, inputs_of
from pipeline.workers import Workers


def reader_states(root, states: list[tuple[int, dict]], wrapped, old_world: int) -> dict[int, dict]:
    """Per reader (by ``id``): ``{g: (epoch, state or None, ended, head)}`` over the old global workers of
    ``states``.

    ``states`` are the old ranks' ``(rank, root state)``; ``root`` the output stage; ``wrapped`` the
    stage that ran in worker processes under the old topology (None: no workers). A stage's state
    restarts its input at the item it was in (``source_states``); the rows of it already used
    (``consumed``, e.g. windows in batches) are replayed here, as the old worker that made them, so
    the readers' states below are where the data used stops, not where the replay would start. A
    worker whose windows had all been used has ``ended``: what its window stage still held was its tail.
    A piece whose first tokens windows had used (``SlidingWindow.continued``) goes on after them: ``head`` is its
    reader's frontier at that piece (``ShardedSource.frontier_of``), else None.
    """
    found: dict[int, dict] = {}

    def walk(node, state, place: RunContext, epoch: int | None, inside: bool, ended: bool = False, piece=None) -> None:
        if node is wrapped and not inside:
            epoch, per_worker = Workers.worker_states(state)
            for w, sub in enumerate(per_worker):
                walk(node, sub, replace(place, worker=w, num_workers=len(per_worker)), epoch, True)
            return
        if isinstance(node, Reader):
            g = place.rank * place.num_workers + place.worker
            head = None
            if piece is not None:
                with _as(node, place, state, epoch):
                    head = node.frontier_of(*piece)
            found.setdefault(id(node), {})[g] = (epoch if state is None else state["epoch"], state, ended, head)
            return
        if state is not None and not ended and hasattr(node, "skip"):  # a stage that cuts windows
            ended = _rows_left(node, state, place, epoch, 1) == 0
            if not ended:
                with _as(node, place, state, epoch):
                    piece = node.continued(state)
        children = stage_inputs(node)
        subs = node.source_states(state) if state is not None else [None] * len(children)
        used = node.consumed(state) if state is not None else 0
        scattered = state is not None and node.scattered(state) is not None
        if used and children[0] is wrapped and not inside:
            epoch, per_worker = Workers.worker_states(subs[0])
            per_worker = _replay_workers(wrapped, per_worker, epoch, Workers.last_worker(subs[0]), used, place)
            places = [replace(place, worker=w, num_workers=len(per_worker)) for w in range(len(per_worker))]
            if scattered:
                per_worker = _past_scattered(node, state, place, epoch, wrapped, per_worker, places)
            for sub, worker in zip(per_worker, places):
                walk(wrapped, sub, worker, epoch, True)
            return
        if used:
            subs = [_replayed(children[0], subs[0], place, epoch, used)]
            if scattered:
                subs = _past_scattered(node, state, place, epoch, children[0], subs, [place])
        for child, sub in zip(children, subs):  # a piece drawn by a mix came from the input it names
            mine = piece is not None and (len(children) == 1 or getattr(child, "name", None) == piece[0].get("mix"))
            walk(child, sub, place, epoch, inside, ended, piece if mine else None)

    for rank, state in states:
        walk(root, state, RunContext(rank=rank, world_size=old_world), None, False)
    return found


def _past_scattered(node, state: dict, place: RunContext, epoch: int, child, subs: list, places: list) -> list:
    """``child``'s states ``subs`` (one per old worker ``places``) past the rows ``node`` used scattered over
    more of them: only rows it would have dropped may follow, and they count as used; refused otherwise (another
    topology could not tell the rows used from the others, and would read them again)."""
    most, why = node.scattered(state)
    left = [_rows_left(child, sub, where, epoch, most + 1) for sub, where in zip(subs, places)]
    if sum(left) > most:
        raise ValueError(
            f"reshard=True: stage '{node.name}' of rank {place.rank}: {why}; the rows used are scattered over more "
            "of its input, which another topology would read again"
        )
    return [_replayed(child, sub, where, epoch, n) if n else sub for sub, where, n in zip(subs, places, left)]


@contextmanager
def _as(node, place: RunContext, state: dict | None, epoch: int | None) -> Iterator[None]:
    """``node`` (and its inputs) restored to ``state`` as the old worker ``place`` (None: the start
    of ``epoch``), for a replay; its own context comes back after."""
    before = node.context
    node.set_context(replace(place, epoch=epoch if state is None else None))
    node.reset(state)
    try:
        yield
    finally:
        node.set_context(before)


def _rows_left(node, state: dict | None, place: RunContext, epoch: int | None, most: int) -> int:
    """How many rows ``node``, restored to ``state``, has left to give, counted up to ``most``."""
    with _as(node, place, state, epoch):
        for n in range(most):
            try:
                node.skip(1)
            except ValueError:
                return n
    return most


def _replayed(node, state: dict | None, place: RunContext, epoch: int | None, rows: int) -> dict:
    """``node``'s state after passing ``rows`` rows from ``state``."""
    with _as(node, place, state, epoch):
        node.skip(rows)
        return node.state_dict()


def _replay_workers(node, states: list, epoch: int, last: int, rows: int, place: RunContext) -> list:
    """The workers' states after ``rows`` more rows from them, taken in turn after worker ``last``
    (the order torchdata's loader gives their items in; a worker's end takes a turn)."""
    states, ended, w = list(states), [False] * len(states), last
    while rows:
        if all(ended):
            raise ValueError(f"reshard: the saved position is {rows} rows past the end of every worker's stream")
        w = (w + 1) % len(states)
        if ended[w]:
            continue
        worker = replace(place, worker=w, num_workers=len(states))
        with _as(node, worker, states[w], epoch):
            try:
                block = len(next(node))
            except StopIteration:
                ended[w] = True
                continue
            after = node.state_dict()
        states[w] = after if block <= rows else _replayed(node, states[w], worker, epoch, rows)
        rows -= min(block, rows)
    return states


def stage_inputs(node) -> list:
    """The stages ``node`` reads from, looking through a ``Workers`` node to the stage it runs."""
    return [n.source if isinstance(n, Workers) else n for n in inputs_of(node)]


def make_seam(
    reader: Reader,
    old: dict[int, tuple[int, dict | None, bool]],
    saved: list[dict],
    epoch: int,
    workers: int,
    among: list[int],
) -> dict:
    """The seam ``reader`` reads ``epoch`` from: each old global worker's frontier in that epoch (``old``:
    g -> (its epoch, its state, whether it had ended, its frontier at a piece it was in, or None); a worker
    in a later epoch had finished this one).
    ``saved``: the seams the old pipelines kept for this reader (those of an earlier reshard)."""
    groups: list = []
    kept = [s.get("seams", {}) for _, s, _, _ in old.values() if s is not None] + saved
    previous = [seams[str(epoch)] for seams in kept if str(epoch) in seams]
    for group in (g for seam in previous for g in seam["groups"]):  # rank-local seams of one epoch: merged
        if group not in groups:
            groups.append(group)
    at = {
        str(g): head
        if head is not None and e == epoch
        else reader.frontier(state if e == epoch else None, finished=e > epoch or (e == epoch and ended))
        for g, (e, state, ended, head) in sorted(old.items())
    }
    return {
        "epoch": epoch,
        "workers": workers,
        "groups": [{"among": among, "at": at}],
        "previous": {**previous[0], "groups": groups} if previous else None,
    }
