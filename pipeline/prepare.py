"""``prepare``: encode a corpus once into token shards (Arrow IPC) and a manifest, for ``read_tokens``.

    python -m pipeline prepare CONFIG --out DIR [--engine local|ray] [--overwrite] [--shard-tokens N]

The config's reading and encoding stages run once (the pipeline whose output is the first stage
that gives tokens); every item they give becomes one row of a shard: ``ids`` (``list<uint16>`` when
the vocabulary fits in 16 bits, else ``list<uint32>``) and ``source``. The rows' ids, in order, are
exactly the streaming token stream, ``<|endoftext|>`` separators included, so ``read_tokens`` cuts
the same windows as ``sliding_window`` would. ``manifest.json`` records the encoding (and a sha256 of
its BPE ranks), the source files (size, mtime, sha256), the counts, the shards (tokens, bytes,
sha256) and the config used.

Writing is atomic: everything goes into a hidden folder beside DIR, renamed to DIR only once complete,
so an interrupted prepare leaves no cache (its leftovers are removed by the next run).
``--engine ray`` runs the same reading and encoding as a Ray Data job and writes the same bytes.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline.config import apply_overrides, load_config
from pipeline.graph import Pipeline, check_config
from pipeline.registry import ConfigError, stage_class
from pipeline.shard import ShardedSource, assign_units
from pipeline.stage import upstream_nodes

FORMAT, VERSION = "textpipe.token-shards", 1
MANIFEST = "manifest.json"
SHARD_NAME = "tokens-{:05d}.arrow"
SHARD_TOKENS = 100_000_000  # ~200 MB a shard at uint16, like nanoGPT's fineweb shards
BATCH_TOKENS = 1 << 20  # tokens per record batch: what the writer holds in memory (~4 MB as int32)


class PrepareError(ValueError):
    """prepare cannot go on; the message says why and what to do (the CLI exits 2 with it)."""


# --- what a cache is made of: encoding, sources, manifest -----------------------------------------


def encoding_identity(encoding) -> dict[str, Any]:
    """Name, sha256 of the BPE ranks (as a ``.tiktoken`` file lists them), vocabulary size, EOT id."""
    ranks = sorted(encoding._mergeable_ranks.items(), key=lambda item: item[1])
    digest = hashlib.sha256(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks))
    return {"name": encoding.name, "ranks_sha256": digest.hexdigest(), "n_vocab": encoding.n_vocab,
            "eot_token": encoding.eot_token}


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)  # GPT-2: 50,257 ids < 2**16


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)  # hashlib releases the GIL on large updates: files hash in parallel
    return digest.hexdigest()


def describe_sources(paths: list[str]) -> list[dict[str, Any]]:
    """Each source file: path (as the config names it), absolute path, size, mtime and sha256."""
    with ThreadPoolExecutor(min(4, len(paths) or 1)) as pool:
        hashes = list(pool.map(file_sha256, paths))
    out = []
    for path, sha in zip(paths, hashes):
        st = os.stat(path)
        out.append({"path": path, "abspath": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": sha})
    return out


def load_manifest(folder: str) -> dict[str, Any]:
    """The manifest of a token cache; ``ValueError`` naming the folder when there is none."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        why = "does not exist" if not os.path.exists(folder) else f"has no {MANIFEST}"
        raise ValueError(f"path {folder!r} {why}: it is not a prepared token cache (an interrupted prepare leaves none); "
                         f"make one with `python -m pipeline prepare CONFIG --out {folder}`")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"path {folder!r}: cannot read {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"path {folder!r}: {MANIFEST} is not a {FORMAT} manifest of version {VERSION} (found {found})")
    return manifest


def check_cache(folder: str, manifest: dict[str, Any]) -> None:
    """Refuse (``ValueError`` naming the folder) missing or resized shards and changed source files.

    Sizes are compared always; a source's sha256 only when its mtime moved (make's rule). Source files
    absent here are not checked: the shards stand on their own (e.g. copied to a training machine).
    """
    for shard in manifest["shards"]:
        path = os.path.join(folder, shard["file"])
        if not os.path.isfile(path):
            raise ValueError(f"path {folder!r}: shard {shard['file']} is missing; the cache is incomplete, prepare it again")
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            raise ValueError(f"path {folder!r}: shard {shard['file']} has {size:,} bytes, the manifest says {shard['bytes']:,}; "
                             "the cache is damaged, prepare it again")
    for source in manifest["sources"]:
        path = source["abspath"]
        if not os.path.exists(path):
            continue
        st = os.stat(path)
        if st.st_size != source["size"]:
            raise ValueError(f"path {folder!r}: stale cache: source {source['path']} is now {st.st_size:,} bytes, it was "
                             f"{source['size']:,} when the cache was prepared; prepare it again (prepare --overwrite)")
        if st.st_mtime_ns != source["mtime_ns"] and file_sha256(path) != source["sha256"]:
            raise ValueError(f"path {folder!r}: stale cache: source {source['path']} changed since the cache was prepared "
                             "(same size, another sha256); prepare it again (prepare --overwrite)")


