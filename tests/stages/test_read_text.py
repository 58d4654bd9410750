"""``read_text``: pieces cut only at BPE-safe points, decode policies, empty and missing files, paths."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchdata.nodes import Loader

from pipeline import StageError
from pipeline.storage import expand_paths
from stages.bpe_encode import BpeEncode
from stages.encoding import load_encoding
from stages.read_text import ReadText, decode, safe_cut

ENC = load_encoding("gpt2")
EOT = 50256

# Pieces that stress the GPT-2 pre-tokenizer around spaces and newlines.
TRICKY = [
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\r\n",
    "\t",
    " \n",
    "'s",
    "'ll",
    "'S",
    "'t",
    "42",
    "7",
    "2024",
    "...",
    "!?",
    "--",
    "a",
    "word",
    "The",
    "é",
    "naïve",
    "\u00a0",
    "\u3000",
    "中文",
    "😀",
    "\u2028",
    "\x85",
    "\x1c",
]
texts = st.text(st.characters(codec="utf-8"), max_size=300) | st.lists(st.sampled_from(TRICKY), max_size=120).map(
    "".join
)


def pieces_of(path, **kwargs) -> list[dict]:
    return list(Loader(ReadText([str(path)], **kwargs)))


def joined_ids(items) -> list[int]:
    return [int(i) for item in items for i in item["ids"]]


# --- pieces of one file -------------------------------------------------------------------------


def test_shakespeare_in_4k_pieces(shakespeare_path):
    raw = shakespeare_path.read_bytes()
    text = raw.decode("utf-8")
    pieces = pieces_of(shakespeare_path, chunk_bytes=4096)
    assert len(pieces) > len(raw) // 4096  # many pieces, none longer than a chunk (cut points abound)
    assert "".join(p["text"] for p in pieces) == text
    sizes = [len(p["text"].encode()) for p in pieces]
    assert max(sizes) <= 4096 and min(sizes) > 0
    # offsets are consecutive byte positions covering the file
    assert [p["offset"] for p in pieces] == [0, *np.cumsum(sizes)[:-1].tolist()]
    assert [p["end"] for p in pieces] == np.cumsum(sizes).tolist()
    assert pieces[-1]["end"] == len(raw)
    assert {p["source"] for p in pieces} == {str(shakespeare_path)}
    # every later piece starts at a space or newline
    assert all(p["text"][0] in " \n" for p in pieces[1:])
    whole = ENC.encode_ordinary(text)
    assert [t for p in pieces for t in ENC.encode_ordinary(p["text"])] == whole


def test_shakespeare_through_bpe_encode(shakespeare_path, backend):
    whole = ENC.encode_ordinary(shakespeare_path.read_text(encoding="utf-8"))
    reader = ReadText([str(shakespeare_path)], chunk_bytes=4096)
    out = list(Loader(BpeEncode(reader, batch_bytes=10_000, backend=backend)))
    assert len(out) > 100
    assert all(item["ids"].dtype == np.int32 for item in out)
    assert joined_ids(out) == whole  # pieces of one file: no <|endoftext|> between them


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, chunk_bytes=st.integers(1, 64))
def test_pieces_encode_like_the_whole_file(tmp_path, text, chunk_bytes):
    path = tmp_path / "doc.txt"
    path.write_bytes(text.encode("utf-8"))  # write_bytes: no newline translation
    pieces = pieces_of(path, chunk_bytes=chunk_bytes)
    assert "".join(p["text"] for p in pieces) == text
    assert [t for p in pieces for t in ENC.encode_ordinary(p["text"])] == ENC.encode_ordinary(text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, chunk_bytes=st.integers(1, 64), shard_bytes=st.integers(1, 96))
def test_small_shards_still_encode_like_the_whole_file(tmp_path, text, chunk_bytes, shard_bytes):
    path = tmp_path / "doc.txt"
    path.write_bytes(text.encode("utf-8"))
    pieces = pieces_of(path, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes)
    assert "".join(p["text"] for p in pieces) == text  # each byte read once
    assert [t for p in pieces for t in ENC.encode_ordinary(p["text"])] == ENC.encode_ordinary(text)
    reader = ReadText([str(path)], chunk_bytes=chunk_bytes, shard_bytes=shard_bytes)
    encoded = list(Loader(BpeEncode(reader, num_threads=1)))
    assert joined_ids(encoded) == ENC.encode_ordinary(text)  # one file, one document: no separator


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(texts, min_size=1, max_size=5), chunk_bytes=st.integers(1, 32), shard_bytes=st.integers(1, 200))
def test_files_are_documents_joined_by_endoftext(tmp_path, docs, chunk_bytes, shard_bytes):
    paths = []
    for i, doc in enumerate(docs):
        path = tmp_path / f"doc{i}.txt"
        path.write_bytes(doc.encode("utf-8"))
        paths.append(str(path))
    reader = ReadText(paths, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes)
    out = list(Loader(BpeEncode(reader, num_threads=1, batch_bytes=16)))
    expected: list[int] = []
    for doc in (d for d in docs if d):  # empty files are skipped: no separator for them
        expected += ([EOT] if expected else []) + ENC.encode_ordinary(doc)
    assert joined_ids(out) == expected
    assert reader.stats["empty documents skipped"] == sum(d == "" for d in docs)


def test_a_word_longer_than_a_chunk_is_one_piece(tmp_path):
    word = "x" * 1000
    path = tmp_path / "word.txt"
    path.write_text(word, encoding="utf-8")
    pieces = pieces_of(path, chunk_bytes=16)
    assert [p["text"] for p in pieces] == [word]
    assert [t for p in pieces for t in ENC.encode_ordinary(p["text"])] == ENC.encode_ordinary(word)


def test_a_long_word_between_short_ones(tmp_path):
    text = "a few words " + "é" * 300 + "\nand more words after it " + "z" * 77
    path = tmp_path / "mixed.txt"
    path.write_text(text, encoding="utf-8")
    pieces = pieces_of(path, chunk_bytes=8)
    assert "".join(p["text"] for p in pieces) == text
    assert any("é" * 300 in p["text"] for p in pieces)  # the long word is not split
    assert [t for p in pieces for t in ENC.encode_ordinary(p["text"])] == ENC.encode_ordinary(text)


# --- safe_cut -----------------------------------------------------------------------------------


def test_safe_cut_examples():
    assert safe_cut(b"ab cd") == 2
    assert safe_cut(b"one two three") == 7  # the last one
    assert safe_cut(b"ab  cd") == 2  # the second space follows a space
    assert safe_cut(b"ab\ncd") == 2
    assert safe_cut(b"a\r\nb") == -1  # "\n" after "\r": not a cut
    assert safe_cut(b"a\tb") == -1  # only spaces and newlines are cut points
    assert safe_cut(b"   ") == -1
    assert safe_cut(b"abcdef") == -1
    assert safe_cut(b" abc") == -1  # never at 0: the piece before would be empty
    assert safe_cut("x\u00a0 y".encode()) == -1  # after a no-break space (whitespace to the pre-tokenizer)
    assert safe_cut("é y".encode()) == 2  # after a two-byte letter
    assert safe_cut(b"ab cd ef", start=4) == 5
    assert safe_cut(b"ab cd", start=3) == -1


@settings(max_examples=300, deadline=None)
@given(text=texts, start=st.integers(1, 8))
def test_safe_cut_keeps_the_tokens(text, start):
    raw = text.encode("utf-8")
    p = safe_cut(raw, start)
    if p == -1:
        return
    assert start <= p < len(raw) and raw[p : p + 1] in (b" ", b"\n")
    left, right = raw[:p].decode("utf-8"), raw[p:].decode("utf-8")  # a cut never splits a character
    assert ENC.encode_ordinary(left) + ENC.encode_ordinary(right) == ENC.encode_ordinary(text)


# --- decoding -----------------------------------------------------------------------------------

# b"\xff\xfe": two invalid start bytes; b"\xe2\x82": a truncated 3-byte sequence; b"\xf0\x9f\x98": a
# truncated 4-byte sequence; the file ends inside a multi-byte sequence.
BAD = b"abc \xff\xfe def\nghi \xe2\x82 jkl \xf0\x9f\x98 mno caf\xc3\xa9\nend \xe2\x82"


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(BAD)
    return path


def test_decode_matches_python():
    for policy, python in (("replace", "replace"), ("skip", "ignore")):
        text, bad, first = decode(BAD, policy)
        assert text == BAD.decode("utf-8", python)
        assert bad == BAD.decode("utf-8", "replace").count("\ufffd")
        assert first == BAD.index(b"\xff")
    assert decode("ok é".encode(), "strict") == ("ok é", 0, None)
    with pytest.raises(UnicodeDecodeError):
        decode(BAD, "strict")


def test_strict_names_the_file_and_the_byte(bad_file):
    with pytest.raises(StageError) as info:
        pieces_of(bad_file)
    message, first = str(info.value), BAD.index(b"\xff")
    assert str(bad_file) in message
    assert f"byte {first}" in message


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096])
def test_strict_offset_counts_from_the_file_start(tmp_path, chunk_bytes):
    raw = b"good words here " * 40 + b"then \xe9t\xe9 bad"  # Latin-1 bytes in a UTF-8 file
    path = tmp_path / "late.txt"
    path.write_bytes(raw)
    node = Loader(ReadText([str(path)], chunk_bytes=chunk_bytes))
    with pytest.raises(StageError) as info:
        list(node)
    first = raw.index(b"\xe9")
    assert f"byte {first}" in str(info.value) and str(path) in str(info.value)
    assert f"byte {first + 1}" not in str(info.value)


@pytest.mark.parametrize("policy,python", [("replace", "replace"), ("skip", "ignore")])
@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 4, 5, 6, 9, 13, 4096])
def test_replace_and_skip_equal_a_whole_file_decode(bad_file, policy, python, chunk_bytes):
    node = ReadText([str(bad_file)], chunk_bytes=chunk_bytes, errors=policy)
    pieces = list(Loader(node))
    assert "".join(p["text"] for p in pieces) == BAD.decode("utf-8", python)
    assert node.stats[f"invalid UTF-8 sequences ({policy})"] == BAD.decode("utf-8", "replace").count("\ufffd")


BYTE_PIECES = [b" ", b"\n", b"ab", b"\xc3\xa9", b"\xe2\x82", b"\xac", b"\xff", b"\xf0\x9f\x98", b"\x80"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.lists(st.sampled_from(BYTE_PIECES), max_size=60).map(b"".join) | st.binary(max_size=120),
    chunk_bytes=st.integers(1, 16),
    policy=st.sampled_from(["replace", "skip"]),
)
def test_bad_bytes_across_chunk_boundaries(tmp_path, raw, chunk_bytes, policy):
    path = tmp_path / "bytes.txt"
    path.write_bytes(raw)
    node = ReadText([str(path)], chunk_bytes=chunk_bytes, errors=policy)
    text = "".join(p["text"] for p in Loader(node))
    assert text == raw.decode("utf-8", "replace" if policy == "replace" else "ignore")
    assert node.stats[f"invalid UTF-8 sequences ({policy})"] == raw.decode("utf-8", "replace").count("\ufffd")


# --- files, empty files, paths ------------------------------------------------------------------


def test_empty_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "e1.txt").write_bytes(b"")
    (tmp_path / "e2.txt").write_bytes(b"")
    (tmp_path / "a.txt").write_text("first document.", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second one\n", encoding="utf-8")
    paths = [str(tmp_path / n) for n in ("e1.txt", "a.txt", "e2.txt", "b.txt")]
    node = ReadText(paths)
    pieces = list(Loader(node))
    assert [(p["source"], p["text"]) for p in pieces] == [(paths[1], "first document."), (paths[3], "second one\n")]
    assert node.stats["empty documents skipped"] == 2
    encoded = list(Loader(BpeEncode(ReadText(paths))))
    assert joined_ids(encoded) == ENC.encode_ordinary("first document.") + [EOT] + ENC.encode_ordinary("second one\n")


def test_only_empty_files_give_nothing(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    node = ReadText([str(tmp_path / "e.txt")])
    assert list(Loader(node)) == []
    assert node.stats["empty documents skipped"] == 1


def test_missing_file_or_empty_glob_raises_at_construction(tmp_path):
    (tmp_path / "there.txt").write_text("x", encoding="utf-8")
    for pattern in (str(tmp_path / "missing.txt"), str(tmp_path / "*.nothing")):
        with pytest.raises(FileNotFoundError) as info:
            ReadText([str(tmp_path / "there.txt"), pattern])
        assert repr(pattern) in str(info.value) or pattern in str(info.value)


def test_a_file_removed_after_construction_names_the_stage_and_file(tmp_path):
    path = tmp_path / "gone.txt"
    path.write_text("here at construction", encoding="utf-8")
    node = ReadText([str(path)])
    node.name = "reader"
    path.unlink()
    with pytest.raises(StageError) as info:
        list(Loader(node))
    assert "reader" in str(info.value) and str(path) in str(info.value)


def test_directory_reads_its_files_sorted(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for name, text in (("b.txt", "bee"), ("a.txt", "ay"), ("sub/c.txt", "sea"), ("B.txt", "big bee")):
        (corpus / name).write_text(text, encoding="utf-8")
    expected = sorted(str(p) for p in corpus.rglob("*") if p.is_file())
    assert expand_paths(str(corpus)) == expected
    pieces = pieces_of(corpus)
    assert [p["source"] for p in pieces] == expected
    assert [p["text"] for p in pieces] == [open(p, encoding="utf-8").read() for p in expected]


def test_paths_keep_the_order_given_and_globs_are_sorted(tmp_path):
    for name in ("x2.txt", "x1.txt", "y.txt"):
        (tmp_path / name).write_text(name, encoding="utf-8")
    got = expand_paths([str(tmp_path / "y.txt"), str(tmp_path / "x*.txt")])
    assert got == [str(tmp_path / "y.txt"), str(tmp_path / "x1.txt"), str(tmp_path / "x2.txt")]
    assert expand_paths(str(tmp_path / "y.txt")) == [str(tmp_path / "y.txt")]  # one path as a string


def test_links_to_folders_are_not_followed_and_are_named(tmp_path):
    """Issue 14, item 3: `self -> .` read each file 41 times, `latest -> v2` twice."""
    corpus = tmp_path / "corpus"
    (corpus / "v2").mkdir(parents=True)
    (corpus / "a.txt").write_text("ay", encoding="utf-8")
    (corpus / "v2" / "b.txt").write_text("bee", encoding="utf-8")
    (corpus / "c.txt").symlink_to(corpus / "a.txt")  # a link to a file is read
    (corpus / "self").symlink_to(".")
    (corpus / "latest").symlink_to("v2")
    with pytest.warns(UserWarning) as caught:
        got = expand_paths(str(corpus))
    assert got == [str(corpus / "a.txt"), str(corpus / "c.txt"), str(corpus / "v2" / "b.txt")]
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and "latest: a link to a folder (v2)" in messages[0] and "self: a link" in messages[1]
    assert expand_paths(str(corpus / "latest")) == [str(corpus / "latest" / "b.txt")]  # named: followed


@pytest.mark.parametrize("name", ["a[1].txt", "b*.txt", "c?.txt", "d[x]"])
def test_paths_with_glob_characters_are_found_literally(tmp_path, name):
    path = tmp_path / name
    if "." in name:
        path.write_text("text", encoding="utf-8")
        expected = [str(path)]
    else:
        path.mkdir()
        (path / "e.txt").write_text("text", encoding="utf-8")
        expected = [str(path / "e.txt")]
    (tmp_path / "a1.txt").write_text("a glob's match, not the literal file", encoding="utf-8")
    assert expand_paths(str(path)) == expected
    assert expand_paths(str(tmp_path / "a[0-9].txt")) == [str(tmp_path / "a1.txt")]  # other paths still glob


@pytest.mark.parametrize(
    "kwargs",
    [{"errors": "bogus"}, {"chunk_bytes": 0}, {"chunk_bytes": -5}, {"chunk_bytes": 1.5}, {"chunk_bytes": True}],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs):
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        ReadText([str(tmp_path / "a.txt")], **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


# --- shuffled shard order -----------------------------------------------------------------------


def test_shuffled_first_epoch_does_not_depend_on_the_stages_above(tmp_path):
    """Building stages above a shuffled reader must not advance its epoch (the first epoch is epoch 0)."""
    from stages.sliding_window import SlidingWindow

    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f"{i}.txt"))
        (tmp_path / f"{i}.txt").write_text(f"document {i}", encoding="utf-8")
    alone = [p["source"] for p in Loader(ReadText(paths, shuffle=True, seed=3))]
    assert sorted(alone) == sorted(paths) and alone != paths  # seed 3 really shuffles
    from stages.batch import Batch

    reader = ReadText(paths, shuffle=True, seed=3)
    encoded = BpeEncode(reader, num_threads=1)
    Batch(SlidingWindow(encoded, max_length=2, stride=1), 2)  # built above the reader, never iterated
    below = [p["source"] for p in Loader(encoded)]
    assert below == alone
