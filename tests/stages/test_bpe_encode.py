"""``bpe_encode`` and offline tiktoken encodings: many documents, separators, special tokens, files."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import multiprocessing
import os
import random
import re
import socket

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import tiktoken.load
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchdata.nodes import IterableWrapper, Loader

from pipeline import StageError
from stages import encoding as encoding_module
from stages import fast_bpe
from stages.bpe_encode import BpeEncode
from stages.encoding import EncodingFileMissing, load_encoding
from stages.separators import document_ids
from stages.read_arrow import ReadArrow
from stages.read_text import ReadText
from stages.runs import MAX_RUN, WHITESPACE, UncuttableRun, cut_long_runs, has_long_run
from tests.conftest import BACKENDS
from tests.corpora import write_arrow_corpus
from tests.resume import check_resume

ENC = load_encoding("gpt2")
EOT = 50256
EOT_TEXT = "<|endoftext|>"
URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"

WORDS = [
    "",
    " ",
    "  ",
    "\n",
    "the",
    " cat",
    " sat",
    "'s",
    "42",
    "é",
    "naïve",
    "中文",
    "😀",
    "\t",
    ".",
    "<|",
    "|>",
    "endoftext",
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(0, 12))
        if rng.random() < 0.1:
            words.insert(rng.randint(0, len(words)), EOT_TEXT)
        texts.append("".join(words))
    return texts


def documents(texts: list[str]) -> IterableWrapper:
    return IterableWrapper([{"text": t, "source": "s", "record": i, "last": True} for i, t in enumerate(texts)])


def encode_all(texts: list[str], **kwargs) -> list[dict]:
    return list(Loader(BpeEncode(documents(texts), **kwargs)))


def book_stream(texts: list[str], encode, eot: bool = True) -> list[int]:
    """The stream built plainly: each document's ids, <|endoftext|> before every one after the first."""
    out: list[int] = []
    for i, text in enumerate(texts):
        out += ([EOT] if eot and i > 0 else []) + encode(text)
    return out


def flat(items: list[dict]) -> list[int]:
    return [int(t) for item in items for t in item["ids"]]


# --- many documents -----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_bytes,num_threads", [(200, 2), (1, 1), (1 << 20, 2), (37, 3)])
def test_many_small_documents(batch_bytes, num_threads, backend):
    texts = random_texts(500)
    assert sum(EOT_TEXT in t for t in texts) > 10 and sum(t == "" for t in texts) > 3  # the mix is there
    out = encode_all(texts, batch_bytes=batch_bytes, num_threads=num_threads, backend=backend)
    assert flat(out) == book_stream(texts, ENC.encode_ordinary)
    # one item per document, in order, its own ids (with the separator in front)
    assert len(out) == len(texts)
    assert [item["record"] for item in out] == list(range(len(texts)))
    for i, (item, text) in enumerate(zip(out, texts)):
        assert item["ids"].dtype == np.int32
        assert item["ids"].tolist() == ([EOT] if i else []) + ENC.encode_ordinary(text)
        assert "text" not in item and item["source"] == "s"


def test_without_eot_no_separators(backend):
    texts = random_texts(200, seed=1)
    out = encode_all(texts, eot=False, batch_bytes=50, backend=backend)
    assert flat(out) == book_stream(texts, ENC.encode_ordinary, eot=False)


@pytest.mark.parametrize("allowed", ["all", ["<|endoftext|>"]])
def test_allowed_special_makes_the_literal_a_token(allowed, backend):
    texts = random_texts(300, seed=2)
    out = encode_all(texts, allowed_special=allowed, batch_bytes=200, backend=backend)
    expected = book_stream(texts, lambda t: ENC.encode(t, allowed_special="all"))
    assert flat(out) == expected
    # and that is the documents joined by <|endoftext|>, encoded with the special token allowed
    assert flat(out) == ENC.encode(EOT_TEXT.join(texts), allowed_special={EOT_TEXT})
    assert flat(out).count(EOT) == len(texts) - 1 + sum(t.count(EOT_TEXT) for t in texts)


def test_the_literal_is_plain_text_by_default(backend):
    text = f"before {EOT_TEXT} after{EOT_TEXT}"
    for kwargs in ({}, {"batch_bytes": 1}):
        out = encode_all(["first", text, "last"], backend=backend, **kwargs)
        ids = out[1]["ids"].tolist()
        assert ids == [EOT] + ENC.encode_ordinary(text)
        assert EOT not in ids[1:] and len(ids) > 3
        assert flat(out).count(EOT) == 2  # the two separators only


def test_empty_and_whitespace_documents_keep_their_separators(backend):
    texts = ["", "", " ", "a", "", "\n"]
    assert flat(encode_all(texts, batch_bytes=1, backend=backend)) == book_stream(texts, ENC.encode_ordinary)
    assert flat(encode_all(texts, backend=backend)) == book_stream(texts, ENC.encode_ordinary)