# --- writing shards ----------------------------------------------------------------------------------


class ShardWriter:
    """Rows (token ids, source) in stream order into ``tokens-NNNNN.arrow`` files in ``folder``.

    A record batch is written each ``batch_tokens`` tokens (so memory stays flat) and a shard is
    closed once it holds ``shard_tokens`` tokens; rows are never split. The bytes depend only on the
    rows, so both engines write identical files.
    """

    def __init__(self, folder: str, dtype: np.dtype, n_vocab: int, shard_tokens: int = SHARD_TOKENS,
                 batch_tokens: int = BATCH_TOKENS):
        self.folder, self.dtype, self.n_vocab = folder, np.dtype(dtype), n_vocab
        self.shard_tokens, self.batch_tokens = shard_tokens, batch_tokens
        self.schema = pa.schema([("ids", pa.list_(pa.from_numpy_dtype(self.dtype))), ("source", pa.string())])
        self.shards: list[dict[str, Any]] = []
        self.rows = self.tokens = 0
        self._ids: list[np.ndarray] = []
        self._sources: list[str | None] = []
        self._held = 0  # tokens in _ids
        self._writer = None

    def add(self, ids: np.ndarray, source: str | None) -> None:
        self._ids.append(ids)
        self._sources.append(source)
        self._held += len(ids)
        if self._writer is None:
            name = SHARD_NAME.format(len(self.shards))
            self._sink = pa.OSFile(os.path.join(self.folder, name), "wb")
            self._writer = ipc.new_file(self._sink, self.schema)
            self.shards.append({"file": name, "rows": 0, "tokens": 0})
        if self.shards[-1]["tokens"] + self._held >= self.shard_tokens:
            self._close_shard()
        elif self._held >= self.batch_tokens:
            self._write_batch()

    def close(self) -> list[dict[str, Any]]:
        if self._writer is not None:
            self._close_shard()
        return self.shards

    def _write_batch(self) -> None:
        lengths = np.fromiter((len(a) for a in self._ids), dtype=np.int64, count=len(self._ids))
        values = np.concatenate(self._ids) if self._ids else np.empty(0, self.dtype)
        if len(values) and (values.min() < 0 or values.max() >= self.n_vocab):
            raise PrepareError(f"token id {int(values.max())} outside the vocabulary of {self.n_vocab}")
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(self.dtype, copy=False)))
        self._writer.write_batch(pa.record_batch([ids, pa.array(self._sources, pa.string())], schema=self.schema))
        shard = self.shards[-1]
        shard["rows"] += len(lengths)
        shard["tokens"] += len(values)
        self.rows, self.tokens = self.rows + len(lengths), self.tokens + len(values)
        self._ids, self._sources, self._held = [], [], 0

    def _close_shard(self) -> None:
        self._write_batch()
        self._writer.close()
        self._sink.close()
        self._writer = None
        shard = self.shards[-1]
        path = os.path.join(self.folder, shard["file"])
        _fsync(path)
        shard.update(bytes=os.path.getsize(path), sha256=file_sha256(path))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the two engines: rows of (ids, source) in stream order ---------------------------------------


def _local_rows(pipe: Pipeline, encode, counts: dict[str, int]) -> Iterator[tuple[np.ndarray, str | None]]:
    for item in pipe:
        yield item["ids"], item.get("source")
    counts["documents"] = int(encode.stats["documents"])


