"""read_jsonl: documents equal Python's ``json`` parse, in order; compressed files; bad lines named or counted."""

from __future__ import annotations

import bz2
import gzip
import itertools
import json
import lzma
import struct
from collections import Counter

import pytest
import zstandard
from torchdata.nodes import Loader

from pipeline import Pipeline
from pipeline.stage import StageError
from stages import ReadJsonl
from stages.encoding import load_encoding
from tests.resume import check_resume

COMPRESS = {
    "": lambda b: b,
    ".gz": gzip.compress,
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
}
META = ("source", "shard", "record")


def _records(n: int) -> list[dict]:
    """Objects with hostile text: escapes, raw non-ASCII, U+2028, quotes, empty strings, nested fields."""
    texts = [
        "plain",
        "é ü 中文 🙂",
        'quote " and \\ backslash',
        "line\nbreak\ttab",
        "\u2028sep\u2029",
        "",
        "<|endoftext|>",
    ]
    return [
        {"text": texts[i % len(texts)] * (1 + i % 5), "id": i, "meta": {"lang": "xx", "n": [i, None]}} for i in range(n)
    ]


def _write(path, records: list[dict], newline: str = "\n", ensure_ascii: bool = False) -> bytes:
    lines = [json.dumps(r, ensure_ascii=ensure_ascii) for r in records]
    raw = (newline.join(lines) + newline).encode("utf-8")
    suffix = next(s for s in (".gz", ".zst", ".bz2", ".xz", "") if str(path).endswith(s))
    path.write_bytes(COMPRESS[suffix](raw))
    return raw


def _oracle(raw: bytes) -> list[dict]:
    """Python's ``json`` parse of each non-blank line, as read_jsonl lays a document out."""
    out = []
    for line in raw.decode("utf-8").split("\n"):
        if line.strip():
            obj = json.loads(line)
            out.append({**obj, "text": obj.pop("text")})
    return out


@pytest.mark.parametrize("suffix", list(COMPRESS))
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_documents_equal_pythons_json_parse_in_order(tmp_path, suffix, newline):
    path = tmp_path / f"c.jsonl{suffix}"
    raw = _write(path, _records(300), newline, ensure_ascii=suffix == ".gz")
    docs = list(Loader(ReadJsonl(str(path), shard_bytes=997)))
    assert [{k: v for k, v in d.items() if k not in META} for d in docs] == _oracle(raw)
    assert {d["source"] for d in docs} == {str(path)}


def test_plain_file_byte_ranges_keep_order_and_number_lines_per_unit(tmp_path):
    path = tmp_path / "c.jsonl"
    raw = _write(path, _records(500))
    node = ReadJsonl(str(path), shard_bytes=1000)
    assert len(node.units) == -(-len(raw) // 1000) > 10
    docs = list(Loader(node))
    assert [d["id"] for d in docs] == list(range(500))
    lines = raw.split(b"\n")[:-1]
    starts = [sum(len(x) + 1 for x in lines[:i]) for i in range(len(lines))]
    assert [d["shard"] for d in docs] == [o // 1000 for o in starts]  # a line belongs to the range it starts in
    by_shard = Counter()
    for d in docs:
        assert d["record"] == by_shard[d["shard"]]
        by_shard[d["shard"]] += 1


def test_nested_field_and_carried_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"id": 1, "meta": {"body": "hello", "lang": "en"}}\n{"id": 2, "meta": {"body": "bye", "lang": "fr"}}\n'
    )
    docs = list(ReadJsonl(str(path), field="meta.body"))
    assert [(d["text"], d["meta"], d["id"]) for d in docs] == [("hello", {"lang": "en"}, 1), ("bye", {"lang": "fr"}, 2)]
    docs = list(ReadJsonl(str(path), field="meta.body", fields=["id", "absent"]))
    assert [{k: d[k] for k in d if k not in META} for d in docs] == [
        {"text": "hello", "id": 1, "absent": None},
        {"text": "bye", "id": 2, "absent": None},
    ]