@pytest.mark.parametrize("bad", [{"source": "f.txt", "record": 7}, {"text": 5, "source": "f.txt"}, "just a string"])
def test_a_document_without_text_names_the_stage(bad):
    node = BpeEncode(IterableWrapper([{"text": "fine", "source": "ok"}, bad]))
    node.name = "my_encoder"
    with pytest.raises(StageError) as info:
        list(Loader(node))
    assert "my_encoder" in str(info.value)
    if isinstance(bad, dict):
        assert "f.txt" in str(info.value)


def test_bad_arguments():
    for kwargs in ({"num_threads": 0}, {"batch_bytes": 0}, {"allowed_special": ["<|fim_prefix|>"]}):
        with pytest.raises(ValueError):
            BpeEncode(documents(["x"]), **kwargs)


# --- encodings, offline -------------------------------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty tiktoken cache, no network, and a fresh encoding cache before and after."""
    folder = tmp_path / "tiktoken-cache"
    folder.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(folder))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    encoding_module._load.cache_clear()
    yield folder
    encoding_module._load.cache_clear()


def r50k_file(path) -> str:
    """r50k_base.tiktoken written from GPT-2's ranks (the same vocabulary; tiktoken checks the sha256)."""
    ranks = sorted(ENC._mergeable_ranks.items(), key=lambda item: item[1])
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks))
    return str(path)


def test_gpt2_loads_offline(cache_dir):
    enc = load_encoding("gpt2")
    assert enc is not ENC  # really rebuilt, from the packaged files, with no network
    assert enc.n_vocab == 50257 and enc.eot_token == EOT
    assert enc.encode("Hello, world") == [15496, 11, 995]  # GPT-2's published ids


def test_missing_encoding_file_names_file_url_and_cache_path(cache_dir):
    url = URL.format("cl100k_base")
    with pytest.raises(EncodingFileMissing) as info:
        load_encoding("cl100k_base")
    message = str(info.value)
    assert "cl100k_base.tiktoken" in message and url in message
    assert os.path.join(str(cache_dir), hashlib.sha1(url.encode()).hexdigest()) in message
    assert isinstance(info.value, FileNotFoundError)


def test_the_named_cache_path_is_where_tiktoken_looks(cache_dir, tmp_path):
    url = URL.format("r50k_base")
    with pytest.raises(EncodingFileMissing) as info:
        load_encoding("r50k_base")
    named = os.path.join(str(cache_dir), hashlib.sha1(url.encode()).hexdigest())
    assert named in str(info.value)
    r50k_file(tmp_path / "r50k_base.tiktoken")
    os.replace(tmp_path / "r50k_base.tiktoken", named)
    enc = load_encoding("r50k_base")
    assert enc.encode_ordinary("It's 2024 — naïve café!") == ENC.encode_ordinary("It's 2024 — naïve café!")


def test_the_named_cache_path_works_when_the_cache_is_disabled(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(cache_dir))
    url = URL.format("r50k_base")
    with pytest.raises(EncodingFileMissing) as info:
        load_encoding("r50k_base")
    named = os.path.join(str(cache_dir), hashlib.sha1(url.encode()).hexdigest())
    assert named in str(info.value)  # the hint names this path...
    r50k_file(tmp_path / "r50k_base.tiktoken")
    os.replace(tmp_path / "r50k_base.tiktoken", named)
    load_encoding("r50k_base")  # ...so a file put there must be used


def test_unknown_encoding_lists_known_names(cache_dir):
    with pytest.raises(ValueError) as info:
        load_encoding("nope")
    for known in ("gpt2", "r50k_base", "cl100k_base"):
        assert known in str(info.value)


def test_encoding_files_that_do_not_exist(cache_dir, tmp_path):
    missing = str(tmp_path / "nowhere" / "cl100k_base.tiktoken")
    with pytest.raises(FileNotFoundError) as info:
        load_encoding("cl100k_base", {"cl100k_base.tiktoken": missing})
    assert missing in str(info.value)


def test_encoding_files_with_wrong_content_fail_the_hash_check(cache_dir, tmp_path):
    wrong = tmp_path / "r50k_base.tiktoken"
    wrong.write_bytes(b"SGVsbG8= 0\n")
    with pytest.raises(ValueError, match="(?i)hash"):
        load_encoding("r50k_base", {"r50k_base.tiktoken": str(wrong)})
    assert os.listdir(cache_dir) == []  # nothing bad was cached


