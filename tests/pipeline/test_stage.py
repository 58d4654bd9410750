"""``Stage``: the counters and ``next_many``, which takes many items without wrapping each."""

from __future__ import annotations

import pytest

from pipeline.stage import Stage


class Numbers(Stage[int]):
    """0, 1, ... n - 1; a ValueError at ``fail_at``."""

    def __init__(self, n: int, fail_at: int | None = None):
        super().__init__()
        self.n, self.fail_at = n, fail_at

    def reset(self, initial_state=None):
        super().reset(initial_state)
        self.i = 0 if initial_state is None else initial_state["i"]

    def get_state(self):
        return {"i": self.i}

    def next(self) -> int:
        if self.i == self.fail_at:
            raise ValueError(f"bad item {self.i}")
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return self.i - 1

    def tokens_in(self, item: int) -> int:
        return item


@pytest.mark.parametrize("budget", [1, 5, 6, 100])
def test_next_many_gives_what_next_gives_until_the_budget_and_counts_alike(budget):
    many, one = Numbers(12), Numbers(12)
    calls = []
    while chunk := many.next_many(budget, size=lambda i: 2):
        calls.append(chunk)
    assert [i for chunk in calls for i in chunk] == list(one) == list(range(12))
    assert all(len(chunk) == max(1, -(-budget // 2)) for chunk in calls[:-1])  # sizes reach the budget, no more
    assert many.next_many(budget, size=lambda i: 2) == []  # at the end, and again
    assert {k: many.stats[k] for k in ("items", "tokens")} == {k: one.stats[k] for k in ("items", "tokens")}
    assert many.stats["items"] == 12 and many.stats["tokens"] == sum(range(12))


def test_next_many_starts_the_stream_and_its_state_follows():
    node = Numbers(10)
    assert node.next_many(3, size=lambda i: 1) == [0, 1, 2]  # never reset: the first item starts it
    state = node.state_dict()
    again = Numbers(10)
    again.reset(state)
    assert list(again) == list(range(3, 10))


def test_next_many_raises_the_error_of_an_item():
    node = Numbers(10, fail_at=4)
    assert node.next_many(2, size=lambda i: 1) == [0, 1]
    with pytest.raises(ValueError, match="bad item 4"):
        node.next_many(5, size=lambda i: 1)
