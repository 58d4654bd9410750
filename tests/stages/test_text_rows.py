"""``TextRows``: Arrow rows handed to an encoder, read back as the documents and texts they hold."""

from __future__ import annotations

import pyarrow as pa
import pytest

from stages.text_rows import TextRows, awkward_strings, text_bytes, text_data

TEXTS = ["", "héllo", "wörld 😀", "a\r\nb\tc", "", "last one"]


@pytest.mark.parametrize("type_", [pa.string(), pa.large_string()])
def test_slices_of_string_arrays_read_back_as_their_texts(type_):
    array = pa.array(["skipped", *TEXTS, "after"], type_)
    piece = array.slice(1, len(TEXTS))  # a slice: offsets and data start inside the buffers
    assert text_bytes(piece) == sum(len(t.encode()) for t in TEXTS)
    assert text_data(piece) == "".join(TEXTS).encode()
    strings = awkward_strings(piece)
    assert strings.layout.offsets.data.dtype.itemsize == 8  # gigatoken takes int64 offsets only
    assert strings.tolist() == TEXTS


def test_rows_are_documents_in_order_with_their_file_shard_and_row():
    rows = TextRows([("a.arrow", 0, 5, pa.array(TEXTS[:2])), ("b.arrow", 3, 0, pa.array(TEXTS[2:]))])
    expected = [("a.arrow", 0, 5), ("a.arrow", 0, 6)] + [("b.arrow", 3, r) for r in range(len(TEXTS) - 2)]
    assert len(rows) == len(TEXTS)
    assert [(d["source"], d["shard"], d["record"]) for d in rows] == expected
    assert [d["text"] for d in rows] == rows.texts() == TEXTS
    assert rows[-1] == rows[len(TEXTS) - 1] and rows.sources() == [s for s, _, _ in expected]
    with pytest.raises(IndexError):
        rows[len(TEXTS)]
