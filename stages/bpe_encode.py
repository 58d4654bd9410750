"""``bpe_encode``: documents to tiktoken's token ids, many documents per call, with tiktoken or gigatoken."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import tiktoken

from pipeline.registry import register
from pipeline.schema import FieldError, Positive, check_field
from pipeline.stage import Stage, StageError
from stages.separators import (
    Separators,
    concatenated,
    document_text,
    mix_tokens,
    separated,
    split_joined,
    whole,
)
from stages.encoding import (
    EOT_TEXT,
    R50K_N_VOCAB,
    R50K_SHA256,
    R50K_SPECIALS,
    cached_rank_file,
    load_encoding,
)
from stages.fast_bpe import (
    BACKENDS,
    PRETOKENIZERS,
    HfTokenizer,
    TiktokenRanks,
    choose_backend,
    gigatoken_installed,
    rank_file,
)
from stages.runs import GPT2_PATTERN, MAX_RUN, UncuttableRun, cut_long_runs, has_long_run
from stages.text_rows import TextRows, offsets, text_data

CALLS_AHEAD = 2  # calls handed to the threads beyond the one being used (1: 0.75-1.3 s of 7 with no thread encoding)
FIRST_CALL_BYTES = 1 << 16  # text in the first encode call (a quick first item); each next call takes twice as much


@register("bpe_encode")
class BpeEncode(Stage[dict]):
    """Encodes documents to token ids (numpy ``int32``): a tiktoken encoding's ids, whatever the backend.

    Items out are dicts: ``ids`` and the document's other fields but ``text``. The token stream is
    the documents joined by ``<|endoftext|>`` (when ``eot``): its id starts every item after the first
    that does not continue the previous one (a piece of the same file starting at its ``end``). Short documents are
    joined into calls of about ``batch_bytes`` (tiktoken's per-call cost dominates on short texts)
    and the calls run on ``num_threads`` threads (tiktoken and gigatoken's ``encode_batch`` release the GIL).

    The ``gigatoken`` backend is 4-7x faster and exact: built from the encoding's own ranks, it
    encodes the same calls on the same threads; documents holding the text of ``<|endoftext|>`` or
    of an allowed special token are encoded by tiktoken as with the ``tiktoken`` backend.

    With ``tokenizer_file`` (a Hugging Face ``tokenizer.json``, byte-level BPE) gigatoken encodes
    with that file's vocabulary instead; its special tokens are plain text in documents, and the
    separator is the first of ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<|im_end|>``,
    ``<eos>`` among them.

    Args:
        encoding: a tiktoken encoding name, loaded offline (see ``stages.encoding``); default ``gpt2``.
        encoding_files: local copies of the encoding's files, by file name.
        eot: put ``<|endoftext|>`` between documents.
        allowed_special: special tokens to honour when their text appears in a document (``all``, one
            name, or a list); by default such text is encoded as plain text, safe for web text.
        num_threads: encode threads (both backends release the GIL while they encode).
        batch_bytes: text encoded per call (4 MiB; 1 MiB gave 41-44 M tokens/s against 50-59 on 1 GB of Arrow
            documents to batches, as each call costs the GIL-holding glue around it).
        backend: ``auto`` (gigatoken when it is installed and implements the encoding, else tiktoken
            with a notice), ``tiktoken`` or ``gigatoken``.
        cache_memory: memory (bytes of RSS) a gigatoken tokenizer's calls may add before a new one
            replaces it, as its cache of pre-tokens grows with every new word (bounded memory on any
            corpus; on ordinary text the cache stops growing and stays warm). Per encode thread.
        refresh_bytes: also replace a gigatoken tokenizer after this much text (none by default).
        tokenizer_file: a local Hugging Face ``tokenizer.json`` to encode with, instead of ``encoding``.
        blocks: give one item per call (all its documents' ids, with their starts: see
            ``stages.separators.document_ids``) instead of one per document; much less work downstream.
    """

    in_workers = True  # worth running in DataLoader worker processes
    consumes = "documents"
    produces = "tokens"

    def __init__(
        self,
        source,
        encoding: str | None = None,
        encoding_files: dict[str, str] | None = None,
        eot: bool = True,
        allowed_special: str | list[str] = (),
        num_threads: Positive = 2,
        batch_bytes: Positive = 1 << 22,
        backend: str = "auto",
        refresh_bytes: int | None = None,
        cache_memory: Positive = 1 << 27,
        tokenizer_file: str | None = None,
        blocks: bool = False,
    ):
        super().__init__()
        self.source = source
        self.tokenizer_file = tokenizer_file
        if refresh_bytes is not None:
            check_field("refresh_bytes", Positive, refresh_bytes)
        refresh = (refresh_bytes, cache_memory)
        if tokenizer_file is not None:
            self._hf_init(encoding, allowed_special, backend, refresh)
        else:
            self._tiktoken_init(encoding or "gpt2", encoding_files, allowed_special, backend, refresh)
        self.eot = eot
        self._separators = Separators(self.eot_id, eot)
        self.num_threads = num_threads
        self.batch_bytes = batch_bytes
        self.blocks = blocks
        self.block_rows = False  # not a config field: prepare's local engine asks blocks for their rows (Separators)
        self._pool: ThreadPoolExecutor | None = None

    def _tiktoken_init(self, encoding: str, files, allowed_special, backend: str, refresh: tuple) -> None:
        # gigatoken over GPT-2's cached ranks needs no tiktoken Encoding (~0.15 s before the first item): that
        # one is built when a text needs it (special-token text, a long whitespace run) or to decode
        self.backend = choose_backend(backend, encoding) if encoding in PRETOKENIZERS else None
        ranks = cached_rank_file(encoding) if self.backend == "gigatoken" and not files else None
        # sha256 of the ranks as a .tiktoken file lists them (prepare records it), when known without the Encoding
        self.ranks_sha256 = None
        if ranks is not None:
            specials, self.vocab_size = R50K_SPECIALS, R50K_N_VOCAB  # the cached file is r50k's ranks
            self._encoding = None
            self.ranks_sha256 = R50K_SHA256  # that file is that listing (tiktoken's r50k_base.tiktoken, checked)
        else:
            self._encoding = load_encoding(encoding, files)
            specials = {t: self._encoding.encode_single_token(t) for t in self._encoding.special_tokens_set}
            self.vocab_size = self._encoding.n_vocab  # ids it can produce, checked against an embed's table
            self.backend = self.backend or choose_backend(backend, encoding)
        self.encoding_name, self._encoding_files = encoding, files
        special = set(specials)
        one = isinstance(allowed_special, str) and allowed_special != "all"  # a token's name, not its characters
        names = {allowed_special} if one else set(allowed_special)
        self.allowed_special = special if allowed_special == "all" else names
        if not self.allowed_special <= special:
            raise FieldError(
                "allowed_special",
                f"allowed_special {sorted(self.allowed_special - special)} not in encoding `{encoding}` "
                f"({sorted(special)})",
            )
        self._exact = {EOT_TEXT} | self.allowed_special  # texts holding these go to tiktoken alone
        self.eot_id = specials[EOT_TEXT]
        if self.backend == "gigatoken":
            ranks = ranks or rank_file(self.encoding)
            self._fast = TiktokenRanks(ranks, PRETOKENIZERS[encoding], *refresh)
        else:
            self._fast = None

    @property
    def encoding(self) -> tiktoken.Encoding | None:
        """The tiktoken encoding (``None`` with a ``tokenizer_file``), built on first use if not at the start."""
        if self._encoding is None and self.tokenizer_file is None:
            self._encoding = load_encoding(self.encoding_name, self._encoding_files)
        return self._encoding

    def _hf_init(self, encoding: str | None, allowed_special, backend: str, refresh: tuple) -> None:
        where = f"tokenizer_file {self.tokenizer_file!r}"
        if encoding is not None:
            raise FieldError("encoding", f"give encoding or tokenizer_file, not both (encoding {encoding!r}, {where})")
        if allowed_special:
            raise FieldError(
                "allowed_special",
                f"allowed_special is not supported with a tokenizer_file: its special tokens are plain text ({where})",
            )
        if backend == "tiktoken" or not gigatoken_installed():
            raise FieldError(
                "backend",
                f"{where} is encoded by gigatoken, which is "
                f"{'not chosen' if backend == 'tiktoken' else 'not installed'}",
            )
        if backend not in BACKENDS:
            raise FieldError("backend", f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.encoding_name, self._encoding, self.backend, self.ranks_sha256 = None, None, "gigatoken", None
        self.allowed_special, self._exact = set(), set()
        self._fast = HfTokenizer(self.tokenizer_file, *refresh)
        self.eot_id, self.vocab_size = self._fast.eot_id, self._fast.vocab_size

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        for call in getattr(self, "_calls", ()):  # encodes of the stream before: not wanted
            call.cancel()
        self._pending: deque[tuple[dict, dict, np.ndarray]] = deque()  # (source state before, doc, ids)
        self._calls: deque[_Call] = deque()  # read and handed to the threads, not yet taken
        self._goal = FIRST_CALL_BYTES  # text per call: small first (a quick first item), doubling to batch_bytes
        if initial_state is None:
            self.source.reset()
        else:
            self.source.reset(initial_state["source"])
        self._separators.previous = initial_state["previous"] if initial_state is not None else None

    def get_state(self) -> dict[str, Any]:
        if self._pending:
            head = self._pending[0][0]
        elif self._calls and self._calls[0].states:
            head = self._calls[0].states[0]
        else:
            head = self.source.state_dict()
        return {"source": head, "previous": self._separators.previous}

    def next(self) -> dict:
        if self.blocks:  # the whole call: the state stays "before its first document"
            call, ids, lengths = self._take_call()
            return self._separators.block(call.docs, ids, lengths, self.stats, self.block_rows, call.heads)
        if not self._pending:
            call, ids, lengths = self._take_call()
            ends = np.cumsum(lengths).tolist()
            pieces = [ids[end - n : end] for n, end in zip(lengths.tolist(), ends)]
            self._pending.extend(zip(call.states, call.docs, pieces))
        _, doc, ids = self._pending.popleft()
        return self._separators.item(doc, ids, self.stats)

    def _take_call(self) -> tuple[_Call, np.ndarray, np.ndarray]:
        """The oldest call and its ids (see ``_Call.result``), waited for having handed up to ``CALLS_AHEAD`` next
        calls to the threads first (not past the stream's end): the threads encode them while this thread reads
        documents and the stages downstream use this call's items. Not before the stream's first item: a second
        thread building its tokenizer would delay it."""
        first = not self._calls and self._goal == FIRST_CALL_BYTES
        if not self._calls:
            self._read_call()
        call = self._calls.popleft()
        while call.docs and not first and len(self._calls) < CALLS_AHEAD and (not self._calls or self._calls[-1].docs):
            self._read_call()
        return (call, *call.result(self))

    def _read_call(self) -> None:
        """Read about ``batch_bytes * num_threads`` of text and hand it to the threads (a read error is kept
        for when the calls before it are taken, as if read then)."""
        docs, states, size = [], [], 0
        goal, first = min(self._goal, self.batch_bytes * self.num_threads), self._goal == FIRST_CALL_BYTES
        self._goal *= 2
        try:
            if self.blocks and isinstance(self.source, Stage):  # a block's state is the one before its first document
                states.append(self.source.state_dict())
                docs = self.source.read_rows(goal) or self.source.next_many(goal, self._text_size)  # rows: read_arrow
            else:  # one at a time, with the state before each (a block: before the first)
                while size < goal:
                    if not self.blocks or not states:
                        states.append(self.source.state_dict())
                    try:
                        doc = next(self.source)
                    except StopIteration:
                        break
                    size += self._text_size(doc)
                    docs.append(doc)
        except Exception as e:  # noqa: BLE001 - raised from the call's place in the stream
            self._calls.append(_Call(states[:1], [], [], e))
            return
        states = states[: len(docs)] if docs else []
        # gigatoken's batch encode (GIL-free, needs awkward: see FastBpe.encode) but for the stream's first call, which
        # awkward's import (~0.2 s) would delay; in DataLoader workers too (2 workers, 1 GB: 33-36 -> 36-42 M tokens/s)
        batch = not first
        rows = isinstance(docs, TextRows)
        heads = self.blocks and self.eot and whole(docs)  # the threads put the separators in
        if not docs:
            futures = []
        elif rows and batch and self._fast is not None:
            futures = self._submit_arrays(docs, heads)
        else:
            futures = self._submit(docs.texts() if rows else [d["text"] for d in docs], batch, heads)
        self._calls.append(_Call(states, docs, futures, heads=heads))

    def _text_size(self, doc: dict) -> int:
        return len(document_text(self, doc))

    def _submit_arrays(self, rows: TextRows, heads: bool) -> list[Future]:
        """``_submit`` for rows whose texts are Arrow arrays: gigatoken encodes them from Arrow's buffers, in
        groups of about ``batch_bytes``; where a text needs a group of its own, as ``_submit`` does."""
        groups = []
        for texts in rows.arrays:
            ends = offsets(texts)
            long = np.diff(ends) > MAX_RUN  # in bytes, at least as many as characters
            data = text_data(texts) if self._exact else b""
            special = any(s.encode() in data for s in self._exact)
            if special or (long.any() and any(map(has_long_run, texts.filter(pa.array(long)).to_pylist()))):
                return self._submit(rows.texts(), True, heads)
            bounds = _group_bounds(ends[:-1] - ends[0], self.batch_bytes)
            groups += [texts.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]
        return [self._encode_pool().submit(self._encode_group, group, True, heads) for group in groups]

    def _encode_pool(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():  # a pool's threads do not survive a fork
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix=f"encode-{self.name}")
            self._pool_pid = os.getpid()
        return self._pool

    def _encode_group(self, group: list[str] | pa.Array, batch: bool, heads: bool) -> tuple[np.ndarray, np.ndarray]:
        """A group's ids and how many are each text's (see ``_submit``), each after a separator with ``heads``."""
        ids, lengths = self._encode_texts(group, batch)
        return separated(ids, lengths, self.eot_id) if heads else (ids, lengths)

    def _encode_texts(self, group: list[str] | pa.Array, batch: bool) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(group, pa.Array):
            return self._fast.encode(group)
        if len(group) == 1 and (self._fast is None or self._by_tiktoken(group[0])):
            return concatenated([self._encode_one(group[0])])
        if self._fast is not None:
            return self._fast.encode(group, batch=batch)
        ids = self.encoding.encode_to_numpy(EOT_TEXT.join(group), allowed_special={EOT_TEXT}, disallowed_special=())
        return split_joined(ids, self.eot_id)

    def _submit(self, texts: list[str], batch: bool, heads: bool) -> list[Future]:
        """Hand the texts to the encode threads: a future per group, whose results joined are each text's ids
        (gigatoken encodes with ``batch``, see ``FastBpe.encode``), with ``heads`` each after a separator."""
        # Texts go in groups of about batch_bytes (tiktoken joins a group's texts by <|endoftext|> and splits the
        # ids back at its id); a text holding that literal string, or a whitespace run too long for tiktoken, is a
        # group of its own, encoded by tiktoken whatever the backend (see _by_tiktoken).
        joined = "".join(texts)  # one scan finds that no text needs a group of its own (almost always)
        if not self._has_special(joined) and not has_long_run(joined):
            lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
            bounds = _group_bounds(np.cumsum(lengths) - lengths, self.batch_bytes)
        else:
            bounds, size = [0], 0
            for i, text in enumerate(texts):
                alone = self._has_special(text) or has_long_run(text)
                if i > bounds[-1] and (alone or size + len(text) > self.batch_bytes):
                    bounds.append(i)
                    size = 0
                size += len(text)
                if alone:
                    bounds.append(i + 1)
                    size = 0
            bounds.append(len(texts))

        groups = [texts[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        return [self._encode_pool().submit(self._encode_group, group, batch, heads) for group in groups]

    def _failed(self, docs: list[dict], error: Exception) -> Exception:
        """The stage's error for a failed encode of ``docs``, or ``error`` itself when it is not ours to explain."""
        if isinstance(error, UncuttableRun):
            return self._uncuttable(next(d for d in docs if d["text"] is error.text), error)
        bad, e = next(((d, _utf8_error(d["text"])) for d in docs if _utf8_error(d["text"])), (None, None))
        if not isinstance(error, (UnicodeEncodeError, TypeError)) or bad is None:
            return error  # a lone surrogate has no UTF-8 to encode: gigatoken says TypeError, tiktoken the other
        where = f"record {bad['record']}" if "record" in bad else f"byte {bad['offset']}" if "offset" in bad else None
        text_error = f"text is not valid Unicode ({e.reason}, character {e.object[e.start : e.end]!r})"
        return self.error(text_error, bad.get("source"), where)

    def metrics(self) -> dict[str, float]:
        return mix_tokens(self.stats)  # tokens per input of a mix upstream

    def decode(self, ids) -> str:
        """The text of token ids (for showing windows)."""
        if self.tokenizer_file is not None:
            return self._fast.decode(ids)
        return self.encoding.decode([int(i) for i in ids])

    def _has_special(self, text: str) -> bool:
        return any(special in text for special in self._exact)

    def _by_tiktoken(self, text: str) -> bool:
        """A text of a call of its own that tiktoken encodes whatever the backend: special text, or a
        whitespace run too long for one call (cut where ``stages.runs`` proves the tokens unchanged)."""
        return self._has_special(text) or (self.tokenizer_file is None and has_long_run(text))

    def _encode_one(self, text: str) -> np.ndarray:
        pieces = cut_long_runs(text, self.encoding)  # [text] but where a whitespace run is too long for tiktoken
        ids = [
            self.encoding.encode_to_numpy(p, allowed_special=self.allowed_special, disallowed_special=())
            for p in pieces
        ]
        return np.concatenate(ids).astype(np.int32)

    def _uncuttable(self, doc: dict, e: UncuttableRun) -> StageError:
        text = doc["text"]
        if "offset" in doc:
            where = f"byte {doc['offset'] + len(text[: e.index].encode('utf-8', 'surrogatepass')):,}"
        else:
            where = (f"record {doc['record']}, " if "record" in doc else "") + f"character {e.index:,}"
        why = (
            f"no point within {MAX_RUN:,} characters where a cut provably leaves its tokens as they are"
            if self.encoding_name in GPT2_PATTERN
            else f"cuts are proven for GPT-2's pattern only, not `{self.encoding_name}`'s"
        )
        return self.error(
            f"a run of {e.length:,} whitespace characters is too long for tiktoken's regex (it fails near "
            f"1,000,000) and has {why}; shorten the run in the corpus",
            doc.get("source"),
            where,
        )


class _Call:
    """Documents handed to the encode threads together: the source's state before each (before the
    first only, for blocks), the documents, the futures of their groups, or the error reading them."""

    def __init__(
        self, states: list[dict], docs: list[dict], futures: list[Future], error: Exception | None = None, heads=False
    ):
        self.states, self.docs, self.futures, self.error, self.heads = states, docs, futures, error, heads

    def result(self, stage: BpeEncode) -> tuple[np.ndarray, np.ndarray]:
        """The documents' ids one after another and how many are each one's, waiting for the threads; the
        read or encode error as the stage's error."""
        if self.error is not None:
            raise self.error
        if not self.docs:
            raise StopIteration
        try:
            groups = [future.result() for future in self.futures]
            return np.concatenate([ids for ids, _ in groups]), np.concatenate([n for _, n in groups])
        except Exception as e:  # noqa: BLE001 - explained by the stage where it can be
            error = stage._failed(self.docs, e)
            if error is e:
                raise
            raise error from None

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()


def _group_bounds(starts: np.ndarray, size: int) -> list[int]:
    """Where groups of about ``size`` begin among texts beginning at ``starts`` (in characters or bytes),
    and where the last ends: a text goes with those whose start falls in the same ``size`` of the stream."""
    cuts = np.flatnonzero(np.diff(starts // size)) + 1
    return [0, *cuts.tolist(), len(starts)]


def _utf8_error(text: str) -> UnicodeEncodeError | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e
    return None