def test_compression_by_setting_for_a_file_without_suffix(tmp_path):
    path = tmp_path / "corpus.data"
    raw = _write(tmp_path / "c.jsonl", _records(20))
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    docs = list(ReadJsonl(str(path), compression="zstd"))
    assert [{k: v for k, v in d.items() if k not in META} for d in docs] == _oracle(raw)
    with pytest.raises(StageError, match=r"corpus\.data.*line 1: not JSON"):
        list(ReadJsonl(str(path)))  # read as plain JSON Lines: compressed bytes are not JSON


def _with_bad_line(tmp_path, bad: str, suffix: str = "", at: int = 137):
    lines = [json.dumps(r) for r in _records(200)]
    lines[at] = bad
    raw = ("\n".join(lines) + "\n").encode()
    path = tmp_path / f"c.jsonl{suffix}"
    path.write_bytes(COMPRESS[suffix](raw))
    return path, raw


@pytest.mark.parametrize("suffix", ["", ".zst"])
@pytest.mark.parametrize(
    "bad,message,stat",
    [
        ('{"text": "unterminated', r"not JSON \(", "not JSON"),
        ('{"id": 5}', r"no text at `text` \(missing or null\)", "no text at `text`"),
        ('{"text": 5}', r"no text at `text` \(a int, not a string\)", "no text at `text`"),
        ('["text"]', r"not a JSON object \(a list\)", "not a JSON object"),
    ],
)
def test_a_bad_line_is_an_error_naming_file_and_line_or_a_counted_skip(tmp_path, suffix, bad, message, stat):
    path, _ = _with_bad_line(tmp_path, bad, suffix)
    with pytest.raises(StageError, match=rf"stage 'read_jsonl', file {path}, line 138: {message}"):
        list(Loader(ReadJsonl(str(path), shard_bytes=500)))  # line 138 lies in a later byte range of the plain file
    node = ReadJsonl(str(path), on_error="skip", shard_bytes=500)
    docs = list(node)
    assert [d["id"] for d in docs] == [i for i in range(200) if i != 137]
    assert node.stats[f"skipped: {stat}"] == 1


@pytest.mark.parametrize("suffix", [".zst", ".gz", ".xz"])
def test_a_truncated_compressed_file_is_an_error_naming_file_and_line_or_a_counted_skip(tmp_path, suffix):
    path = tmp_path / f"c.jsonl{suffix}"
    raw = _write(path, _records(5000))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(StageError, match=rf"stage 'read_jsonl', file {path}, line \d+: truncated or corrupt file"):
        list(ReadJsonl(str(path)))
    node = ReadJsonl(str(path), on_error="skip")
    docs = list(node)
    assert node.stats["skipped: truncated or corrupt file"] == 1
    assert docs == list(ReadJsonl(str(path), on_error="skip"))
    assert [{k: v for k, v in d.items() if k not in META} for d in docs] == _oracle(raw)[
        : len(docs)
    ]  # a prefix, none lost silently


def test_blank_lines_are_counted_not_documents(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}')  # no newline after the last line
    node = ReadJsonl(str(path))
    assert [d["text"] for d in node] == ["a", "b"]
    assert node.stats["blank lines skipped"] == 2


@pytest.mark.parametrize("suffix", ["", ".zst"])
def test_resume_is_exact(tmp_path, suffix):
    path = tmp_path / f"c.jsonl{suffix}"
    _write(path, _records(60))
    _write(tmp_path / f"d.jsonl{suffix}", _records(7))
    check_resume(
        lambda: ReadJsonl([str(path), str(tmp_path / f"d.jsonl{suffix}")], shard_bytes=700, shuffle=True),
        stop_after=[0, 1, 30, 66, 67],
    )


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2), (3, 1)])
def test_every_line_exactly_once_over_ranks_and_workers(tmp_path, world_size, num_workers):
    for name, n in (("a.jsonl", 300), ("b.jsonl.zst", 40), ("c.jsonl.gz", 25)):
        _write(tmp_path / name, _records(n))
    config = {"stages": {"read": {"type": "read_jsonl", "paths": [str(tmp_path)], "shard_bytes": 800}}}
    seen = Counter()
    for rank in range(world_size):
        pipe = Pipeline.from_config(config, output="read", rank=rank, world_size=world_size, num_workers=num_workers)
        seen.update((d["source"].rsplit("/", 1)[1], d["id"]) for d in pipe)
    expected = {(name, i) for name, n in (("a.jsonl", 300), ("b.jsonl.zst", 40), ("c.jsonl.gz", 25)) for i in range(n)}
    assert set(seen) == expected
    assert max(seen.values()) == 1


