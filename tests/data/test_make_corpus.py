"""Tests for data/make_corpus.py (loaded by path: data/ is not a package)."""

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT


_spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "data" / "make_corpus.py")
mc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mc)


@pytest.fixture
def sources(tmp_path: Path) -> list[Path]:
    """Two small sources with recognisable paragraphs (and non-ASCII text, to check byte counting)."""
    a = tmp_path / "src" / "alpha.txt"
    b = tmp_path / "src" / "beta.txt"
    a.parent.mkdir()
    a.write_text("\n\n".join(f"alpha {i}: a café paragraph,\nwith two lines. {'x' * (i % 40)}" for i in range(60)),
                 encoding="utf-8")
    # Whitespace-only separator lines and CRLF must also split paragraphs.
    b.write_bytes("\r\n \t\r\n".join(f"beta {i}: naïve “quoted” text {'y' * i}" for i in range(40)).encode("utf-8"))
    return [a, b]


def read_arrow(out: Path) -> list[pa.Table]:
    return [ipc.open_file(p).read_all() for p in sorted(out.glob("part-*.arrow"))]


def all_rows(out: Path) -> tuple[list[str], list[str], list[str]]:
    t = pa.concat_tables(read_arrow(out))
    return t["id"].to_pylist(), t["text"].to_pylist(), t["source"].to_pylist()


def file_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*"))}


@pytest.mark.parametrize(
    "text, expected",
    [("4096", 4096), ("0", 0), ("10MB", 10_000_000), ("1.5GB", 1_500_000_000), ("2 mb", 2_000_000),
     ("3KB", 3000), ("64KiB", 65536), ("1MiB", 1 << 20), ("1GiB", 1 << 30), ("12B", 12), (".5KB", 500)],
)
def test_parse_size(text, expected):
    assert mc.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "abc", "10XB", "-5", "1e3", "1.2.3MB", "10 M B"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        mc.parse_size(text)


def test_load_paragraphs_splits_on_blank_lines(sources):
    paragraphs, sizes, source_of, names = mc.load_paragraphs(sources)
    assert len(paragraphs) == 100
    assert names == ["alpha.txt", "beta.txt"]
    assert paragraphs[0].startswith("alpha 0:") and paragraphs[60].startswith("beta 0:")
    assert all(p == p.strip() and "\r" not in p for p in paragraphs)
    assert sizes.tolist() == [len(p.encode("utf-8")) for p in paragraphs]
    assert source_of.tolist() == [0] * 60 + [1] * 40


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "text"])
def test_same_seed_same_bytes_other_seed_differs(tmp_path, sources, fmt):
    kw = dict(size=300_000, fmt=fmt, docs_per_batch=64, file_size=100_000)
    mc.make_corpus(sources, out=tmp_path / "a", seed=7, **kw)
    mc.make_corpus(sources, out=tmp_path / "b", seed=7, **kw)
    mc.make_corpus(sources, out=tmp_path / "c", seed=8, **kw)
    a, b, c = (file_bytes(tmp_path / d) for d in "abc")
    assert len(a) > 1
    assert a == b
    assert a != c


def test_layout_options_do_not_change_documents(tmp_path, sources):
    mc.make_corpus(sources, 200_000, tmp_path / "a", docs_per_batch=1024, file_size=10**9)
    mc.make_corpus(sources, 200_000, tmp_path / "b", docs_per_batch=7, file_size=30_000)
    assert all_rows(tmp_path / "a") == all_rows(tmp_path / "b")


@pytest.mark.parametrize("size", [1, 5_000, 123_457])
def test_size_reached_but_not_exceeded_by_more_than_one_document(tmp_path, sources, size):
    r = mc.make_corpus(sources, size, tmp_path / "out", docs_per_batch=16)
    _, texts, _ = all_rows(tmp_path / "out")
    lengths = [len(t.encode("utf-8")) for t in texts]
    assert r["documents"] == len(texts)
    assert r["bytes"] == sum(lengths)
    assert sum(lengths) >= size
    assert sum(lengths) - lengths[-1] < size


def test_ids_text_and_source(tmp_path, sources):
    mc.make_corpus(sources, 100_000, tmp_path / "out", seed=3)
    ids, texts, srcs = all_rows(tmp_path / "out")
    paragraphs = set(mc.load_paragraphs(sources)[0])
    assert ids == [f"doc-{n:09d}" for n in range(len(ids))]  # unique and in order
    counts = set()
    for doc_id, text, src in zip(ids, texts, srcs):
        head, body = text.split("\n", 1)
        assert head == doc_id
        parts = body.split("\n\n")
        assert set(parts) <= paragraphs
        counts.add(len(parts))
        assert src == ("alpha.txt" if parts[0].startswith("alpha") else "beta.txt")
    assert min(counts) == 1 and max(counts) == 16
    assert set(srcs) == {"alpha.txt", "beta.txt"}


