"""gigatoken, the fast exact backend of ``bpe_encode``, built from a tiktoken encoding's own ranks."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import tempfile
import threading
import warnings

import numpy as np
import pyarrow as pa
import tiktoken

from pipeline.schema import FieldError, MissingFileError
from stages.separators import concatenated
from stages.text_rows import awkward_strings, text_bytes

BACKENDS = ("auto", "tiktoken", "gigatoken")
DISABLE_ENV = "TEXTPIPE_GIGATOKEN"  # set to 0: behave as if gigatoken were not installed (tests, CI)
# gigatoken's pre-tokenizer for each tiktoken encoding whose split pattern it implements (tiktoken_ext.openai_public);
# p50k's ranks leave a hole at 50256, which gigatoken's rank loader refuses.
PRETOKENIZERS = {"gpt2": "gpt2", "r50k_base": "gpt2", "cl100k_base": "gpt4", "o200k_base": "o200k"}


def gigatoken_installed() -> bool:
    """Whether gigatoken can be imported and is not disabled by ``TEXTPIPE_GIGATOKEN=0``."""
    return os.environ.get(DISABLE_ENV, "1") != "0" and importlib.util.find_spec("gigatoken") is not None


def choose_backend(backend: str, encoding: str) -> str:
    """The backend ``bpe_encode`` uses: ``tiktoken`` or ``gigatoken``.

    ``auto`` takes gigatoken when it is installed and implements the encoding, else tiktoken with a
    one-line notice; asking for ``gigatoken`` where it cannot serve is a ``FieldError`` (a ``ValueError``).
    """
    if backend not in BACKENDS:
        raise FieldError("backend", f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "tiktoken":
        return backend
    if os.environ.get(DISABLE_ENV) == "0":
        why = f"gigatoken is disabled by {DISABLE_ENV}=0"
    elif not gigatoken_installed():
        why = "gigatoken is not installed"
    elif encoding not in PRETOKENIZERS:
        why = f"gigatoken does not implement encoding `{encoding}` (it does {', '.join(PRETOKENIZERS)})"
    else:
        return "gigatoken"
    if backend == "gigatoken":
        raise FieldError("backend", f"backend `gigatoken`: {why}")
    warnings.warn(f"bpe_encode: {why}; encoding with tiktoken (exact, slower)", stacklevel=3)
    return "tiktoken"


_IDLE: dict[tuple, list[list]] = {}  # per build key: [tokenizer, characters encoded, thread], none in use
_IDLE_LOCK = threading.Lock()
os.register_at_fork(after_in_child=_IDLE.clear)  # a parent's tokenizers (their thread pools) are not a child's
_DROPPED = []  # a tokenizer was dropped since the last build: its freed cache is to be handed back


def _trim_heap() -> None:
    """Hand the heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    A dropped tokenizer's cache is freed into its thread's malloc arena, where glibc keeps it: with the
    encode threads running side by side, peak RSS grew 1.28x from a 100 MB to a 2 GB corpus without this,
    1.02x with it (``benchmarks/memory.py``)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # ctypes lets go of the GIL for the call
    except (AttributeError, OSError):  # not glibc
        pass


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CACHE_BYTES_PER_CHARACTER = 16  # gigatoken's cache on never-repeating words: 26 M characters took ~500 MB
_STATM: list = [None, None]  # [pid, file descriptor of /proc/self/statm]: kept open (an open() costs ~10 us)


def resident_bytes() -> int | None:
    """This process's anonymous resident memory (RSS less file-backed and shared pages: memory-mapped
    corpus files come and go) in bytes, or None where it cannot be read (no ``/proc``)."""
    try:
        if _STATM[0] != os.getpid():  # first call, or a forked child: the parent's descriptor is not its own
            _STATM[:] = [os.getpid(), os.open("/proc/self/statm", os.O_RDONLY)]
        fields = os.pread(_STATM[1], 128, 0).split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, IndexError, ValueError, AttributeError):  # AttributeError: no os.pread
        return None


_PROC = resident_bytes() is not None