def test_encoded_documents_are_separated(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "Hello"}\n{"text": " world"}\n')
    config = {
        "stages": {
            "read": {"type": "read_jsonl", "paths": [str(path)]},
            "encode": {"type": "bpe_encode", "input": "read"},
        }
    }
    ids = [
        i for item in Pipeline.from_config(config, num_workers=0, rank=0, world_size=1) for i in item["ids"].tolist()
    ]
    assert ids == [15496, 50256, 995]  # "Hello" <|endoftext|> " world"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"on_error": "ignore"}, "on_error must be one of"),
        ({"compression": "gz"}, "compression must be one of"),
        ({"field": ""}, "field must be"),
    ],
)
def test_bad_settings_are_refused_before_reading(tmp_path, kwargs, message):
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=message):
        ReadJsonl(str(tmp_path / "c.jsonl"), **kwargs)


def _seekable_zst(raw: bytes, cuts: list[int]) -> bytes:
    """zstd's seekable format, written by the spec: one independent frame per piece of ``raw`` between
    ``cuts``, then a skippable frame holding the seek table (compressed and decompressed size of each)."""
    bounds = [0, *cuts, len(raw)]
    frames = [zstandard.ZstdCompressor().compress(raw[a:b]) for a, b in itertools.pairwise(bounds)]
    entries = b"".join(struct.pack("<II", len(f), b - a) for f, a, b in zip(frames, bounds, bounds[1:]))
    table = entries + struct.pack("<IBI", len(frames), 0, 0x8F92EAB1)
    return b"".join(frames) + struct.pack("<II", 0x184D2A5E, len(table)) + table


@pytest.mark.parametrize("where", ["mid-line", "at line ends"])
def test_seekable_zstd_frames_are_shard_units_and_every_line_is_read_once(tmp_path, where):
    raw = _write(tmp_path / "plain.jsonl", _records(400))
    ends = [i + 1 for i, byte in enumerate(raw) if byte == ord("\n")]
    cuts = list(range(1500, len(raw), 1500)) if where == "mid-line" else ends[9::10][:-1]
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(_seekable_zst(raw, cuts))
    node = ReadJsonl(str(path))
    assert len(node.units) == len(cuts) + 1
    docs = list(Loader(node))
    assert [{k: v for k, v in d.items() if k not in META} for d in docs] == _oracle(raw)
    config = {"stages": {"read": {"type": "read_jsonl", "paths": [str(path)], "shuffle": True}}}
    seen = Counter()
    for rank in range(2):
        seen.update(
            d["id"] for d in Pipeline.from_config(config, output="read", rank=rank, world_size=2, num_workers=2)
        )
    assert sorted(seen) == list(range(400)) and max(seen.values()) == 1


def test_seekable_zstd_resume_and_a_bad_line_in_a_late_frame(tmp_path):
    lines = [json.dumps(r) for r in _records(300)]
    lines[250] = "not json"
    raw = ("\n".join(lines) + "\n").encode()
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(_seekable_zst(raw, list(range(997, len(raw), 997))))
    with pytest.raises(StageError, match=rf"file {path}, line 251: not JSON"):
        list(ReadJsonl(str(path), shuffle=True))
    check_resume(lambda: ReadJsonl(str(path), on_error="skip", shuffle=True), stop_after=[0, 1, 150, 298, 299])


