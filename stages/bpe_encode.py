"""``bpe_encode``: documents to token ids with tiktoken, many documents per call, on several threads."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.registry import register
from pipeline.schema import FieldError, Positive
from pipeline.stage import Stage, StageError
from stages.separators import Separators, mix_tokens
from stages.encoding import EOT_TEXT, load_encoding
from stages.runs import GPT2_PATTERN, MAX_RUN, UncuttableRun, cut_long_runs, has_long_run


@register("bpe_encode")
class BpeEncode(Stage[dict]):
    """Encodes documents to token ids (numpy ``int32``) with a tiktoken encoding.

    Items out are dicts: ``ids`` and the document's other fields but ``text``. The token stream is
    the documents joined by ``<|endoftext|>`` (when ``eot``): its id starts every item after the first
    that does not continue the previous one (a piece of the same file starting at its ``end``). Short documents are
    joined into calls of about ``batch_bytes`` (tiktoken's per-call cost dominates on short texts)
    and the calls run on ``num_threads`` threads (tiktoken releases the GIL).

    Args:
        encoding: a tiktoken encoding name, loaded offline (see ``stages.encoding``).
        encoding_files: local copies of the encoding's files, by file name.
        eot: put ``<|endoftext|>`` between documents.
        allowed_special: special tokens to honour when their text appears in a document (``all``, one
            name, or a list); by default such text is encoded as plain text, safe for web text.
        num_threads: encode threads.
        batch_bytes: text encoded per call.
    """

    in_workers = True  # worth running in DataLoader worker processes
    consumes = "documents"
    produces = "tokens"

    def __init__(
        self,
        source,
        encoding: str = "gpt2",
        encoding_files: dict[str, str] | None = None,
        eot: bool = True,
        allowed_special: str | list[str] = (),
        num_threads: Positive = 2,
        batch_bytes: Positive = 1 << 20,
    ):
        super().__init__()
        self.source = source
        self.encoding = load_encoding(encoding, encoding_files)
        special = self.encoding.special_tokens_set
        one = isinstance(allowed_special, str) and allowed_special != "all"  # a token's name, not its characters
        names = {allowed_special} if one else set(allowed_special)
        self.allowed_special = special if allowed_special == "all" else names
        if not self.allowed_special <= special:
            raise FieldError(
                "allowed_special",
                f"allowed_special {sorted(self.allowed_special - special)} not in encoding `{encoding}` "
                f"({sorted(special)})"
            )
        self.eot_id = self.encoding.eot_token
        self.vocab_size = self.encoding.n_vocab  # ids it can produce, checked against an embed's table
        self.eot = eot
        self._separators = Separators(self.eot_id, eot)
        self.num_threads = num_threads
        self.batch_bytes = batch_bytes
        self._pool: ThreadPoolExecutor | None = None

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self._pending: deque[tuple[dict, dict, np.ndarray]] = deque()  # (source state before, doc, ids)
        if initial_state is None:
            self.source.reset()
        else:
            self.source.reset(initial_state["source"])
        self._separators.previous = initial_state["previous"] if initial_state is not None else None

    def get_state(self) -> dict[str, Any]:
        head = self._pending[0][0] if self._pending else self.source.state_dict()
        return {"source": head, "previous": self._separators.previous}

    def next(self) -> dict:
        if not self._pending:
            self._encode_next_batch()
        _, doc, ids = self._pending.popleft()
        return self._separators.item(doc, ids, self.stats)

    def _encode_next_batch(self) -> None:
        docs, states, size = [], [], 0
        while size < self.batch_bytes * self.num_threads:
            states.append(self.source.state_dict())
            try:
                doc = next(self.source)
            except StopIteration:
                states.pop()
                break
            text = doc.get("text") if isinstance(doc, dict) else None
            if not isinstance(text, str):
                raise self.error(
                    f"expected a document dict with a `text` string, got {type(text).__name__}",
                    doc.get("source") if isinstance(doc, dict) else None,
                    doc.get("record") if isinstance(doc, dict) else None,
                )
            docs.append(doc)
            size += len(text)
        if not docs:
            raise StopIteration
        try:
            ids = self._encode([d["text"] for d in docs])
        except UnicodeEncodeError as e:  # a lone surrogate: such a str has no UTF-8 to encode
            bad = next(d for d in docs if not _is_utf8(d["text"]))
            where = (
                f"record {bad['record']}" if "record" in bad else f"byte {bad['offset']}" if "offset" in bad else None
            )
            raise self.error(
                f"text is not valid Unicode ({e.reason}, character {e.object[e.start : e.end]!r})",
                bad.get("source"),
                where,
            ) from None
        except UncuttableRun as e:
            raise self._uncuttable(next(d for d in docs if d["text"] is e.text), e) from None
        self._pending.extend(zip(states, docs, ids))

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text, as if encoded one by one."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix=f"encode-{self.name}")
        # Join texts into about batch_bytes per call, separated by <|endoftext|> and split back at
        # its id; a text holding that literal string is a call of its own, so the split stays exact.
        groups: list[list[int]] = [[]]
        size = 0
        for i, text in enumerate(texts):
            alone = self._has_special(text) or has_long_run(text)
            if groups[-1] and (alone or size + len(text) > self.batch_bytes):
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += len(text)
            if alone:
                groups.append([])
                size = 0

        def encode_group(group: list[int]) -> list[np.ndarray]:
            if len(group) == 1:
                return [self._encode_one(texts[group[0]])]
            joined = self.encoding.encode_to_numpy(
                EOT_TEXT.join(texts[i] for i in group), allowed_special={EOT_TEXT}, disallowed_special=()
            )
            first, *rest = np.split(joined.astype(np.int32), np.flatnonzero(joined == self.eot_id))
            return [first] + [piece[1:] for piece in rest]  # each later piece starts with the separator

        out: list[np.ndarray] = []
        for pieces in self._pool.map(encode_group, [g for g in groups if g]):
            out.extend(pieces)
        return out

    def metrics(self) -> dict[str, float]:
        return mix_tokens(self.stats)  # tokens per input of a mix upstream

    def decode(self, ids) -> str:
        """The text of token ids (for showing windows)."""
        return self.encoding.decode([int(i) for i in ids])

    def _has_special(self, text: str) -> bool:
        return EOT_TEXT in text or any(special in text for special in self.allowed_special)

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
            if self.encoding.name in GPT2_PATTERN
            else f"cuts are proven for GPT-2's pattern only, not `{self.encoding.name}`'s"
        )
        return self.error(
            f"a run of {e.length:,} whitespace characters is too long for tiktoken's regex (it fails near "
            f"1,000,000) and has {why}; shorten the run in the corpus",
            doc.get("source"),
            where,
        )


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
