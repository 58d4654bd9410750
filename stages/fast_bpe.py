"""gigatoken, the fast exact backend of ``bpe_encode``, built from a tiktoken encoding's own ranks."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import tempfile
import threading
import warnings

import numpy as np
import tiktoken
from tiktoken_ext.openai_public import ENDOFTEXT as EOT_TEXT

from pipeline.schema import FieldError, MissingFileError
from stages.encoding import cached_rank_file
from stages.separators import split_joined

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


class FastBpe:
    """gigatoken's BPE: a tokenizer per thread and process, built anew every ``refresh_bytes``.

    A gigatoken tokenizer encodes on one thread at a time (it says "Already borrowed" otherwise), so
    each encode thread builds its own, in the process that encodes (a DataLoader worker builds its
    own after the fork). Its pre-token cache grows without bound (450 MB of never-repeating words
    took RSS to 3.6 GB), so new ones (~0.1 s each) replace them every ``refresh_bytes`` characters
    of text. Subclasses say how to build one (``_new``) and how to encode a group of texts.
    """

    def __init__(self, refresh_bytes: int):
        self.refresh_bytes = refresh_bytes
        self._generation, self._since_build = 0, 0
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_local": None}  # a process builds its own tokenizers

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _local=threading.local())

    def count(self, nbytes: int) -> None:
        """Say that ``nbytes`` characters are about to be encoded (from the thread that hands out the work)."""
        if self._since_build > self.refresh_bytes:
            self._generation, self._since_build = self._generation + 1, 0
        self._since_build += nbytes

    def tokenizer(self):
        """This thread's tokenizer, built anew when due."""
        local, due = self._local, (os.getpid(), self._generation)
        if getattr(local, "due", None) != due:
            local.tokenizer = None  # the old cache goes before the new tokenizer is built
            local.tokenizer, local.due = self._new(), due
        return local.tokenizer

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids (``int32``), as if encoded one by one; gigatoken's ``encode`` releases the GIL."""
        tokenizer = self.tokenizer()
        return [tokenizer.encode(text).astype(np.int32) for text in texts]

    def _new(self):
        raise NotImplementedError


def _rank_file(encoding: tiktoken.Encoding) -> bytes:
    """The encoding's ranks as a ``.tiktoken`` file, read through its public API (~1 s for GPT-2)."""
    specials = {encoding.encode_single_token(s) for s in encoding.special_tokens_set}
    ranks = ((encoding.decode_single_token_bytes(i), i) for i in range(encoding.n_vocab) if i not in specials)
    return b"".join(base64.b64encode(token) + b" %d\n" % i for token, i in ranks)


class TiktokenRanks(FastBpe):
    """gigatoken over the ranks of a tiktoken encoding: the same ids as its ``encode_ordinary``.

    Args:
        encoding: the tiktoken encoding whose ranks to use (read through its public API).
        pretokenizer: gigatoken's name for the encoding's split pattern (see ``PRETOKENIZERS``).
        refresh_bytes: characters of text encoded between two builds of the tokenizer.
    """

    def __init__(self, encoding: tiktoken.Encoding, pretokenizer: str, refresh_bytes: int):
        super().__init__(refresh_bytes)
        self._rank_file = cached_rank_file(encoding) or _rank_file(encoding)
        self.pretokenizer, self.eot_id = pretokenizer, encoding.eot_token

    def _new(self):
        import gigatoken

        with tempfile.TemporaryDirectory(prefix="textpipe-ranks-") as folder:
            path = os.path.join(folder, "ranks.tiktoken")
            with open(path, "wb") as f:
                f.write(self._rank_file)
            # <|endoftext|> alone of the specials: texts are joined by it (the caller keeps texts holding it apart)
            return gigatoken.Tokenizer.from_tiktoken(
                path, pretokenizer=self.pretokenizer, special_tokens={EOT_TEXT: self.eot_id}
            )

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids, the texts (none holding ``<|endoftext|>``) joined by it in one call and split back."""
        return split_joined(self.tokenizer().encode(EOT_TEXT.join(texts)), self.eot_id)


class HfTokenizer(FastBpe):
    """gigatoken over a local Hugging Face ``tokenizer.json`` (byte-level BPE), read offline.

    Special tokens (``added_tokens`` marked ``special``) are plain text inside documents: the file
    is loaded without them, so ``<|endoftext|>`` in a text is encoded as its characters. The document
    separator is the first of ``SEPARATORS`` among the file's special tokens.

    Args:
        path: the ``tokenizer.json`` file.
        refresh_bytes: characters of text encoded between two builds of the tokenizer.
    """

    SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>")

    def __init__(self, path: str, refresh_bytes: int):
        super().__init__(refresh_bytes)
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
        self._decoder = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_decoder": None}

    def _new(self):
        import gigatoken

        return gigatoken.Tokenizer.from_json(self._plain)

    def decode(self, ids) -> str:
        """The text of token ids, separators included."""
        import gigatoken

        if self._decoder is None:
            self._decoder = gigatoken.Tokenizer(self.path)
        return self._decoder.decode(np.asarray(ids, dtype=np.uint32)).decode("utf-8", errors="replace")
