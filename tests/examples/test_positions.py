"""``examples/positions.py``, run as a user runs it: from the project root, as ``__main__``."""

from __future__ import annotations

import subprocess

from tests.command_line import script


def positions(*args: str) -> subprocess.CompletedProcess:
    return script("examples/positions.py", *args)


def test_positions_on_the_verdict(verdict_path):
    done = positions()
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "[FAILED]" not in out and out.rstrip().endswith("All facts hold.")
    for fact in (
        "[ok] 'I' is the single token id 40",
        "[ok] id 40 occurs 29 times in the stream",
        "[ok] its first places are 0, 379, 736, 882, 895",
    ):
        assert fact in out
    for title in ("Learned positions", "Sinusoidal positions", "No positions"):
        assert title in out
    assert out.count("[ok] the token embedding of id 40 is the same vector at all 29 places") == 3
    first_five = "[ok] x(0), x(379), x(736), x(882), x(895) (window 0: positions = stream positions) are 5 different"
    assert out.count(first_five) == 2
    assert out.count("[ok] over all 29 places, 29 different positions in the window give 29 different x") == 2
    assert "[ok] without position embeddings the 29 input embeddings are all the same vector" in out


def test_positions_exits_1_when_a_fact_does_not_hold(tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("I said that I would. " * 3, encoding="utf-8")
    done = positions("--path", str(other))
    assert done.returncode == 1
    assert "[FAILED] id 40 occurs 29 times in the stream" in done.stdout
    assert "fact(s) do NOT hold" in done.stdout


def test_positions_with_a_missing_file_exits_2(tmp_path):
    done = positions("--path", str(tmp_path / "missing.txt"))
    assert done.returncode == 2
    assert "missing.txt" in done.stderr and "Traceback" not in done.stderr