def test_encoding_files_give_a_working_encoding(cache_dir, tmp_path, backend):
    path = r50k_file(tmp_path / "r50k_base.tiktoken")
    texts = random_texts(100, seed=5)
    files = {"r50k_base.tiktoken": path}
    out = encode_all(texts, encoding="r50k_base", encoding_files=files, batch_bytes=64, backend=backend)
    assert flat(out) == book_stream(texts, ENC.encode_ordinary)  # r50k_base is GPT-2's vocabulary


def test_load_encoding_is_cached_per_arguments(cache_dir, tmp_path):
    assert load_encoding("gpt2") is load_encoding("gpt2")
    path = r50k_file(tmp_path / "r50k_base.tiktoken")
    files = {"r50k_base.tiktoken": path}
    assert load_encoding("r50k_base", files) is load_encoding("r50k_base", dict(files))
    assert tiktoken.load.read_file.__module__ == "tiktoken.load"  # the offline patch did not leak


def p50k_file(path) -> str:
    """p50k_base.tiktoken: GPT-2's ranks plus runs of 2..25 spaces at 50257..50280 (tiktoken checks the sha256)."""
    ranks = sorted(ENC._mergeable_ranks.items(), key=lambda item: item[1])
    ranks += [(b" " * n, 50257 + i) for i, n in enumerate(range(2, 26))]
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks))
    return str(path)


FIM_TEXTS = ["def f():", "    return 1  # <|fim_prefix|> in a comment", "x = <|fim_middle|>", "end"]


def test_other_special_tokens_when_allowed(cache_dir, tmp_path):
    files = {"p50k_base.tiktoken": p50k_file(tmp_path / "p50k_base.tiktoken")}
    edit = load_encoding("p50k_edit", files)  # <|endoftext|> plus the three FIM tokens
    out = encode_all(FIM_TEXTS, encoding="p50k_edit", encoding_files=files, allowed_special="all")
    assert flat(out) == book_stream(FIM_TEXTS, lambda t: edit.encode(t, allowed_special="all"))
    assert 50281 in flat(out) and 50282 in flat(out)


@pytest.mark.parametrize("batch_bytes", [1, 1 << 20])
def test_other_special_tokens_are_plain_text_by_default(cache_dir, tmp_path, batch_bytes):
    files = {"p50k_base.tiktoken": p50k_file(tmp_path / "p50k_base.tiktoken")}
    edit = load_encoding("p50k_edit", files)
    out = encode_all(FIM_TEXTS, encoding="p50k_edit", encoding_files=files, batch_bytes=batch_bytes)
    assert flat(out) == book_stream(FIM_TEXTS, edit.encode_ordinary)


# --- issue 14, item 6: whitespace runs too long for tiktoken's regex ------------------------------------

_WORDS = st.sampled_from(["a", "word", "x1", "42", "!?", "'s", ".", "é", "\u4e2d"])
_SPACES = st.text(st.sampled_from(" \t\n\r\xa0\u3000\u2003\x0b"), min_size=1, max_size=14)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(parts=st.lists(st.one_of(_WORDS, _SPACES), max_size=12), max_run=st.integers(1, 5))
def test_cutting_runs_leaves_the_tokens_as_tiktoken_gives_them(parts, max_run):
    """The cut of stages.runs, tried on short runs (tiktoken encodes them whole: the oracle)."""
    text = "".join(parts)
    try:
        pieces = cut_long_runs(text, ENC, max_run)
    except UncuttableRun as e:
        assert has_long_run(text, max_run) and text[e.index : e.index + e.length].isspace()
        return
    assert "".join(pieces) == text
    assert [t for p in pieces for t in ENC.encode_ordinary(p)] == ENC.encode_ordinary(text)
    assert all(not has_long_run(p, max_run + 2) for p in pieces)


def _encode_file(tmp_path, text: str) -> list[int]:
    path = tmp_path / "runs.txt"
    path.write_text(text, encoding="utf-8")
    node = BpeEncode(ReadText(str(path)), num_threads=1)
    node.name = "encode"
    return [int(t) for item in Loader(node) for t in item["ids"]]


def test_a_million_spaces_are_encoded_exactly(tmp_path):
    """tiktoken fails on the whole run (a panic); on shorter runs its tokens are `a`, n - 1 spaces, ` b`,
    the oracle this run's tokens are checked against."""
    space, a, b = ENC.encode_ordinary(" ")[0], ENC.encode_ordinary("a"), ENC.encode_ordinary(" b")
    for n in (1_000, 2 * MAX_RUN):
        assert ENC.encode_ordinary("a" + " " * n + "b") == a + [space] * (n - 1) + b
    n = 1_200_000
    assert _encode_file(tmp_path, "a" + " " * n + "b") == a + [space] * (n - 1) + b


