"""The token-cache format: constants, the encoding's identity, the manifest, and the checks that refuse a stale cache.

A cache folder holds ``tokens-NNNNN.arrow`` shards (Arrow IPC, rows of ``ids`` and ``source``) and
``manifest.json``: the encoding (and a sha256 of its BPE ranks), the source files (size, mtime,
sha256), the counts, the shards (tokens, bytes, sha256, and where in the file each record batch's
tokens lie) and the config used. A cache is read from a local folder or from object storage (a URI).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline.storage import is_remote, load_text, local_path, open_stream, stat, version

FORMAT, VERSION = "textpipe.token-shards", 1
MANIFEST = "manifest.json"
SHARD_NAME = "tokens-{:05d}.arrow"
SHARD_TOKENS = 100_000_000  # ~200 MB a shard at uint16, like nanoGPT's fineweb shards
BATCH_TOKENS = 1 << 20  # tokens per record batch: what the writer holds in memory (~4 MB as int32)


class PrepareError(ValueError):
    """prepare cannot go on; the message says why and what to do (the CLI exits 2 with it)."""



def id_runs(whole: pa.Buffer, dtype: np.dtype, where: str) -> list[list[int]]:
    """``[byte offset, tokens]`` of each record batch's ids in a shard file (all its bytes in ``whole``),
    batches without tokens left out: the runs of the token stream the file holds, in order.

    A batch's ``ids`` values are a contiguous run of the file (Arrow IPC buffers are 8-byte aligned),
    found by address; ``ValueError`` starting with ``where`` when the ids are not stored that way.
    """
    runs = []
    reader = ipc.open_file(whole)
    for b in range(reader.num_record_batches):
        column = reader.get_batch(b).column(0)
        first, last = column.offsets[0].as_py(), column.offsets[-1].as_py()
        values = column.values
        if column.type.value_type != pa.from_numpy_dtype(dtype) or values.null_count:
            raise ValueError(f"{where}: ids are {column.type}, expected list<{dtype}> without nulls")
        at = values.buffers()[1].address + (values.offset + first) * dtype.itemsize - whole.address
        if last == first:
            continue
        if at % dtype.itemsize or not 0 <= at <= whole.size - (last - first) * dtype.itemsize:
            raise ValueError(f"{where}: ids are not stored uncompressed in the file")
        runs.append([at, last - first])
    return runs


def encoding_identity(encode) -> dict[str, Any]:
    """Name, sha256 of the BPE ranks (as a ``.tiktoken`` file lists them), vocabulary size, EOT id of the
    tiktoken encoding of a ``bpe_encode`` stage."""
    if encode.ranks_sha256 is not None:  # known to the stage: no tiktoken Encoding built and listed (~0.15 s)
        return {"name": encode.encoding_name, "ranks_sha256": encode.ranks_sha256, "n_vocab": encode.vocab_size,
                "eot_token": encode.eot_id}
    encoding = encode.encoding
    # tiktoken 0.14's public API: the mergeable tokens' bytes, and each one's rank (its id)
    ranks = sorted(((token, encoding.encode_single_token(token)) for token in encoding.token_byte_values()),
                   key=lambda item: item[1])
    digest = hashlib.sha256(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks))
    return {"name": encoding.name, "ranks_sha256": digest.hexdigest(), "n_vocab": encoding.n_vocab,
            "eot_token": encoding.eot_token}


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)  # GPT-2: 50,257 ids < 2**16


def file_sha256(path: str) -> str:
    """The sha256 of a file or object, streamed in 8 MB reads (never the whole of it in memory)."""
    digest = hashlib.sha256()
    with open_stream(path) as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)  # hashlib releases the GIL on large updates: files hash in parallel
    return digest.hexdigest()


def source_stat(path: str) -> tuple[int, int]:
    """``(size, mtime_ns)`` of a source file or object; ``FileNotFoundError`` naming it when it is gone."""
    found = stat(path)
    if found is None:
        raise FileNotFoundError(f"source {path}: no such file or object")
    return found


def describe_sources(paths: list[str]) -> list[dict[str, Any]]:
    """Each source file or object: path (as the config names it), absolute path (a URI stays a URI), size,
    mtime and sha256 (read after the size and mtime: a change while hashing shows at prepare's last check)."""
    with ThreadPoolExecutor(min(4, len(paths) or 1)) as pool:
        stats = list(pool.map(source_stat, paths))  # objects: a request each
        hashes = list(pool.map(file_sha256, paths))
    return [
        {"path": path, "abspath": path if is_remote(path) else os.path.abspath(local_path(path)), "size": size,
         "mtime_ns": mtime, "sha256": sha}
        for path, (size, mtime), sha in zip(paths, stats, hashes)
    ]


def load_manifest(folder: str) -> dict[str, Any]:
    """The manifest of a token cache (a local folder or a URI); ``ValueError`` naming the folder when there is none."""
    try:
        text = load_text(os.path.join(folder, MANIFEST))
    except FileNotFoundError as e:
        why = (
            f"has no {MANIFEST} ({e})" if is_remote(folder)
            else "does not exist" if not os.path.exists(folder) else f"has no {MANIFEST}"
        )
        raise ValueError(
            f"path {folder!r} {why}: it is not a prepared token cache (an interrupted prepare leaves none); "
            f"make one with `python -m pipeline prepare CONFIG --out {folder}`"
        ) from None
    try:
        manifest = json.loads(text)
    except (OSError, ValueError) as e:
        raise ValueError(f"path {folder!r}: cannot read {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = (
            (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else type(manifest).__name__
        )
        raise ValueError(f"path {folder!r}: {MANIFEST} is not a {FORMAT} manifest of version {VERSION} (found {found})")
    return manifest


def check_cache(folder: str, manifest: dict[str, Any]) -> list[list]:
    """Refuse (``ValueError`` naming the folder) missing or resized shards and changed source files; give
    each shard's ``storage.version`` (size, and an object's modification time).

    Sizes are compared always; a source's sha256 only when its mtime moved (make's rule); sources may be
    files or objects. Sources absent here are not checked: the shards stand on their own (e.g. copied to a
    training machine or to object storage), nor are those in a store this machine cannot reach (warned).
    A cache in object storage must say where each shard's tokens lie (``ids_at``).
    """
    versions = []
    for shard in manifest["shards"]:
        path = os.path.join(folder, shard["file"])
        versions.append(version(path))
        size = versions[-1][0]
        if size is None:
            raise ValueError(
                f"path {folder!r}: shard {shard['file']} is missing; the cache is incomplete, prepare it again"
            )
        if is_remote(folder) and "ids_at" not in shard:
            raise ValueError(
                f"path {folder!r}: the manifest does not say where shard {shard['file']}'s tokens lie (`ids_at`, "
                "written by prepare since token caches are read from object storage); prepare it again"
            )
        if size != shard["bytes"]:
            raise ValueError(
                f"path {folder!r}: shard {shard['file']} has {size:,} bytes, the manifest says {shard['bytes']:,}; "
                "the cache is damaged, prepare it again"
            )
    _check_sources(folder, manifest["sources"])
    return versions


def _check_sources(folder: str, sources: list[dict[str, Any]]) -> None:
    """Refuse a cache whose source files or objects changed (those absent here, or in a store this machine
    cannot reach, are not checked; the stores not reached are warned about, each once)."""
    unreachable = set()
    for source in sources:
        path = source["abspath"]
        store = "/".join(path.split("/", 3)[:3]) + "/" if is_remote(path) else None  # scheme://bucket/
        if store in unreachable:
            continue
        try:
            found = stat(path)
        except OSError as e:
            if store is None:
                raise
            unreachable.add(store)
            warnings.warn(f"path {folder!r}: the sources in {store} not checked ({e})", stacklevel=3)
            continue
        if found is None:
            continue
        if found[0] != source["size"]:
            raise ValueError(
                f"path {folder!r}: stale cache: source {source['path']} is now {found[0]:,} bytes, it was "
                f"{source['size']:,} when the cache was prepared; prepare it again (prepare --overwrite)"
            )
        if found[1] != source["mtime_ns"] and file_sha256(path) != source["sha256"]:
            raise ValueError(
                f"path {folder!r}: stale cache: source {source['path']} changed since the cache was prepared "
                "(same size, another sha256); prepare it again (prepare --overwrite)"
            )