def _ray_rows(pipe: Pipeline, encode, dtype: np.dtype, counts: dict[str, int]) -> Iterator[tuple[np.ndarray, str | None]]:
    """The same rows from a Ray Data job: a read task per shard unit of the config's own reader
    (in the order a single local reader takes them), then ``map_batches`` encoding with the config's
    own encode stage, order preserved. Each batch is encoded as a stream of its own, so only its first
    row's separator is decided here, against the previous batch's last row (``BpeEncode``'s rule)."""
    ray = _import_ray()
    reader = encode.source
    if not isinstance(reader, ShardedSource) or not hasattr(encode, "eot_id"):
        raise PrepareError(f"--engine ray runs a reader feeding a bpe_encode stage directly; `{encode.name}` reads from "
                           f"`{getattr(reader, 'name', reader)}`: use --engine local for this graph")
    if not ray.is_initialized():
        ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)  # RAY_ADDRESS joins a cluster
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per dataset execution on stdout
    order = assign_units(len(reader.units), 0, 1, reader.shuffle, reader.seed, 0, reader.name)
    ds = ray.data.read_datasource(_unit_source(ray.put(reader), order), override_num_blocks=max(len(order), 1))
    ds = ds.map_batches(_encode_batch, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"stage": type(encode), "params": encode.params, "dtype": dtype.str})
    previous, documents = None, 0  # [source, end] of the last row given
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        ids = table.column("ids").combine_chunks()
        offsets, values = ids.offsets.to_numpy(), ids.flatten().to_numpy()
        offsets = offsets - offsets[0]  # flatten() starts at the first row's values
        sources, starts, ends = (table.column(n).to_pylist() for n in ("source", "offset", "end"))
        firsts = set(np.flatnonzero(table.column("first").to_numpy(zero_copy_only=False)).tolist())
        documents += sum(table.column("documents").to_pylist())
        for i, source in enumerate(sources):
            row = values[offsets[i] : offsets[i + 1]]
            if i in firsts and previous is not None:  # the first row of an encoded batch: decide its separator
                if [source, starts[i]] == previous:
                    documents -= 1  # it continues the previous piece: no separator, no new document
                elif encode.eot:
                    row = np.concatenate([np.array([encode.eot_id], dtype=values.dtype), row])
            previous = [source, ends[i]]
            yield row, source
    counts["documents"] = documents


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise PrepareError("--engine ray needs Ray: pip install '.[ray]'") from None
    return ray


def _unit_source(reader_ref, order: list[int]):
    """A Ray Data source: one read task per shard unit of the config's reader, in ``order``."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class UnitSource(Datasource):
        def estimate_inmemory_data_size(self) -> None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(functools.partial(_read_unit, reader_ref, unit), meta) for unit in order]

    return UnitSource()


def _read_unit(reader_ref, unit: int, table_bytes: int = 32 << 20) -> Iterator[pa.Table]:
    """Documents of one shard unit, read by the config's own reader (in a Ray task), as tables."""
    import ray

    reader = ray.get(reader_ref)  # a fresh copy in this task
    reader.units = [reader.units[unit]]
    reader.shuffle, reader.rank, reader.world_size = False, 0, 1
    reader.reset()
    columns: dict[str, list] = {"text": [], "source": [], "offset": [], "end": []}
    size, yielded = 0, False
    for doc in reader:
        # what BpeEncode compares to tell a continued piece: [source, offset] against [source, end]
        columns["text"].append(doc["text"])
        columns["source"].append(doc.get("source"))
        columns["offset"].append(doc.get("offset"))
        columns["end"].append(doc.get("end", -1))
        size += len(doc["text"])
        if size >= table_bytes:
            yield _documents_table(columns)
            columns, size, yielded = {k: [] for k in columns}, 0, True
    if columns["text"] or not yielded:
        yield _documents_table(columns)


def _documents_table(columns: dict[str, list]) -> pa.Table:
    try:
        return pa.table({"text": pa.array(columns["text"], pa.large_string()), "source": pa.array(columns["source"], pa.string()),
                         "offset": pa.array(columns["offset"], pa.int64()), "end": pa.array(columns["end"], pa.int64())})
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
        raise PrepareError(f"--engine ray: a document's source, offset or end is not a string / integer ({e}); "
                           "use --engine local") from None


_ENCODERS: dict[str, Any] = {}  # per Ray worker process: the encode stage, built once