class FastBpe:
    """gigatoken's BPE: tokenizers lent to encode calls from a pool of the process, each dropped once its
    calls have grown the process's memory by ``cache_memory`` (or after ``refresh_bytes`` characters).

    A gigatoken tokenizer encodes on one thread at a time (it says "Already borrowed" otherwise), so a
    call borrows one and gives it back; building one costs ~0.1 s, so the pool is the process's: every
    stage with the same ranks (a validation loader, each ``create_dataloader_v1``) reuses them. Its
    pre-token cache grows with every new word and never forgets one (450 MB of never-repeating words took
    RSS to 3.6 GB), so a tokenizer is dropped, not given back, once the anonymous resident memory (RSS) the
    process gained during its calls adds up to ``cache_memory`` bytes (growth on other threads meanwhile
    counts too: it errs towards dropping early). On ordinary text, whose words come back, the cache stops
    growing and the tokenizer keeps its warm cache: a rebuild and its cold cache cost ~0.2 s of CPU, and
    rebuilding every 32 MiB of text took a third of a 1 GB run's CPU.
    Where RSS cannot be read (no ``/proc``), a tokenizer is dropped after ``cache_memory /
    CACHE_BYTES_PER_CHARACTER`` characters; ``refresh_bytes``, when given, drops it after that many characters
    too. A forked DataLoader worker starts with an empty pool. Subclasses say how to build one (``_new``),
    under which ``key``, and how to encode a group of texts.
    """

    def __init__(self, refresh_bytes: int | None, key: tuple, cache_memory: int = 1 << 27):
        self.refresh_bytes, self.key, self.cache_memory = refresh_bytes, key, cache_memory

    @contextlib.contextmanager
    def tokenizer(self, nbytes: int):
        """A tokenizer to encode ``nbytes`` characters with on this thread: an idle one, or a new one."""
        here = threading.get_ident()
        with _IDLE_LOCK:  # this thread's own first: its cache grew in this thread's malloc arena
            idle = _IDLE.get(self.key) or []
            lent = next((t for t in idle if t[2] == here), idle[-1] if idle else None)
            if lent is not None:
                idle.remove(lent)
        if lent is None:
            if _DROPPED:  # the dropped one is gone by now (its last user has returned)
                _DROPPED.clear()
                _trim_heap()
            lent = [self._new(), 0, here, 0]  # [tokenizer, characters, thread, RSS its calls added]
        lent[2] = here
        before = resident_bytes()
        yield lent[0]
        after = resident_bytes()
        lent[1] += nbytes
        if before is not None and after is not None:  # counts the other threads' growth too: errs on the safe side
            lent[3] += max(after - before, 0)
        with _IDLE_LOCK:
            if self._keeps(lent[1], lent[3]):
                _IDLE.setdefault(self.key, []).append(lent)
            else:  # dropped with its cache
                _DROPPED.append(True)

    def _keeps(self, characters: int, grown: int) -> bool:
        """Whether a tokenizer that has encoded ``characters``, during whose calls RSS grew by ``grown``, is kept."""
        if self.refresh_bytes is not None and characters >= self.refresh_bytes:
            return False
        if _PROC:
            return grown < self.cache_memory
        return characters < self.cache_memory // CACHE_BYTES_PER_CHARACTER

    def encode(self, texts: list[str] | pa.Array, batch: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The texts' ids (``int32``) one after another, as if encoded one by one, and how many are each
        text's.

        With ``batch``, gigatoken 0.10's ``encode_batch(parallel=False)``: it lets go of the GIL while it
        encodes on the calling thread, so the encode threads run side by side and beside the pipeline's own
        (measured on 100 MB, 2 cores: 2 threads 0.19 s, 1 thread 0.36 s). Else ``encode`` per text, which
        holds the GIL (2 threads no faster than 1) but needs no awkward: ``encode_batch`` gives its ids as an
        awkward array, and importing awkward (~0.25 s) would delay a stream's first item.
        """
        arrow = isinstance(texts, pa.Array)  # a string array (no nulls): encoded from its own buffers
        with self.tokenizer(text_bytes(texts) if arrow else sum(map(len, texts))) as tokenizer:
            if not batch:
                return concatenated([tokenizer.encode(text) for text in texts])
            ids = tokenizer.encode_batch(awkward_strings(texts) if arrow else texts, parallel=False)
        # a list of uint32 lists: its buffers, read off the layout (ak.num/ak.flatten cost ~50x more, holding the GIL)
        ends = np.asarray(ids.layout.offsets.data, dtype=np.int64)
        flat = np.asarray(ids.layout.content.data).view(np.int32)[ends[0] : ends[-1]]  # ids < 2**31: the same values
        return flat, np.diff(ends)

    def _new(self):
        raise NotImplementedError


def rank_file(encoding: tiktoken.Encoding) -> bytes:
    """The encoding's ranks as a ``.tiktoken`` file, read through its public API (~1 s for GPT-2)."""
    specials = {encoding.encode_single_token(s) for s in encoding.special_tokens_set}
    ranks = ((encoding.decode_single_token_bytes(i), i) for i in range(encoding.n_vocab) if i not in specials)
    return b"".join(base64.b64encode(token) + b" %d\n" % i for token, i in ranks)


class TiktokenRanks(FastBpe):
    """gigatoken over the ranks of a tiktoken encoding: the same ids as its ``encode_ordinary``.

    Args:
        ranks: the encoding's ranks as a ``.tiktoken`` file (see ``rank_file``), specials left out.
        pretokenizer: gigatoken's name for the encoding's split pattern (see ``PRETOKENIZERS``).
        refresh_bytes, cache_memory: when a tokenizer is replaced (see ``FastBpe``).
    """

    def __init__(self, ranks: bytes, pretokenizer: str, refresh_bytes: int | None = None, cache_memory: int = 1 << 27):
        super().__init__(refresh_bytes, (pretokenizer, hashlib.sha256(ranks).digest()), cache_memory)
        self._rank_file, self.pretokenizer = ranks, pretokenizer

    def _new(self):
        import gigatoken

        with tempfile.TemporaryDirectory(prefix="textpipe-ranks-") as folder:
            path = os.path.join(folder, "ranks.tiktoken")
            with open(path, "wb") as f:
                f.write(self._rank_file)
            # no special tokens: their text is plain text, as tiktoken's encode_ordinary takes it
            return gigatoken.Tokenizer.from_tiktoken(path, pretokenizer=self.pretokenizer, special_tokens={})


class HfTokenizer(FastBpe):
    """gigatoken over a local Hugging Face ``tokenizer.json`` (byte-level BPE), read offline.

    Special tokens (``added_tokens`` marked ``special``) are plain text inside documents: the file
    is loaded without them, so ``<|endoftext|>`` in a text is encoded as its characters. The document
    separator is the first of ``SEPARATORS`` among the file's special tokens.

    Args:
        path: the ``tokenizer.json`` file.
        refresh_bytes, cache_memory: when a tokenizer is replaced (see ``FastBpe``).
    """

    SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>")

    def __init__(self, path: str, refresh_bytes: int | None = None, cache_memory: int = 1 << 27):
        if not os.path.isfile(path):
            raise MissingFileError("tokenizer_file", f"tokenizer_file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        added = config.get("added_tokens") or []
        specials = {t["content"]: t["id"] for t in added if t.get("special")}
        separator = next((s for s in self.SEPARATORS if s in specials), None)
        if separator is None:
            raise FieldError(
                "tokenizer_file",
                f"tokenizer_file {path!r}: no document separator among its special tokens {sorted(specials)} "
                f"(looked for {', '.join(self.SEPARATORS)})",
            )
        self.path, self.separator, self.eot_id = path, separator, specials[separator]
        self.vocab_size = max([*config["model"]["vocab"].values(), *(t["id"] for t in added)]) + 1
        self._plain = json.dumps({**config, "added_tokens": [t for t in added if not t.get("special")]})
        super().__init__(refresh_bytes, ("tokenizer.json", hashlib.sha256(self._plain.encode()).digest()), cache_memory)
        self._decoder = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_decoder": None}

    def _new(self):
        import gigatoken

        return gigatoken.Tokenizer.from_json(self._plain)

    def decode(self, ids) -> str:
        """The text of token ids, separators included."""
        import gigatoken

        if self._decoder is None:
            self._decoder = gigatoken.Tokenizer(self.path)
        return self._decoder.decode(np.asarray(ids, dtype=np.uint32)).decode("utf-8", errors="replace")