def test_a_seek_table_that_does_not_fit_the_file_is_not_used(tmp_path):
    raw = _write(tmp_path / "plain.jsonl", _records(50))
    blob = _seekable_zst(raw, [1000, 2000])
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"{}\n") + blob)  # a frame the table does not list
    node = ReadJsonl(str(path), on_error="skip")
    assert len(node.units) == 1  # the whole file
    assert [d["id"] for d in node] == list(range(50))


def test_a_plain_file_that_changed_size_since_the_build_is_an_error(tmp_path):
    path = tmp_path / "c.jsonl"
    _write(path, _records(50))
    node = ReadJsonl(str(path), shard_bytes=500)
    with open(path, "a") as f:
        f.write(json.dumps({"text": "appended"}) + "\n")
    with pytest.raises(StageError, match=rf"file {path}: file changed size since the pipeline was built"):
        list(node)


# --- issue 14, item 2 (as read_arrow): a record's fields never pass for the pipeline's own ------------------


@pytest.mark.parametrize("name", ["ids", "offset", "end", "source", "split"])
def test_a_field_named_like_a_pipeline_field_is_left_out_with_a_warning_or_refused(tmp_path, name):
    path = tmp_path / "c.jsonl"
    _write(path, [{"text": "one two", name: 7, "lang": "en"}, {"text": "three", name: 8, "lang": "fr"}])
    with pytest.warns(UserWarning, match=rf"fields \['{name}'\] are named like fields of the pipeline's own"):
        docs = list(ReadJsonl(str(path)))
    assert [d["lang"] for d in docs] == ["en", "fr"]
    assert all(d["source"] == str(path) if name == "source" else name not in d for d in docs)
    with pytest.raises(ValueError, match=f"field `{name}` has the name of a pipeline field"):
        ReadJsonl(str(path), fields=["lang", name])


def test_fields_named_ids_offset_end_leave_the_tokens_as_they_are(tmp_path):
    """A field `ids` replaced the tokens; `offset` and `end` joined documents without <|endoftext|>
    (tiktoken on the texts joined by it is the oracle)."""
    path = tmp_path / "c.jsonl"
    texts = ["one two", "three four five", "six"]
    offsets = [0, 7, 22]
    _write(
        path,
        [{"text": t, "ids": [i], "offset": o, "end": o, "lang": t[0]} for i, (t, o) in enumerate(zip(texts, offsets))],
    )
    config = {
        "stages": {
            "read": {"type": "read_jsonl", "paths": [str(path)]},
            "encode": {"type": "bpe_encode", "input": "read"},
        }
    }
    with pytest.warns(UserWarning, match=r"\['end', 'ids', 'offset'\]"):
        items = list(Pipeline.from_config(config, num_workers=0, rank=0, world_size=1))
    enc = load_encoding("gpt2")
    expected = enc.encode("<|endoftext|>".join(texts), allowed_special={"<|endoftext|>"})
    assert [int(t) for item in items for t in item["ids"]] == expected
    assert [item["lang"] for item in items] == ["o", "t", "s"]


def test_records_with_other_keys_carry_their_own_fields(tmp_path):
    """The fields to carry are chosen once per key set: records that vary their keys (and a clash that first
    appears late) still carry exactly their own."""
    path = tmp_path / "c.jsonl"
    records = [{"text": f"t{i}", "a": i} if i % 3 else {"b": i, "text": f"t{i}", "a": -i} for i in range(30)]
    records += [{"text": "late", "a": 1, "end": 5}, {"text": "last", "c": None}]
    raw = _write(path, records)
    with pytest.warns(UserWarning, match=r"fields \['end'\] are named like fields of the pipeline's own"):
        docs = list(ReadJsonl(str(path)))
    assert [{k: v for k, v in d.items() if k not in META} for d in docs] == [
        {k: v for k, v in o.items() if k != "end"} for o in _oracle(raw)
    ]