def test_a_mixed_run_is_cut_where_tiktoken_cannot_tell(tmp_path):
    run = " \t \xa0\t\n " * 5  # 35 characters, cut with a small max_run; then a run of a million
    text = "one" + run + "two"
    pieces = cut_long_runs(text, ENC, 8)
    assert len(pieces) > 2 and [t for p in pieces for t in ENC.encode_ordinary(p)] == ENC.encode_ordinary(text)
    ids = _encode_file(tmp_path, "one" + " \t \xa0\t\n " * 150_000 + "two")
    assert ids[:1] == ENC.encode_ordinary("one") and ids[-1:] == ENC.encode_ordinary(" two")
    assert ENC.decode(ids) == "one" + " \t \xa0\t\n " * 150_000 + "two"


def test_a_run_with_no_exact_cut_is_a_stage_error_naming_file_and_byte(tmp_path):
    """A million newlines: `\\n\\n` is a GPT-2 token, so no cut is proven; the error names the byte."""
    prefix = "héllo" + " " * 10
    with pytest.raises(StageError) as info:
        _encode_file(tmp_path, prefix + "\n" * 1_000_000 + "end")
    message = str(info.value)
    assert "stage 'encode'" in message and "runs.txt" in message
    assert f"byte {len(prefix.encode()) - 10}" in message and "1,000,010 whitespace characters" in message


# --- backends -----------------------------------------------------------------------------------

HOSTILE = [" ", "  ", "   ", "\n", "\r\n", "\r", "\t", "\u00a0", "\u3000", "\u2028", "\x85", "\x1c", "\u200d", "'s",
           "'LL", "42", "٣", "é", "e\u0301", "ﬁ", "中文", "😀", "👩‍👩‍👧", "🇫🇷",
           "\U0010fffd", "\x00", ".", "!!", EOT_TEXT, "<|"]
hostile = st.text(st.characters(codec="utf-8"), max_size=200) | st.lists(st.sampled_from(HOSTILE), max_size=80).map(
    "".join
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(hostile, min_size=1, max_size=12), batch_bytes=st.sampled_from([1, 64, 1 << 20]))
def test_every_backend_gives_tiktokens_ids_on_hostile_text(backend, texts, batch_bytes):
    out = encode_all(texts, batch_bytes=batch_bytes, backend=backend)
    expected = [([EOT] if i else []) + ENC.encode_ordinary(t) for i, t in enumerate(texts)]
    assert [item["ids"].tolist() for item in out] == expected


@pytest.mark.skipif("gigatoken" not in BACKENDS, reason="gigatoken is not installed or is disabled")
@settings(max_examples=100, deadline=None)
@given(texts=st.lists(hostile, max_size=12))
def test_gigatokens_two_ways_to_encode_a_call_give_tiktokens_ids(texts):
    """``encode_batch`` (every call but a stream's first) and ``encode`` per text (the first); special tokens' text
    is plain text to it, as to ``encode_ordinary``."""
    fast = BpeEncode(documents(["x"]), backend="gigatoken")._fast
    expected = [ENC.encode_ordinary(t) for t in texts]
    for batch in (True, False):
        ids, counts = fast.encode(texts, batch=batch)
        assert ids.dtype == np.int32 and counts.tolist() == [len(e) for e in expected]
        assert ids.tolist() == [i for e in expected for i in e]


@pytest.mark.skipif("gigatoken" not in BACKENDS, reason="gigatoken is not installed or is disabled")
@pytest.mark.parametrize("batch_bytes", [1, 1 << 20])  # its own call (a batch encode), or in the first one
def test_a_lone_surrogate_is_a_stage_error_naming_the_record_in_any_call(batch_bytes):
    docs = [{"text": t, "source": "mem.jsonl", "record": i} for i, t in enumerate(["before", "a\ud800b", "after"])]
    with pytest.raises(StageError, match=r"file mem.jsonl, record 1: text is not valid Unicode"):
        list(Loader(BpeEncode(IterableWrapper(docs), backend="gigatoken", batch_bytes=batch_bytes)))


@pytest.mark.skipif("gigatoken" not in BACKENDS, reason="gigatoken is not installed or is disabled")
def test_auto_takes_gigatoken_when_it_is_there():
    assert BpeEncode(documents(["x"])).backend == "gigatoken"
    assert BpeEncode(documents(["x"]), backend="tiktoken").backend == "tiktoken"


def test_auto_without_gigatoken_is_tiktoken_with_a_notice(monkeypatch):
    monkeypatch.setenv("TEXTPIPE_GIGATOKEN", "0")
    with pytest.warns(UserWarning, match="gigatoken is disabled.*tiktoken"):
        node = BpeEncode(documents(["x"]))
    assert node.backend == "tiktoken"
    with pytest.raises(ValueError, match="backend `gigatoken`: gigatoken is disabled"):
        BpeEncode(documents(["x"]), backend="gigatoken")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)  # as if uninstalled
    monkeypatch.delenv("TEXTPIPE_GIGATOKEN")
    with pytest.warns(UserWarning, match="gigatoken is not installed"):
        assert BpeEncode(documents(["x"])).backend == "tiktoken"


