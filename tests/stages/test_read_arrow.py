"""read_arrow: formats, metadata columns, and bad input named by file, shard and row."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from pipeline import ConfigError, Pipeline, StageError
from pipeline.cli import main
from stages import ReadArrow
from stages.encoding import load_encoding
from tests.corpora import write_arrow_corpus
from tests.stages.tokens.test_prepare import shard_rows


@pytest.mark.parametrize("fmt", ["file", "stream", "parquet"])
def test_formats_read_every_document_in_order(tmp_path, fmt):
    ids = write_arrow_corpus(tmp_path / "c", fmt=fmt)
    docs = list(ReadArrow(str(tmp_path / "c")))
    assert [d["id"] for d in docs] == ids
    first = docs[0]
    assert first["text"].startswith(first["id"])
    assert first["source"].endswith("part-0." + ("parquet" if fmt == "parquet" else "arrow"))
    assert (first["shard"], first["record"], first["n"]) == (0, 0, 0)
    assert {d["shard"] for d in docs if d["source"] == first["source"]} == {0, 1, 2}


def test_units_are_record_batches(tmp_path):
    write_arrow_corpus(tmp_path / "c", batches_per_file=(3, 1, 5, 2))
    assert len(ReadArrow(str(tmp_path / "c")).units) == 11


def test_text_column_and_carried_columns(tmp_path):
    path = tmp_path / "t.arrow"
    _write(path, {"body": ["one two", "three"], "lang": ["en", "fr"], "n": [1, 2]})
    docs = list(ReadArrow(str(path), column="body", columns=["lang"]))
    assert docs == [
        {"lang": "en", "text": "one two", "source": str(path), "shard": 0, "record": 0},
        {"lang": "fr", "text": "three", "source": str(path), "shard": 0, "record": 1},
    ]


def _write(path, columns: dict, fmt=ipc.new_file):
    batch = pa.record_batch(columns)
    with fmt(path, batch.schema) as writer:
        writer.write_batch(batch)


def test_missing_text_column_names_file_and_columns(tmp_path):
    path = tmp_path / "t.arrow"
    _write(path, {"body": ["x"]})
    with pytest.raises(ValueError, match=r"t\.arrow: no column `text` \(columns: body\)"):
        ReadArrow(str(path))


def test_non_string_column(tmp_path):
    path = tmp_path / "t.arrow"
    _write(path, {"text": [1, 2]})
    with pytest.raises(ValueError, match=r"t\.arrow: column `text` is int64, not a string column"):
        ReadArrow(str(path))


def test_null_text_raises_naming_file_shard_and_row_or_is_skipped_and_counted(tmp_path):
    path = tmp_path / "t.arrow"
    _write(path, {"text": ["a", None, "c", None]})
    with pytest.raises(StageError, match=r"stage 'read_arrow', file .*t\.arrow, shard 0, row 1: null in text column"):
        list(ReadArrow(str(path)))
    node = ReadArrow(str(path), on_null="skip")
    assert [d["text"] for d in node] == ["a", "c"]
    assert node.stats["null documents skipped"] == 2


def test_empty_file(tmp_path):
    (tmp_path / "e.arrow").write_bytes(b"")
    with pytest.raises(ValueError, match=r"e\.arrow: empty file \(0 bytes\)"):
        ReadArrow(str(tmp_path / "e.arrow"))


def test_truncated_file_is_named(tmp_path):
    write_arrow_corpus(tmp_path / "c", batches_per_file=(3,))
    path = tmp_path / "c" / "part-0.arrow"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"part-0\.arrow: not a readable Arrow IPC or Parquet file"):
        ReadArrow(str(path))


def test_corrupt_record_batch_is_named_with_its_shard(tmp_path):
    write_arrow_corpus(tmp_path / "c", batches_per_file=(3,), rows_per_batch=(50,))
    path = tmp_path / "c" / "part-0.arrow"
    reader = ipc.open_file(pa.memory_map(str(path)))
    assert reader.num_record_batches == 3
    data = bytearray(path.read_bytes())
    # overwrite the middle of the file (inside the record batches, before the footer) with garbage
    start = len(data) // 3
    data[start : start + 2000] = b"\xff" * 2000
    path.write_bytes(bytes(data))
    with pytest.raises((StageError, ValueError), match=r"part-0\.arrow"):
        list(ReadArrow(str(path)))


def test_config_error_names_the_stage(tmp_path):
    path = tmp_path / "t.arrow"
    _write(path, {"body": ["x"]})
    with pytest.raises(ConfigError, match=r"stage `books`: .*no column `text`"):
        Pipeline.from_config({"stages": {"books": {"type": "read_arrow", "paths": [str(path)]}}})


def test_failure_in_a_worker_reaches_the_caller_with_its_context(tmp_path):
    write_arrow_corpus(tmp_path / "c", batches_per_file=(2, 2))
    bad = tmp_path / "c" / "part-9.arrow"
    _write(bad, {"id": ["bad-0", "bad-1"], "text": ["fine", None], "n": [0, 1]})
    config = {"stages": {"read": {"type": "read_arrow", "paths": [str(tmp_path / "c")]}}}
    with pytest.raises(Exception, match=r"part-9\.arrow, shard 0, row 1: null in text column") as info:
        list(Pipeline.from_config(config, output="read", num_workers=2))
    assert "StageError" in str(info.value) or isinstance(info.value, StageError)


@pytest.mark.parametrize("dictionary", [False, True])
def test_stream_format_batches_read_one_by_one_equal_pyarrows_read(tmp_path, dictionary):
    batches = [
        pa.record_batch({"text": [f"b{b} r{r}" for r in range(b + 2)], "lang": ["en", "fr"] * (b // 2 + 1)})
        for b in range(0, 12, 2)
    ]
    if dictionary:
        batches = [pa.record_batch([b["text"], b["lang"].dictionary_encode()], names=["text", "lang"]) for b in batches]
    path = tmp_path / "s.arrows"
    with ipc.new_stream(path, batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    expected = pa.Table.from_batches(ipc.open_stream(str(path)).read_all().to_batches()).to_pylist()
    node = ReadArrow(str(path), shuffle=True, seed=3)  # units out of order: each batch found on its own
    docs = sorted(list(node), key=lambda d: (d["shard"], d["record"]))
    assert [{"text": d["text"], "lang": d["lang"]} for d in docs] == expected
    assert len(node.units) == 6


# --- issue 14, item 2: user columns never pass for the pipeline's own fields ------------------------------


@pytest.mark.parametrize("name", ["ids", "offset", "end", "source", "split"])
def test_a_column_named_like_a_pipeline_field_is_left_out_with_a_warning_or_refused(tmp_path, name):
    path = tmp_path / "t.arrow"
    _write(path, {"text": ["one two", "three"], name: [7, 8], "lang": ["en", "fr"]})
    with pytest.warns(UserWarning, match=rf"columns \['{name}'\] are named like fields of the pipeline's own"):
        docs = list(ReadArrow(str(path)))
    assert [d["lang"] for d in docs] == ["en", "fr"]
    assert all(d["source"] == str(path) if name == "source" else name not in d for d in docs)
    with pytest.raises(ValueError, match=f"column `{name}` has the name of a pipeline field"):
        ReadArrow(str(path), columns=["lang", name])


def test_columns_named_ids_offset_end_leave_the_tokens_as_they_are(tmp_path):
    """A column `ids` replaced the tokens; `offset` and `end` joined documents without <|endoftext|>
    (tiktoken on the texts joined by it is the oracle)."""
    path = tmp_path / "t.arrow"
    texts = ["one two", "three four five", "six"]
    _write(
        path, {"text": texts, "ids": [[1], [2], [3]], "offset": [0, 7, 22], "end": [0, 7, 22], "lang": ["a", "b", "c"]}
    )
    config = {
        "stages": {
            "read": {"type": "read_arrow", "paths": [str(path)]},
            "encode": {"type": "bpe_encode", "input": "read"},
        }
    }
    with pytest.warns(UserWarning, match=r"\['end', 'ids', 'offset'\]"):
        pipe = Pipeline.from_config(config)
    items = list(pipe)
    enc = load_encoding("gpt2")
    expected = enc.encode("<|endoftext|>".join(texts), allowed_special={"<|endoftext|>"})
    assert [int(t) for item in items for t in item["ids"]] == expected
    assert [item["lang"] for item in items] == ["a", "b", "c"]


def test_prepare_writes_the_tokens_not_a_column_named_ids(tmp_path):
    path = tmp_path / "t.arrow"
    _write(path, {"text": ["one two", "three"], "ids": [[1, 2], [3]]})
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(
            {
                "stages": {
                    "read": {"type": "read_arrow", "paths": [str(path)]},
                    "encode": {"type": "bpe_encode", "input": "read"},
                }
            }
        )
    )
    with pytest.warns(UserWarning, match="ids"):
        assert main(["prepare", str(config), "--out", str(tmp_path / "cache")]) == 0
    rows = [row["ids"] for row in shard_rows(tmp_path / "cache")]
    enc = load_encoding("gpt2")
    assert [t for row in rows for t in row] == enc.encode(
        "one two<|endoftext|>three", allowed_special={"<|endoftext|>"}
    )


# --- issue 14, item 5: stream-format files are read in linear time ---------------------------------------


def test_each_stream_unit_is_decoded_once(tmp_path, monkeypatch):
    """A unit of a stream-format file was read by decoding every batch before it (quadratic in batches)."""
    ids = write_arrow_corpus(tmp_path / "c", batches_per_file=(6, 5), fmt="stream")
    reader = ReadArrow(str(tmp_path / "c"))
    decoded = []
    opened = ipc.open_stream

    class Counting:
        def __init__(self, source):
            self.reader = opened(source)

        def __iter__(self):
            for batch in self.reader:
                decoded.append(batch.num_rows)
                yield batch

        def read_next_batch(self):
            batch = self.reader.read_next_batch()
            decoded.append(batch.num_rows)
            return batch

    monkeypatch.setattr(ipc, "open_stream", Counting)
    assert [d["id"] for d in reader] == ids
    assert len(decoded) == 11 and sum(decoded) == len(ids)


@pytest.mark.parametrize("deltas", [False, True])
def test_stream_units_with_dictionaries_read_like_pyarrow(tmp_path, deltas):
    """Dictionary columns, their dictionaries replaced or extended between batches: pyarrow's reader is the oracle."""
    path = tmp_path / "d.arrows"
    langs = pa.array(["en", "fr", "de", "it", "nl", "pt"])
    batches = [  # batch b's dictionary: the first b + 2 languages (a delta of one, or a replacement)
        pa.record_batch(
            {
                "text": [f"doc {b}-{r}" for r in range(3)],
                "lang": pa.DictionaryArray.from_arrays(
                    pa.array([(b + r) % (b + 2) for r in range(3)], pa.int32()), langs[: b + 2]
                ),
            }
        )
        for b in range(4)
    ]
    options = ipc.IpcWriteOptions(emit_dictionary_deltas=deltas)
    with ipc.new_stream(path, batches[0].schema, options=options) as writer:
        for batch in batches:
            writer.write_batch(batch)
    with pa.memory_map(str(path)) as source:
        expected = ipc.open_stream(source).read_all().to_pylist()
    docs = list(ReadArrow(str(path), shuffle=True, seed=2))
    assert sorted((d["shard"], d["record"]) for d in docs) == [(b, r) for b in range(4) for r in range(3)]
    for d in docs:
        assert {"text": d["text"], "lang": d["lang"]} == expected[d["shard"] * 3 + d["record"]]


