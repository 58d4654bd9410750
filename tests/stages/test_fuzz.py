"""Fuzzing the readers and the encoder with random and adversarial input (hypothesis).

Inputs: invalid UTF-8 (stray continuation bytes, overlong forms, truncated sequences, code points
past U+10FFFF, lone surrogates as bytes ``b"\\xed\\xa0\\x80"``), NUL bytes, long runs with no
whitespace, text from many scripts, and the literal ``<|endoftext|>`` anywhere. Properties: no crash
but the documented ``StageError`` under ``errors: strict`` (naming the file and the first bad byte);
the policy applied as Python's own decode applies it (the oracle) and counted in ``stats``; the tokens
equal ``encode_ordinary`` of that text, documents joined by ``<|endoftext|>``; memory bounded for a
long word. Examples and deadlines are bounded so the file stays fast.
"""

from __future__ import annotations

import tracemalloc
from datetime import timedelta
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchdata.nodes import IterableWrapper, Loader

from pipeline import StageError
from stages import BpeEncode, ReadArrow, ReadText
from stages import bpe_encode
from stages.encoding import load_encoding

ENC = load_encoding("gpt2")
EOT = ENC.eot_token  # 50256
EOT_TEXT = "<|endoftext|>"
FUZZ = settings(
    max_examples=300,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

INVALID = [
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xbf\xbf",  # bytes that never start a character; stray continuations
    b"\xc0\x80",
    b"\xc1\xbf",
    b"\xe0\x80\x80",  # overlong forms (NUL, "\x7f", "\x00" in 3 bytes)
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",  # lone surrogates U+D800, U+DFFF
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    b"\xc3",  # truncated sequences
    b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80",  # past U+10FFFF; a 5-byte form
]
SCRIPTS = [
    "Hello",
    "Привет",
    "Γειά σου",
    "שלום",
    "مرحبا",
    "नमस्ते",
    "こんにちは",
    "你好",
    "안녕하세요",
    "สวัสดี",
    "ሰላም",
    "ᚠᛇᚻ",
    "𓀀𓀁",
    "👩\u200d👩\u200d👧",
    "e\u0301",
    "\u200f\u200e",
    "\ufeff",
    "\u2028",
    "\u0085",
    "\U0010fffd",
    "ﷺ",
    "Ａ",
]
ADVERSARIAL = [
    " ",
    "  ",
    "\n",
    "\r\n",
    "\t",
    "\x00",
    "\x1c",
    "\u00a0",
    "\u3000",
    EOT_TEXT,
    "<|endoftext",
    "|>",
    "'s",
    "<|fim_prefix|>",
]

# UTF-8 text (any code point but surrogates), from every plane
unicode_text = st.text(st.characters(codec="utf-8"), max_size=24)
# a run with no whitespace (a long "word" or line) of up to 1,500 bytes: many times chunk_bytes (<= 64)
RUN_UNITS = [b"x", b"ab", "é".encode(), "字".encode(), "😀".encode(), b"\x00", EOT_TEXT.encode(), b"\xff"]
long_run = st.sampled_from(RUN_UNITS).flatmap(lambda unit: st.integers(1, 1500 // len(unit)).map(lambda n: unit * n))
segment = st.one_of(
    st.sampled_from(INVALID),
    st.sampled_from(SCRIPTS + ADVERSARIAL).map(str.encode),
    unicode_text.map(str.encode),
    long_run,
)
raw_bytes = st.lists(segment, max_size=30).map(b"".join)
doc_text = st.lists(
    st.one_of(
        st.sampled_from(SCRIPTS + ADVERSARIAL), unicode_text, long_run.map(lambda b: b.decode("utf-8", "ignore"))
    ),
    max_size=12,
).map("".join)

PYTHON_POLICY = {"replace": "replace", "skip": "ignore"}


def bad_sequences(raw: bytes) -> int:
    """Python's count of invalid sequences: each one becomes one U+FFFD under ``replace``
    and nothing under ``ignore``."""
    return len(raw.decode("utf-8", "replace")) - len(raw.decode("utf-8", "ignore"))


def first_bad_byte(raw: bytes) -> int | None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start
    return None


def joined(docs: list[list[int]]) -> list[int]:
    out: list[int] = []
    for i, ids in enumerate(docs):
        out += ([EOT] if i else []) + ids
    return out


# --- read_text -----------------------------------------------------------------------------------------


@FUZZ
@given(
    files=st.lists(raw_bytes, min_size=1, max_size=3),
    policy=st.sampled_from(["strict", "replace", "skip"]),
    chunk_bytes=st.integers(1, 64),
    shard_bytes=st.sampled_from([256, 1 << 20]),
    batch_bytes=st.integers(1, 64),
)
def test_read_text_applies_its_policy_like_python_and_encodes_like_encode_ordinary(
    tmp_path, files, policy, chunk_bytes, shard_bytes, batch_bytes
):
    paths = []
    for i, raw in enumerate(files):
        path = tmp_path / f"f{i}.txt"
        path.write_bytes(raw)
        paths.append(str(path))

    def reader():
        return ReadText(paths, chunk_bytes=chunk_bytes, errors=policy, shard_bytes=shard_bytes)

    bad = [(path, first_bad_byte(raw)) for path, raw in zip(paths, files) if first_bad_byte(raw) is not None]
    if policy == "strict" and bad:
        path, byte = bad[0]  # files are read in order: the first bad file's first bad byte
        with pytest.raises(StageError, match=rf"stage 'read_text', file {path}, byte {byte}: invalid UTF-8"):
            list(Loader(reader()))
        with pytest.raises(StageError, match=rf"file {path}, byte {byte}: invalid UTF-8"):
            list(Loader(BpeEncode(reader(), batch_bytes=batch_bytes)))
        return

    node = reader()
    pieces = list(Loader(node))
    texts = []  # each non-empty file's text, as Python decodes it under the same policy
    for path, raw in zip(paths, files):
        expected = raw.decode("utf-8", PYTHON_POLICY.get(policy, "strict"))
        assert "".join(p["text"] for p in pieces if p["source"] == path) == expected
        if raw:
            texts.append(expected)
    errors = sum(bad_sequences(raw) for raw in files)
    assert node.stats[f"invalid UTF-8 sequences ({policy})"] == errors  # counted, and 0 (absent) when none
    assert node.stats["empty documents skipped"] == sum(not raw for raw in files)

    encode = BpeEncode(reader(), batch_bytes=batch_bytes, num_threads=2)
    ids = [int(i) for item in Loader(encode) for i in item["ids"]]
    assert ids == joined([ENC.encode_ordinary(text) for text in texts])  # a literal <|endoftext|> is plain text
    assert encode.stats["documents"] == len(texts) and encode.stats["tokens"] == len(ids)


# --- read_arrow ----------------------------------------------------------------------------------------


@FUZZ
@given(
    batches=st.lists(st.lists(st.none() | doc_text, max_size=6), min_size=1, max_size=4),
    on_null=st.sampled_from(["skip", "error"]),
)
def test_read_arrow_with_nulls_and_hostile_strings(tmp_path, batches, on_null):
    path = tmp_path / "c.arrow"
    schema = pa.schema([("text", pa.string()), ("n", pa.int64())])
    with ipc.new_file(str(path), schema) as writer:
        for rows in batches:
            writer.write_batch(
                pa.record_batch([pa.array(rows, pa.string()), pa.array(range(len(rows)), pa.int64())], schema=schema)
            )
    values = [(s, r, text) for s, rows in enumerate(batches) for r, text in enumerate(rows)]
    nulls = [(s, r) for s, r, text in values if text is None]

    if on_null == "error" and nulls:
        shard, row = nulls[0]
        with pytest.raises(
            StageError, match=rf"stage 'read_arrow', file {path}, shard {shard}, row {row}: null in text column"
        ):
            list(Loader(ReadArrow(str(path), on_null=on_null)))
        return
    node = ReadArrow(str(path), on_null=on_null)
    docs = list(Loader(node))
    assert [(d["shard"], d["record"], d["text"], d["n"]) for d in docs] == [
        (s, r, t, r) for s, r, t in values if t is not None
    ]
    assert node.stats["null documents skipped"] == len(nulls)

    expected = joined([ENC.encode_ordinary(t) for _, _, t in values if t is not None])
    for blocks in (False, True):  # blocks: rows handed over as Arrow arrays (read_rows), after a one-byte first call
        with mock.patch.object(bpe_encode, "FIRST_CALL_BYTES", 1):
            encode = BpeEncode(ReadArrow(str(path), on_null=on_null), batch_bytes=32, blocks=blocks)
            assert [int(i) for item in Loader(encode) for i in item["ids"]] == expected


# --- bpe_encode ----------------------------------------------------------------------------------------


@FUZZ
@given(
    texts=st.lists(doc_text, min_size=1, max_size=8),
    batch_bytes=st.integers(1, 200),
    num_threads=st.integers(1, 2),
    allowed=st.sampled_from([(), "all", [EOT_TEXT]]),
)
def test_encoder_equals_tiktoken_on_hostile_documents(texts, batch_bytes, num_threads, allowed):
    docs = [{"text": t, "source": "mem", "record": i} for i, t in enumerate(texts)]
    encode = BpeEncode(IterableWrapper(docs), batch_bytes=batch_bytes, num_threads=num_threads, allowed_special=allowed)
    items = list(Loader(encode))
    assert [item["record"] for item in items] == list(range(len(texts)))
    allowed_set = ENC.special_tokens_set if allowed == "all" else set(allowed)
    expected = [ENC.encode(t, allowed_special=allowed_set, disallowed_special=()) for t in texts]
    assert [item["ids"].tolist() for item in items] == [([EOT] if i else []) + ids for i, ids in enumerate(expected)]
    assert all(item["ids"].dtype == np.int32 for item in items)
    assert encode.stats["tokens"] == sum(len(item["ids"]) for item in items)


@pytest.mark.parametrize("batch", [1, 3])  # alone, and joined with other documents into one tiktoken call
def test_encoder_on_a_lone_surrogate_is_a_stage_error_naming_the_record(batch):
    """Found by this suite, then fixed: tiktoken's ``encode_to_numpy``, which the stage calls, raises a
    bare UnicodeEncodeError on a str holding a lone surrogate (``encode_ordinary`` would replace it).
    Such a str cannot come from read_text or read_arrow (both decode UTF-8), only from Python sources."""
    texts = ["before", "a\ud800b", "after"] if batch > 1 else ["a\ud800b"]
    docs = [{"text": t, "source": "mem.jsonl", "record": i} for i, t in enumerate(texts)]
    record = texts.index("a\ud800b")
    with pytest.raises(
        StageError, match=rf"stage 'bpe_encode', file mem.jsonl, record {record}: text is not valid Unicode"
    ):
        list(Loader(BpeEncode(IterableWrapper(docs))))


def test_read_arrow_invalid_utf8_in_a_string_column_is_a_stage_error(tmp_path):
    """Found by this suite, then fixed: Arrow does not validate UTF-8 when reading, and writers other
    than pyarrow's Python API may not either; such a column raised a bare UnicodeDecodeError."""
    data, offsets = b"hello" + b"bad\xff\xfe" + b"ok", np.array([0, 5, 10, 12], dtype=np.int32)
    column = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])
    batch = pa.record_batch({"text": column})
    path = tmp_path / "invalid.arrow"
    with ipc.new_file(str(path), batch.schema) as writer:
        writer.write_batch(batch)
    for node in (ReadArrow(str(path)), BpeEncode(ReadArrow(str(path)), blocks=True)):  # rows, or Arrow arrays
        with pytest.raises(
            StageError, match=rf"stage 'read_arrow', file {path}, shard 0, row 1: invalid UTF-8 in column `text`"
        ):
            list(Loader(node))


# --- one long word ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_4mb_word_streams_in_bounded_memory(tmp_path):
    """A 4 MiB "word" (no whitespace) read in 64 KiB chunks: one piece, the tokens of encode_ordinary,
    and Python-visible peak memory (tracemalloc: bytes, text, ids) a small multiple of the word.
    The 100 MB case is measured separately: ``python benchmarks/soak.py --long-word 100MB`` (HARDENING.md)."""
    n = 4 << 20
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", dtype=np.uint8)
    word = letters[np.random.default_rng(0).integers(0, len(letters), n)].tobytes()
    path = tmp_path / "word.txt"
    path.write_bytes(b"before " + word + b" after\n")
    tracemalloc.start()
    try:
        items = list(Loader(BpeEncode(ReadText(str(path), chunk_bytes=64 << 10))))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ids = np.concatenate([item["ids"] for item in items])
    assert ids.tolist() == ENC.encode_ordinary(path.read_text())
    assert peak < 8 * n, f"peak traced memory {peak / n:.1f}x the word"


@pytest.mark.timeout(60)
def test_a_64mb_word_in_4k_chunks_reads_in_linear_time(tmp_path):
    """Found by this suite, then fixed: each further chunk of a word longer than ``chunk_bytes`` was
    appended to the bytes read so far (``buf += more``), copying them all again: O(n^2 / chunk_bytes),
    a 256 MB word took 17 s at the default 1 MiB chunks (1 GB: ~5 min) and 4x the word ~20x the time.
    Linear, this read takes ~0.1-0.3 s; quadratic, it would copy ~500 GB. (Ratios of small timings
    proved too noisy to test: caches make 4x the bytes cost 4-10x even when linear.)"""
    import time

    n = 64 << 20
    path = tmp_path / "word.txt"
    path.write_bytes(b"abcdefgh" * (n // 8))
    start = time.perf_counter()
    pieces = list(Loader(ReadText(str(path), chunk_bytes=4096)))
    seconds = time.perf_counter() - start
    assert len(pieces) == 1 and len(pieces[0]["text"]) == n
    assert seconds < 10, f"{seconds:.1f} s to read a {n >> 20} MiB word"


@pytest.mark.timeout(60)
def test_a_word_spanning_many_shard_units_reads_in_linear_time(tmp_path):
    """A 4 MiB word cut into 128 shard units of 32 KiB, all but the first empty (no cut point inside).
    Found by this suite, then fixed (``_snap`` remembers the range it scanned): each unit's start and
    end were snapped forward by scanning to the end of the word, O(word^2 / shard_bytes): ~3.6 s here
    against ~0.02 s as one unit; a 256 MB word at the default 64 MB units took 4.2 s, in 4 MB units 79 s."""
    import time

    n = 4 << 20
    path = tmp_path / "word.txt"
    path.write_bytes(b"abcdefgh" * (n // 8))

    def seconds(shard_bytes: int) -> float:
        start = time.perf_counter()
        pieces = list(Loader(ReadText(str(path), chunk_bytes=64 << 10, shard_bytes=shard_bytes)))
        assert "".join(p["text"] for p in pieces) == "abcdefgh" * (n // 8)
        return time.perf_counter() - start

    one, many = seconds(n), seconds(32 << 10)
    assert many < max(1.0, 20 * one), f"one unit: {one:.2f} s; 128 units: {many:.2f} s"
