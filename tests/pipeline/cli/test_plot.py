"""The pictures and the metrics file: ``run --metrics`` lines, ``bench --plot``, ``python -m pipeline plot``,
and what happens without matplotlib; called in this process."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise

import pytest

from pipeline.cli import main
from tests.conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--set", "batch.batch_size=2", "--set", "window.max_length=16", "--set", "window.stride=16",
         "--set", "embed.context_length=16", "--set", "embed.d_model=8"]


@pytest.fixture
def metrics_file(tmp_path, in_root, capsys):
    path = tmp_path / "metrics.jsonl"
    assert main(["run", "examples/verdict.yaml", *SMALL, "--max-batches", "5", "--metrics", str(path),
                 "--metrics-every", "2", "--no-progress"]) == 0
    capsys.readouterr()
    return path


def test_run_writes_metrics_lines_every_n_batches_and_at_the_end(metrics_file):
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [line["batches"] for line in lines] == [2, 4, 5]
    assert [line["embed/items"] for line in lines] == [2, 4, 5]  # the counters at the time of the line
    assert all(a["time_s"] < b["time_s"] for a, b in pairwise(lines))
    for line in lines:
        for stage in ("read", "encode", "window", "batch", "embed"):
            assert {f"{stage}/items", f"{stage}/tokens", f"{stage}/busy_s", f"{stage}/wait_s"} <= set(line)
        assert 0 <= line["data_wait_share"] <= 1 and line["data_wait_s"] >= 0
    assert lines[-1]["batch/tokens"] == 5 * 2 * 16


@pytest.mark.parametrize("every", ["0", "abc", "-3s"])
def test_metrics_every_must_be_batches_or_seconds(every, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["run", "examples/verdict.yaml", "--metrics", str(tmp_path / "m.jsonl"), f"--metrics-every={every}"])
    assert exit.value.code == 2 and "number of batches (100) or of seconds (30s)" in capsys.readouterr().err


def test_plot_draws_a_metrics_file(metrics_file, tmp_path, capsys):
    out = tmp_path / "run.png"
    assert main(["plot", str(metrics_file), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 10_000


def test_plot_refuses_what_it_cannot_draw(tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text('{"time_s": 1, "data_wait_share": 0}\n')
    assert main(["plot", str(one), "--out", str(tmp_path / "x.png")]) == 2
    assert "needs two or more" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"time_s": 1, "data_wait_share": 0}\nnot json\n')
    assert main(["plot", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "line 2: not a JSON line" in capsys.readouterr().err


def test_bench_plot(tmp_path, in_root, capsys):
    out = tmp_path / "bench.png"
    assert main(["bench", "examples/verdict.yaml", *SMALL, "--max-batches", "4", "--plot", str(out)]) == 0
    assert out.read_bytes().startswith(PNG)
    assert f"wrote {out}" in capsys.readouterr().out


def test_without_matplotlib_the_pictures_say_how_to_get_it(tmp_path, in_root, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    for argv in (["bench", "examples/verdict.yaml", "--plot", str(tmp_path / "b.png")],
                 ["plot", "x.jsonl", "--out", str(tmp_path / "p.png")]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert "pip install 'textpipe[plot]'" in captured.err and "whole:" not in captured.out  # before any work


def test_the_core_never_imports_matplotlib():
    code = ("import sys; import pipeline.cli, pipeline.cli.bench, pipeline.cli.plot, stages; "
            "from pipeline import Pipeline; p = Pipeline.from_config('examples/verdict.yaml'); "
            "next(iter(p)); p.metrics(); "
            "assert 'matplotlib' not in sys.modules, 'imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