def _taken(node, budget: int) -> list[dict]:
    out = []
    while docs := node.next_many(budget, size=lambda d: len(d["text"])):
        out += docs
    return out


@pytest.mark.parametrize("budget", [1, 7, 40, 10**9])
def test_many_rows_at_once_are_the_rows_one_by_one(tmp_path, budget):
    """``next_many`` (an encoder's blocks) reads a unit's rows in one loop: the same documents, nulls
    skipped or refused alike, the same counters, and a state saved between calls resumes there."""
    path = tmp_path / "t.arrow"
    texts = [None, "ab", "cde", None, None, "f", "ghij", None]
    schema = pa.schema([("text", pa.string()), ("n", pa.int64())])
    with ipc.new_file(path, schema) as writer:
        for i in range(0, len(texts), 3):
            rows = texts[i : i + 3]
            writer.write_batch(pa.record_batch({"text": rows, "n": list(range(i, i + len(rows)))}, schema))
    one, many = ReadArrow(str(path), columns=["n"], on_null="skip"), ReadArrow(str(path), columns=["n"], on_null="skip")
    expected = list(one)
    assert _taken(many, budget) == expected and [d["text"] for d in expected] == ["ab", "cde", "f", "ghij"]
    assert dict(many.stats) | {"seconds": 0} == dict(one.stats) | {"seconds": 0}
    with pytest.raises(StageError, match=r"file .*t\.arrow, shard 0, row 0: null in text column"):
        _taken(ReadArrow(str(path)), budget)
    for stop in range(1, 4):  # saved after `stop` documents, restored in a new reader
        node = ReadArrow(str(path), columns=["n"], on_null="skip")
        head = [next(node) for _ in range(stop)]
        restored = ReadArrow(str(path), columns=["n"], on_null="skip")
        restored.reset(json.loads(json.dumps(node.state_dict())))
        assert head + _taken(restored, budget) == expected