def _encode_batch(table: pa.Table, stage: type, params: dict[str, Any], dtype: str) -> pa.Table:
    """Token ids of a batch of documents, encoded by the config's encode stage as a stream of its own."""
    from torchdata.nodes import IterableWrapper

    key = f"{stage.__module__}.{stage.__qualname__}:{json.dumps(params, sort_keys=True, default=str)}"
    if key not in _ENCODERS:
        _ENCODERS[key] = stage(IterableWrapper([]), **params)
    node = _ENCODERS[key]
    names = ("text", "source", "offset", "end")
    node.source = IterableWrapper([dict(zip(names, row)) for row in zip(*(table.column(n).to_pylist() for n in names))])
    node.reset()
    ids = []
    while True:
        try:
            ids.append(next(node)["ids"])
        except StopIteration:
            break
    lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(ids).astype(dtype) if ids else np.empty(0, dtype)
    documents, first = np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
    documents[:1], first[:1] = node.stats["documents"], True  # the batch's count, and where it starts, on its first row
    return pa.table({"ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)), "source": table.column("source"),
                     "offset": table.column("offset"), "end": table.column("end"), "documents": documents, "first": first})


# --- prepare -----------------------------------------------------------------------------------------


def tokens_stage(config: dict[str, Any]) -> str:
    """The name of the config's first stage that gives tokens."""
    import stages as _  # noqa: F401  (registers the stage types)

    for name, spec in config.get("stages", {}).items():
        if isinstance(spec, dict) and stage_class(spec.get("type"), name).produces == "tokens":
            return name
    raise ConfigError("prepare needs a stage that gives tokens (e.g. `type: bpe_encode`); this config has none")


def used_config(config: dict[str, Any], output: str) -> dict[str, Any]:
    """The stages that make ``output``'s tokens, alone, as JSON: a config that rebuilds the stream
    (later stages, which prepare does not run, are neither built nor recorded)."""
    refs = check_config(config)
    names, todo = set(), [output]
    while todo:
        name = todo.pop()
        if name not in names:
            names.add(name)
            todo += [ref.partition(".")[0] for ref in refs[name]]
    used = {"stages": {k: v for k, v in config["stages"].items() if k in names}, "output": output}
    return json.loads(json.dumps(used, default=str))