def test_arrow_record_batches_and_files(tmp_path, sources):
    r = mc.make_corpus(sources, 250_000, tmp_path / "out", docs_per_batch=50, file_size=60_000)
    paths = sorted((tmp_path / "out").glob("part-*"))
    assert [p.name for p in paths] == [f"part-{i:05d}.arrow" for i in range(len(paths))]
    assert len(paths) == len(r["files"]) >= 4
    total_docs = 0
    for p in paths:
        reader = ipc.open_file(p)
        assert reader.schema == pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])
        rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
        # Full batches, except the last of each file (cut short by --file-size or the end of the corpus).
        assert all(n == 50 for n in rows[:-1]) and 0 < rows[-1] <= 50
        texts = reader.read_all()["text"].to_pylist()
        assert sum(len(t.encode("utf-8")) for t in texts) <= 60_000
        total_docs += sum(rows)
    assert total_docs == r["documents"]


def test_parquet_row_groups_match_arrow(tmp_path, sources):
    mc.make_corpus(sources, 150_000, tmp_path / "pq", fmt="parquet", docs_per_batch=40)
    mc.make_corpus(sources, 150_000, tmp_path / "arrow", docs_per_batch=40)
    (path,) = (tmp_path / "pq").glob("*")
    assert path.name == "part-00000.parquet"
    f = pq.ParquetFile(path)
    assert f.schema_arrow == mc.SCHEMA
    groups = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
    assert len(groups) > 3 and all(n == 40 for n in groups[:-1]) and 0 < groups[-1] <= 40
    assert f.read().equals(pa.concat_tables(read_arrow(tmp_path / "arrow")))


def test_text_format(tmp_path, sources):
    mc.make_corpus(sources, 200_000, tmp_path / "txt", fmt="text", docs_per_batch=9, file_size=50_000)
    mc.make_corpus(sources, 200_000, tmp_path / "arrow", docs_per_batch=9, file_size=50_000)
    paths = sorted((tmp_path / "txt").glob("*"))
    assert [p.name for p in paths] == [f"part-{i:05d}.txt" for i in range(len(paths))]
    assert len(paths) > 1 and all(p.stat().st_size <= 50_000 for p in paths)
    contents = [p.read_text(encoding="utf-8") for p in paths]
    assert all(c.endswith("\n") and not c.endswith("\n\n") for c in contents)
    _, texts, _ = all_rows(tmp_path / "arrow")
    # Each file is its documents separated by one blank line; together, the same documents as arrow.
    assert "".join(c + "\n" for c in contents) == "".join(t + "\n\n" for t in texts)
    assert contents[0].startswith("doc-000000000\n")


def test_refuses_to_overwrite(tmp_path, sources):
    out = tmp_path / "out"
    mc.make_corpus(sources, 100_000, out, file_size=20_000)
    before = file_bytes(out)
    assert len(before) > 2
    for fmt in ["arrow", "text"]:
        with pytest.raises(FileExistsError):
            mc.make_corpus(sources, 10_000, out, fmt=fmt)
    assert file_bytes(out) == before
    # --overwrite removes every old part, including ones this smaller run would not rewrite.
    mc.make_corpus(sources, 10_000, out, fmt="text", overwrite=True)
    assert sorted(file_bytes(out)) == ["part-00000.txt"]


def test_unrelated_files_in_out_are_fine(tmp_path, sources):
    out = tmp_path / "new" / "dir"
    out.mkdir(parents=True)
    (out / "notes.md").write_text("keep me")
    mc.make_corpus(sources, 10_000, out)
    assert (out / "notes.md").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "part-00000.arrow"]


def test_cli_with_shakespeare(tmp_path, shakespeare_path, capsys):
    out = tmp_path / "corpus"
    argv = ["--from", str(shakespeare_path), "--size", "2MB", "--out", str(out), "--format", "parquet",
            "--docs-per-batch", "256", "--file-size", "1MB", "--seed", "5"]
    assert mc.main(argv) == 0
    summary = capsys.readouterr().out.strip()
    assert "MB/s" in summary and "\n" not in summary
    # 2MB of documents can't fill 1MB files exactly, so 3 files; the summary must say what is on disk.
    assert summary.startswith(f"{len(list(out.glob('part-*.parquet')))} files, ") and len(list(out.iterdir())) == 3
    t = pq.read_table(out)
    assert len(set(t["id"].to_pylist())) == t.num_rows
    assert set(t["source"].to_pylist()) == {"tinyshakespeare.txt"}
    assert sum(len(s.encode("utf-8")) for s in t["text"].to_pylist()) >= 2_000_000
    assert mc.main(argv) == 1  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert mc.main(argv + ["--overwrite"]) == 0


def test_invalid_arguments(tmp_path, sources):
    with pytest.raises(ValueError):
        mc.make_corpus(sources, 0, tmp_path / "a")
    with pytest.raises(ValueError):
        mc.make_corpus(sources, 100, tmp_path / "b", fmt="csv")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n")
    with pytest.raises(ValueError):
        mc.make_corpus([empty], 100, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing created when the sources are unusable
