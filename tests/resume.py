"""The shared save/restore check, after torchdata's ``test/nodes/utils.py::run_test_save_load_state``.

``check_resume(make_node)`` iterates a fresh ``Loader`` over ``make_node()`` for three epochs (the
reference), then for several stop points ``k`` in the first and the second epoch: takes ``k`` items,
saves ``loader.state_dict()``, sends it through JSON (the state must be JSON-serializable), builds a
*new* node and loader, restores, and checks that exactly the reference's remaining items come out,
then that the following epoch is the reference's next epoch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torchdata.nodes import BaseNode, Loader


def assert_same(ours: Any, expected: Any, where: str = "item") -> None:
    """Exact equality of nested dicts / lists of arrays, tensors and plain values (dtypes included)."""
    if isinstance(expected, Mapping):
        assert isinstance(ours, Mapping), f"{where}: {type(ours).__name__} is not a mapping"
        assert set(ours) == set(expected), f"{where}: keys {sorted(ours)} != {sorted(expected)}"
        for key in expected:
            assert_same(ours[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{where}: {type(ours).__name__} is not a tensor"
        assert (ours.dtype, ours.shape) == (expected.dtype, expected.shape), f"{where}: {ours.dtype} {list(ours.shape)}"
        assert torch.equal(ours.cpu(), expected.cpu()), f"{where}: values differ"
    elif isinstance(expected, np.ndarray):
        assert isinstance(ours, np.ndarray), f"{where}: {type(ours).__name__} is not an array"
        assert (ours.dtype, ours.shape) == (expected.dtype, expected.shape), f"{where}: {ours.dtype} {ours.shape}"
        assert np.array_equal(ours, expected), f"{where}: values differ"
    elif isinstance(expected, (list, tuple)):
        assert len(ours) == len(expected), f"{where}: {len(ours)} items, expected {len(expected)}"
        for i, (a, b) in enumerate(zip(ours, expected)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert ours == expected, f"{where}: {ours!r} != {expected!r}"


def _copy(item: Any) -> Any:
    """A snapshot of an item (arrays may be views of buffers a stage reuses)."""
    if isinstance(item, Mapping):
        return {k: _copy(v) for k, v in item.items()}
    if isinstance(item, np.ndarray):
        return item.copy()
    if isinstance(item, torch.Tensor):
        return item.detach().clone()
    return item


def _take(iterator, k: int, project) -> list:
    return [project(_copy(next(iterator))) for _ in range(k)]


def check_resume(
    make_node: Callable[[], BaseNode],
    stop_after: Iterable[int] | None = None,
    project: Callable[[Any], Any] = lambda item: item,
) -> list:
    """Check save/restore of ``make_node()`` mid-epoch, at the epoch's end and in the next epoch.

    Args:
        make_node: builds a fresh node (a new object each call: nothing is shared with the reference).
        stop_after: the numbers of items to take before saving (default: 0, 1, the middle, the last, all).
        project: what of each item to compare (e.g. drop embeddings, which are not data).

    Returns the reference's first epoch.
    """
    reference = Loader(make_node())
    epochs = [[project(_copy(x)) for x in reference] for _ in range(3)]
    n = len(epochs[0])
    assert n > 0, "the node yields nothing: nothing to check"
    ks = sorted({0, 1, n // 2, n - 1, n} if stop_after is None else set(stop_after))
    for epoch in (0, 1):
        for k in ks:
            where = f"epoch {epoch}, stopped after {k} of {n}"
            loader = Loader(make_node())
            for _ in range(epoch):
                list(loader)
            iterator = iter(loader)
            assert_same(_take(iterator, k, project), epochs[epoch][:k], f"{where}: before saving")
            state = json.loads(json.dumps(loader.state_dict()))  # raises unless the state is JSON-serializable

            resumed = Loader(make_node())
            resumed.load_state_dict(state)
            rest = [project(_copy(x)) for x in resumed]
            # torchdata's Loader: a state saved at the end of an epoch restarts into the next epoch.
            expected = epochs[epoch][k:] if k < n else epochs[epoch + 1]
            assert_same(rest, expected, f"{where}: after restoring")
            if k < n:
                assert_same([project(_copy(x)) for x in resumed], epochs[epoch + 1], f"{where}: the epoch after")

            stopped = Loader(make_node(), restart_on_stop_iteration=False)
            stopped.load_state_dict(state)
            assert_same([project(_copy(x)) for x in stopped], epochs[epoch][k:], f"{where}: restored, no restart")
    return epochs[0]