def test_an_encoding_gigatoken_does_not_implement(cache_dir, tmp_path):
    files = {"p50k_base.tiktoken": p50k_file(tmp_path / "p50k_base.tiktoken")}
    if "gigatoken" in BACKENDS:
        with pytest.warns(UserWarning, match="does not implement encoding `p50k_edit`"):
            assert BpeEncode(documents(["x"]), encoding="p50k_edit", encoding_files=files).backend == "tiktoken"
    with pytest.raises(ValueError, match="backend `gigatoken`: gigatoken"):
        BpeEncode(documents(["x"]), encoding="p50k_edit", encoding_files=files, backend="gigatoken")
    with pytest.raises(ValueError, match="auto, tiktoken, gigatoken"):
        BpeEncode(documents(["x"]), backend="fast")


@pytest.mark.skipif("gigatoken" not in BACKENDS, reason="gigatoken is not installed or is disabled")
def test_gigatoken_is_built_anew_every_refresh_bytes():
    texts = random_texts(400, seed=7)
    node = BpeEncode(documents(texts), backend="gigatoken", batch_bytes=100, refresh_bytes=500)
    builds, new = [], node._fast._new
    node._fast._new = lambda: builds.append(1) or new()
    assert flat(list(Loader(node))) == book_stream(texts, ENC.encode_ordinary)
    size = sum(map(len, texts))
    assert size // 1000 < len(builds) <= 2 * (size // 500 + 2)  # per thread, one per ~500 characters


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="no /proc: resident memory is not read")
def test_resident_bytes_is_the_anonymous_rss_the_kernel_reports_and_follows_a_fork():
    def rss_anon() -> int:  # the kernel's own figure, in kB
        line = next(line for line in open("/proc/self/status") if line.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024

    before = fast_bpe.resident_bytes()
    assert abs(before - rss_anon()) < 4 << 20
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB of anonymous memory, touched
    assert fast_bpe.resident_bytes() - before > 60 << 20
    del block
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child opens its own statm, not the parent's descriptor
        value = fast_bpe.resident_bytes()
        os.write(writer, f"{value} {fast_bpe._STATM[0] == os.getpid()}".encode())
        os._exit(0)
    os.waitpid(pid, 0)
    value, reopened = os.read(reader, 100).decode().split()
    assert int(value) > 0 and reopened == "True"


class FakeRss:
    """``resident_bytes`` for a test: grows by ``per_read`` bytes at every read (a call reads it before and after,
    so a call's growth is ``per_read``)."""

    def __init__(self, per_read: int):
        self.per_read, self.value = per_read, 1 << 30

    def __call__(self) -> int:
        self.value += self.per_read
        return self.value


def counted_builds(node: BpeEncode) -> list:
    builds, new = [], node._fast._new
    node._fast._new = lambda: builds.append(1) or new()
    return builds


@pytest.mark.skipif("gigatoken" not in BACKENDS, reason="gigatoken is not installed or is disabled")
def test_gigatoken_is_built_anew_once_its_calls_grew_memory_by_cache_memory(monkeypatch):
    monkeypatch.setattr(fast_bpe, "_IDLE", {})
    monkeypatch.setattr(fast_bpe, "_PROC", True)
    monkeypatch.setattr(fast_bpe, "resident_bytes", FakeRss(per_read=5))  # +5 a call
    texts = random_texts(300, seed=11)
    node = BpeEncode(documents(texts), backend="gigatoken", batch_bytes=100, num_threads=1, cache_memory=20)
    builds = counted_builds(node)
    assert flat(list(Loader(node))) == book_stream(texts, ENC.encode_ordinary)
    calls = (fast_bpe.resident_bytes.value - (1 << 30)) // 10  # two reads a call
    assert calls > 8 and len(builds) == -(-calls // 4)  # a tokenizer serves 4 calls: 4 * 5 >= 20


@pytest.mark.skipif("gigatoken" not in BACKENDS, reason="gigatoken is not installed or is disabled")
def test_gigatoken_keeps_its_warm_cache_while_memory_does_not_grow(monkeypatch):
    monkeypatch.setattr(fast_bpe, "_IDLE", {})
    monkeypatch.setattr(fast_bpe, "_PROC", True)
    monkeypatch.setattr(fast_bpe, "resident_bytes", FakeRss(per_read=0))
    texts = random_texts(300, seed=12)
    node = BpeEncode(documents(texts), backend="gigatoken", batch_bytes=100, num_threads=1, cache_memory=20)
    builds = counted_builds(node)
    assert flat(list(Loader(node))) == book_stream(texts, ENC.encode_ordinary)
    assert len(builds) == 1  # the old rule (a new one every 32 MiB of text) cost a third of a 1 GB run's CPU


@pytest.mark.skipif("gigatoken" not in BACKENDS, reason="gigatoken is not installed or is disabled")
def test_without_proc_gigatoken_is_built_anew_after_cache_memory_over_bytes_per_character(monkeypatch):
    monkeypatch.setattr(fast_bpe, "_IDLE", {})
    monkeypatch.setattr(fast_bpe, "_PROC", False)
    monkeypatch.setattr(fast_bpe, "resident_bytes", lambda: None)
    texts = random_texts(300, seed=13)
    memory = 400 * fast_bpe.CACHE_BYTES_PER_CHARACTER  # a new tokenizer every 400 characters
    node = BpeEncode(documents(texts), backend="gigatoken", batch_bytes=100, num_threads=1, cache_memory=memory)
    builds = counted_builds(node)
    assert flat(list(Loader(node))) == book_stream(texts, ENC.encode_ordinary)
    size = sum(map(len, texts))
    assert size // 600 < len(builds) <= size // 400 + 1


@pytest.mark.skipif("gigatoken" not in BACKENDS, reason="gigatoken is not installed or is disabled")
def test_the_heap_is_trimmed_before_a_tokenizer_replaces_a_dropped_one(monkeypatch):
    events = []
    monkeypatch.setattr(fast_bpe, "_trim_heap", lambda: events.append("trim"))
    monkeypatch.setattr(fast_bpe, "_IDLE", {})  # no tokenizer of earlier tests in the pool, none dropped
    monkeypatch.setattr(fast_bpe, "_DROPPED", [])
    texts = random_texts(200, seed=8)
    node = BpeEncode(documents(texts), backend="gigatoken", batch_bytes=100, refresh_bytes=300, num_threads=1)
    new = node._fast._new
    node._fast._new = lambda: events.append("build") or new()
    assert flat(list(Loader(node))) == book_stream(texts, ENC.encode_ordinary)
    builds = events.count("build")
    assert builds > 3 and events[0] == "build" and events[1:] == ["trim", "build"] * (builds - 1)


@pytest.mark.skipif("gigatoken" not in BACKENDS, reason="gigatoken is not installed or is disabled")
def test_a_second_encoder_in_the_process_reuses_the_first_ones_tokenizers():
    texts = random_texts(200, seed=9)
    first = BpeEncode(documents(texts), backend="gigatoken", batch_bytes=100, num_threads=2)
    assert flat(list(Loader(first))) == book_stream(texts, ENC.encode_ordinary)
    second = BpeEncode(documents(texts), backend="gigatoken", batch_bytes=100, num_threads=2)
    builds, new = [], second._fast._new
    second._fast._new = lambda: builds.append(1) or new()
    assert flat(list(Loader(second))) == book_stream(texts, ENC.encode_ordinary)
    assert builds == []  # ~0.1 s each: a validation loader, or each create_dataloader_v1, builds none


def _encode_in_child(node, queue) -> None:
    queue.put(flat(list(Loader(node))))


@pytest.mark.timeout(60)
def test_an_encoder_used_before_a_fork_still_encodes_in_the_child(backend):
    texts = random_texts(300, seed=8)
    node = BpeEncode(documents(texts), backend=backend, batch_bytes=100)
    assert flat(list(Loader(node))) == book_stream(texts, ENC.encode_ordinary)  # the parent's pool is running
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_encode_in_child, args=(node, queue))
    child.start()
    assert queue.get(timeout=50) == book_stream(texts, ENC.encode_ordinary)
    child.join()


# --- blocks and document starts -----------------------------------------------------------------


def starts_of(items: list[dict]) -> list[int]:
    """Where each document starts in the whole stream, read through ``document_ids``."""
    out, at = [], 0
    for item in items:
        ids, starts = document_ids(item)
        out += (starts + at).tolist()
        at += len(ids)
    return out


@pytest.mark.parametrize("eot", [True, False])
def test_blocks_hold_the_same_stream_with_document_starts(backend, eot):
    texts = random_texts(600, seed=9)
    per_document = encode_all(texts, batch_bytes=300, backend=backend, eot=eot)
    blocks = encode_all(texts, batch_bytes=300, backend=backend, eot=eot, blocks=True)
    assert 5 < len(blocks) < len(texts)
    assert flat(blocks) == flat(per_document) == book_stream(texts, ENC.encode_ordinary, eot=eot)
    # each document starts after its separator; the book's stream, built plainly, says where
    expected, at = [], 0
    for i, text in enumerate(texts):
        at += bool(eot and i)
        expected.append(at)
        at += len(ENC.encode_ordinary(text))
    assert starts_of(blocks) == starts_of(per_document) == expected


def test_blocks_with_special_token_text_hold_the_per_document_stream(backend):
    """A text holding ``<|endoftext|>`` is a group of its own, encoded by tiktoken as plain text: its block
    still gets the separators the encode threads put in."""
    texts = random_texts(200, seed=14)
    texts[0] = EOT_TEXT + texts[0]
    texts[77] = texts[77] + EOT_TEXT + " tail"
    per_document = encode_all(texts, batch_bytes=300, backend=backend)
    blocks = encode_all(texts, batch_bytes=300, backend=backend, blocks=True)
    assert flat(blocks) == flat(per_document) == book_stream(texts, ENC.encode_ordinary)
    assert starts_of(blocks) == starts_of(per_document)


def test_pieces_of_one_file_start_one_document(shakespeare_path, backend):
    reader = lambda: ReadText([str(shakespeare_path)], chunk_bytes=4096)  # noqa: E731
    for blocks in (False, True):
        out = list(Loader(BpeEncode(reader(), batch_bytes=50_000, backend=backend, blocks=blocks)))
        assert len(out) > 3 and starts_of(out) == [0]


def test_blocks_over_a_reader_hold_the_per_document_stream_and_resume_exactly(tmp_path, backend):
    """A reader hands a block's documents over with ``next_many``: the same documents, counted alike."""
    write_arrow_corpus(tmp_path)
    texts = [d["text"] for d in ReadArrow(str(tmp_path))]
    per_document, blocks = (BpeEncode(ReadArrow(str(tmp_path)), batch_bytes=300, backend=backend, blocks=b)
                            for b in (False, True))
    items, block_items = list(Loader(per_document)), list(Loader(blocks))
    assert 3 < len(block_items) < len(items) == len(texts)
    assert flat(block_items) == flat(items) == book_stream(texts, ENC.encode_ordinary)
    assert starts_of(block_items) == starts_of(items)
    assert blocks.source.stats["items"] == per_document.source.stats["items"] == len(texts)
    reference = check_resume(lambda: BpeEncode(ReadArrow(str(tmp_path)), batch_bytes=300, backend=backend,
                                               blocks=True))
    assert len(reference) > 3


@pytest.mark.parametrize("fmt", ["file", "stream", "parquet", "large_string"])
def test_blocks_over_arrow_take_its_text_arrays_without_a_dict_or_string_a_row(tmp_path, backend, fmt, monkeypatch):
    """read_arrow hands a block's rows over as Arrow arrays (``read_rows``); gigatoken encodes them from
    Arrow's buffers: the same stream as per document, and a state saved between blocks resumes there."""
    write_arrow_corpus(tmp_path, fmt="file" if fmt == "large_string" else fmt)
    if fmt == "large_string":
        for path in tmp_path.glob("*.arrow"):
            table = ipc.open_file(pa.memory_map(str(path))).read_all()
            column = table.schema.get_field_index("text")
            table = table.set_column(column, "text", table["text"].cast(pa.large_string()))
            with ipc.new_file(str(path), table.schema) as writer:
                writer.write_table(table)
    texts = [d["text"] for d in ReadArrow(str(tmp_path))]
    per_document = list(Loader(BpeEncode(ReadArrow(str(tmp_path)), batch_bytes=300, backend=backend)))
    for name in ("_document", "_as_lists"):  # no document dict, no list of a unit's strings
        monkeypatch.setattr(ReadArrow, name, lambda *a: pytest.fail(f"ReadArrow.{name} was called"))
    node = BpeEncode(ReadArrow(str(tmp_path)), batch_bytes=300, backend=backend, blocks=True)
    blocks = list(Loader(node))
    assert len(blocks) > 5 and flat(blocks) == flat(per_document) == book_stream(texts, ENC.encode_ordinary)
    assert starts_of(blocks) == starts_of(per_document)
    assert node.source.stats["items"] == node.source.stats["documents"] == len(texts)
    plain = list(Loader(BpeEncode(ReadArrow(str(tmp_path)), batch_bytes=300, backend=backend, blocks=True, eot=False)))
    assert flat(plain) == book_stream(texts, ENC.encode_ordinary, eot=False)  # no separators, still no dict a row
    make = lambda: BpeEncode(ReadArrow(str(tmp_path)), batch_bytes=300, backend=backend, blocks=True)  # noqa: E731
    assert len(check_resume(make)) > 5


def test_arrow_rows_with_special_text_or_long_runs_are_encoded_as_per_document(tmp_path, backend):
    """A block of Arrow rows where a text holds ``<|endoftext|>`` or a whitespace run longer than
    ``MAX_RUN`` goes through the strings path (those texts are encoded by tiktoken, alone)."""
    texts = random_texts(60, seed=15)
    texts[3] = "before " + EOT_TEXT + " after"
    texts[40] = "run" + " " * (MAX_RUN + 5) + "end"
    path = tmp_path / "t.arrow"
    with ipc.new_file(str(path), pa.schema([("text", pa.string())])) as writer:
        for i in range(0, len(texts), 20):
            writer.write_batch(pa.record_batch({"text": texts[i : i + 20]}))
    per_document = list(Loader(BpeEncode(ReadArrow(str(path)), batch_bytes=300, backend=backend)))
    blocks = list(Loader(BpeEncode(ReadArrow(str(path)), batch_bytes=300, backend=backend, blocks=True)))
    assert flat(blocks) == flat(per_document) == book_stream(texts, ENC.encode_ordinary)
    assert starts_of(blocks) == starts_of(per_document)


def test_blocks_resume_exactly():
    texts = random_texts(300, seed=10)
    reference = check_resume(lambda: BpeEncode(documents(texts), batch_bytes=200, blocks=True))
    assert len(reference) > 5


R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's, for r50k_base.tiktoken


def test_gpt2_ranks_are_converted_once_then_read_from_tiktokens_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    files = encoding_module._packaged_gpt2_files()
    oracle = tiktoken.load.data_gym_to_mergeable_bpe_ranks(files["vocab.bpe"], files["encoder.json"])
    cached = encoding_module._cache_path(encoding_module.R50K_URL)

    def load():
        encoding_module._load.cache_clear()
        try:
            return encoding_module._load("gpt2", ())
        finally:
            encoding_module._load.cache_clear()

    assert load()._mergeable_ranks == oracle  # converted, and written to the cache
    with open(cached, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == R50K_SHA256
    with monkeypatch.context() as m:  # now read from the cache: no conversion
        m.setattr(tiktoken.load, "data_gym_to_mergeable_bpe_ranks", lambda *a, **k: pytest.fail("converted again"))
        assert load()._mergeable_ranks == oracle
    with open(cached, "r+b") as f:  # a damaged cache file fails tiktoken's check and is made again
        f.write(b"garbage")
    assert load()._mergeable_ranks == oracle
    with open(cached, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == R50K_SHA256


@pytest.mark.skipif("gigatoken" not in BACKENDS, reason="gigatoken is not installed or is disabled")
def test_gigatoken_over_cached_gpt2_ranks_builds_tiktokens_encoding_only_when_a_text_needs_it(monkeypatch):
    assert encoding_module.cached_rank_file("gpt2") is not None  # ENC's load left GPT-2's ranks in tiktoken's cache
    specials = {t: ENC.encode_single_token(t) for t in ENC.special_tokens_set}
    assert (encoding_module.R50K_SPECIALS, encoding_module.R50K_N_VOCAB) == (specials, ENC.n_vocab)
    loads, load = [], encoding_module._load
    monkeypatch.setattr(encoding_module, "_load", lambda *args: loads.append(args) or load(*args))
    plain = random_texts(50, seed=11)
    plain = [t.replace(EOT_TEXT, "") for t in plain]
    node = BpeEncode(documents(plain), backend="gigatoken", batch_bytes=64)
    assert (node.vocab_size, node.eot_id, node.allowed_special) == (ENC.n_vocab, EOT, set())
    assert flat(list(Loader(node))) == book_stream(plain, ENC.encode_ordinary) and loads == []
    special = [*plain[:5], f"a{EOT_TEXT}b", " c" * (MAX_RUN + 1)]
    assert flat(encode_all(special, backend="gigatoken")) == book_stream(special, ENC.encode_ordinary)
    assert loads == [("gpt2", ())]  # built once the text holding <|endoftext|> came
    allowed = BpeEncode(documents([f"a{EOT_TEXT}b"]), backend="gigatoken", allowed_special="all")
    assert flat(list(Loader(allowed))) == ENC.encode(f"a{EOT_TEXT}b", allowed_special="all")
    assert allowed.decode([EOT]) == EOT_TEXT


@pytest.mark.parametrize("pre", [0, 1, 6, 7, 13])
@pytest.mark.parametrize("run", [" ", "\n", "\u3000", " \t\xa0"])
@pytest.mark.parametrize("extra", [-1, 0, 1, 2, 9])
def test_long_run_check_agrees_with_the_regex(pre, run, extra):
    """has_long_run skips texts with no whitespace stretch between two multiples of its step: same answer."""
    max_run = 12
    text = "x" * pre + (run * 2 * max_run)[: max_run + extra] + "y" * (pre % 3)
    expected = re.search(f"[{WHITESPACE}]{{{max_run + 1},}}", text) is not None
    assert has_long_run(text, max_run) == expected == (extra > 0)