def _claim(out: str, overwrite: bool, encoding: dict, sources: list[dict]) -> None:
    """Refuse an ``out`` that holds something else: a cache of another encoding or corpus, or not a cache."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise PrepareError(f"--out {out!r} is a file, not a folder")
    if not os.path.exists(os.path.join(out, MANIFEST)):
        if os.listdir(out):
            raise PrepareError(f"--out {out!r} is a non-empty folder without {MANIFEST}, not a token cache; "
                               "choose another folder (prepare replaces only token caches)")
        return
    try:
        old = load_manifest(out)
    except ValueError as e:
        if overwrite:
            return
        raise PrepareError(f"{e}; pass --overwrite to replace it") from None
    if overwrite:
        return
    if [old["encoding"]["name"], old["encoding"]["ranks_sha256"]] != [encoding["name"], encoding["ranks_sha256"]]:
        raise PrepareError(f"--out {out!r} holds a cache of encoding `{old['encoding']['name']}`, this config encodes with "
                           f"`{encoding['name']}`; pass --overwrite to replace it, or choose another folder")
    key = lambda s: [[x["abspath"], x["size"], x["sha256"]] for x in s]  # noqa: E731
    if key(old["sources"]) != key(sources):
        raise PrepareError(f"--out {out!r} holds a cache of another corpus ({len(old['sources'])} source file(s), "
                           f"{sum(s['size'] for s in old['sources']):,} bytes); pass --overwrite to replace it, "
                           "or choose another folder")


def _remove_leftovers(parent: str, name: str) -> None:
    """Remove the temporary folders of earlier prepares of ``name`` whose process is gone (killed)."""
    for entry in os.listdir(parent):
        match = re.fullmatch(rf"\.{re.escape(name)}\.(?:prepare|old)-(\d+)-\w+", entry)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


def prepare(
    config: str | os.PathLike | dict[str, Any],
    out: str | os.PathLike,
    engine: str = "local",
    overwrite: bool = False,
    shard_tokens: int = SHARD_TOKENS,
    batch_tokens: int = BATCH_TOKENS,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Encode the corpus of ``config`` into token shards in ``out``; return the manifest written.

    Args:
        config: a pipeline config (file or dict) with a reader and an encode stage.
        out: the cache folder; made atomically (see the module's doc).
        engine: ``local`` (this process) or ``ray`` (a Ray Data job; ``pip install '.[ray]'``).
        overwrite: replace a cache of another encoding or corpus in ``out``.
        shard_tokens: close a shard once it holds this many tokens.
        batch_tokens: tokens per Arrow record batch.
        overrides: ``stage.field=value`` settings, as ``--set``.
    """
    if engine not in ("local", "ray"):
        raise PrepareError(f"engine must be `local` or `ray`, got {engine!r}")
    for field, value in (("shard_tokens", shard_tokens), ("batch_tokens", batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PrepareError(f"{field} must be a positive integer, got {value!r}")
    if engine == "ray":
        _import_ray()  # before any work
    start = time.perf_counter()
    config = apply_overrides(load_config(config), overrides or [])
    output = tokens_stage(config)
    config = used_config(config, output)
    pipe = Pipeline.from_config(config, rank=0, world_size=1)  # the whole corpus, whatever $RANK says
    encode = pipe.stages[output]
    if not hasattr(getattr(encode, "encoding", None), "_mergeable_ranks"):
        raise PrepareError(f"stage `{output}` ({encode.type_name}) has no BPE encoding to record; prepare supports bpe_encode")
    encoding = encoding_identity(encode.encoding)
    dtype = token_dtype(encoding["n_vocab"])
    readers = [n for n in upstream_nodes(pipe.root) if isinstance(n, ShardedSource)]
    paths = list(dict.fromkeys(getattr(f, "path", f) for n in readers for f in n.files))
    sources = describe_sources(paths)

    out = os.path.abspath(os.fspath(out))
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    _claim(out, overwrite, encoding, sources)
    _remove_leftovers(parent, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.prepare-{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        writer = ShardWriter(tmp, dtype, encoding["n_vocab"], shard_tokens, batch_tokens)
        counts: dict[str, int] = {}
        rows = _local_rows(pipe, encode, counts) if engine == "local" else _ray_rows(pipe, encode, dtype, counts)
        for ids, source in rows:
            writer.add(ids, source)
        shards = writer.close()
        for source in sources:  # a file edited while we read it would give tokens of neither version
            st = os.stat(source["path"])
            if [st.st_size, st.st_mtime_ns] != [source["size"], source["mtime_ns"]]:
                raise PrepareError(f"source {source['path']} changed while it was being encoded; run prepare again")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "encoding": encoding,
            "dtype": dtype.name,
            "counts": {"documents": counts["documents"], "tokens": writer.tokens, "rows": writer.rows,
                       "source_bytes": sum(s["size"] for s in sources)},
            "shards": shards,
            "sources": sources,
            "config": config,
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["seconds"] = time.perf_counter() - start  # not written: the manifest depends on the data only
    return manifest


def _swap_into_place(tmp: str, out: str) -> None:
    """Rename the finished folder to ``out`` (the old cache, if any, moved aside first, then removed)."""
    parent, name = os.path.split(out)
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{name}.old-{os.getpid()}-", dir=parent)
        os.replace(out, os.path.join(old, name))
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(os.path.join(old, name), out)  # put the old cache back
        raise
    fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves reach the disk
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- command line ------------------------------------------------------------------------------------


def add_parser(commands) -> None:
    """The ``prepare`` verb, added to ``python -m pipeline``'s subcommands."""
    p = commands.add_parser("prepare", help="encode a corpus once into token shards (Arrow) that read_tokens serves")
    p.add_argument("config", help="a pipeline config with a reader and a bpe_encode stage (later stages are ignored)")
    p.add_argument("--out", required=True, help="the cache folder to write (atomically)")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="local: this process; ray: a Ray Data job")
    p.add_argument("--overwrite", action="store_true", help="replace a cache of another encoding or corpus in --out")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help=f"tokens per shard file (default {SHARD_TOKENS:,})")
    p.add_argument("--set", action="append", metavar="STAGE.FIELD=VALUE",
                   help="override a field (value read as YAML); repeatable")
    p.set_defaults(handler=prepare_command)


def prepare_command(args: argparse.Namespace) -> int:
    m = prepare(args.config, args.out, engine=args.engine, overwrite=args.overwrite, shard_tokens=args.shard_tokens,
                overrides=args.set)
    c = m["counts"]
    print(f"prepared {args.out} ({args.engine}): {c['documents']:,} documents, {c['tokens']:,} tokens ({m['dtype']}) in "
          f"{len(m['shards'])} shard(s), {c['rows']:,} rows; {c['source_bytes']:,} bytes of text in {m['seconds']:.2f} s "
          f"({c['source_bytes'] / 1e6 / m['seconds']:.2f} MB/s), encoding {m['encoding']['name']}", file=sys.stdout)
    return 0
