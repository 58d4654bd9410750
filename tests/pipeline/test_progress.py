"""Progress of long work: the bar and the log lines, this rank's corpus bytes, ``prepare``'s shard reports."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pipeline import Pipeline
from pipeline.progress import Progress, corpus_bytes
from stages import ReadText
from stages.tokens.prepare import prepare

def test_a_bar_with_rate_and_eta_on_a_terminal():
    shown = Progress(10_000_000, int, tty=True, stream=io.StringIO())
    assert shown.text(5_000_000, "3 batches", now=shown.start + 5) == (
        "[############............]  50% of 10.0 MB, 1.00 MB/s, ETA 0:05 | 3 batches")
    assert shown.text(0, now=shown.start + 1).endswith("ETA ?")


def test_lines_every_few_seconds_in_a_log():
    stream = io.StringIO()
    done = [0]
    shown = Progress(4_000_000, lambda: done[0], lambda: "n", tty=False, every=0, stream=stream)
    for done[0] in (1_000_000, 4_000_000):
        shown.update()
    shown.note("wrote shard x")
    shown.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" of ")[0] for line in lines[:2]] == ["progress:  25%", "progress: 100%"]
    assert lines[2] == "wrote shard x" and len(lines) == 3 and "\r" not in stream.getvalue()
    quiet = Progress(None, lambda: 0, tty=False, every=3600, stream=stream)
    quiet.update()
    assert len(stream.getvalue().splitlines()) == 3  # not due yet
    assert Progress(None, int).text(2_000_000, "n", now=Progress(None, int).start + 1).startswith("2.0 MB read")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corpus_bytes_are_this_ranks_share(tmp_path, num_workers):
    paths = []
    for f in range(3):
        path = tmp_path / f"{f}.txt"
        path.write_text(" ".join(f"word{i}" for i in range(300 + 100 * f)))
        paths.append(str(path))
    sizes = sum(Path(p).stat().st_size for p in paths)
    totals, reads = [], []
    for rank in (0, 1):
        reader = ReadText(paths, chunk_bytes=64, shard_bytes=500, rank=rank, world_size=2)
        pipe = Pipeline(reader, num_workers=num_workers)
        total, read = corpus_bytes(pipe.root, num_workers)
        list(pipe)
        totals.append(total)
        reads.append(read())
        pipe.close()
    assert sum(totals) == sizes and all(0 < t < sizes for t in totals)
    assert sum(reads) == sizes  # every byte read once, counted by the readers


def test_prepare_reports_each_shard_as_written(tmp_path, in_root, capsys):
    config = {"stages": {"read": {"type": "read_text", "paths": ["data/sample/*.txt"]},
                         "encode": {"type": "bpe_encode", "input": "read"}}}
    manifest = prepare(config, tmp_path / "cache", shard_tokens=2000, progress=True)
    err = capsys.readouterr().err
    reported = [line.split()[2].rstrip(":") for line in err.splitlines() if line.startswith("wrote shard ")]
    assert reported == [shard["file"] for shard in manifest["shards"]] and len(reported) > 1
    prepare(config, tmp_path / "quiet", shard_tokens=2000)
    assert capsys.readouterr().err == ""
