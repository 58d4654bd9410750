"""``prepare``: encode a corpus once into token shards (Arrow IPC) and a manifest, for ``read_tokens``.

    python -m pipeline prepare CONFIG --out DIR [--engine local|ray] [--overwrite] [--shard-tokens N]

The config's reading and encoding stages run once (the pipeline whose output is the first stage
that gives tokens); every item they give becomes one row of a shard: ``ids`` (``list<uint16>`` when
the vocabulary fits in 16 bits, else ``list<uint32>``) and ``source``. The rows' ids, in order, are
exactly the streaming token stream, ``<|endoftext|>`` separators included, so ``read_tokens`` cuts
the same windows as ``sliding_window`` would. ``manifest.json`` records the encoding (and a sha256 of
its BPE ranks), the source files or objects (size, mtime, sha256), the counts, the shards (tokens, bytes,
sha256) and the config used.

Writing is atomic: everything goes into a hidden folder beside DIR, renamed to DIR only once complete,
so an interrupted prepare leaves no cache (its leftovers are removed by the next run). DIR may be an
object-storage prefix (``s3://bucket/cache``): each shard is written locally (one at a time), uploaded
and removed; a cache already there loses its manifest before its first shard is replaced, and the new
manifest is uploaded last, so an interrupted prepare leaves shard objects but no manifest (no cache).
``--engine ray`` runs the same reading and encoding as a Ray Data job and writes the same bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

from pipeline.config import apply_overrides, load_config
from pipeline.graph import Pipeline, check_config
from pipeline.progress import Progress, corpus_bytes
from pipeline.registry import ConfigError, stage_class
from pipeline.shard import Reader
from pipeline.stage import upstream_nodes
from pipeline.storage import is_remote, list_under, remove, stat, upload
from stages.tokens import local_engine, ray_engine
from stages.tokens.format import (
    BATCH_TOKENS,
    FORMAT,
    MANIFEST,
    SHARD_NAME,
    SHARD_TOKENS,
    VERSION,
    PrepareError,
    describe_sources,
    encoding_identity,
    load_manifest,
    token_dtype,
)
from stages.tokens.writer import ShardWriter

_SHARD = re.compile(r"tokens-\d{5,}\.arrow")  # the names SHARD_NAME gives


def tokens_stage(config: dict[str, Any]) -> str:
    """The name of the config's first stage that gives tokens."""
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
    """Refuse an ``out`` that holds something else: a cache of another encoding or corpus, or not a cache
    (under an object-storage prefix, shard objects without a manifest are an interrupted prepare's: replaced)."""
    if is_remote(out):
        names = list_under(out)
        others = [n for n in names if not _SHARD.fullmatch(n)]
        if MANIFEST not in names:
            if others:
                raise PrepareError(
                    f"--out {out!r} holds objects without {MANIFEST} ({others[0]}, ...), not a token cache; "
                    "choose another prefix (prepare replaces only token caches)"
                )
            return
    elif not os.path.exists(out):
        return
    elif not os.path.isdir(out):
        raise PrepareError(f"--out {out!r} is a file, not a folder")
    elif not os.path.exists(os.path.join(out, MANIFEST)):
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
        raise PrepareError(
            f"--out {out!r} holds a cache of encoding `{old['encoding']['name']}`, this config encodes with "
            f"`{encoding['name']}`; pass --overwrite to replace it, or choose another folder"
        )
    key = lambda s: [[x["abspath"], x["size"], x["sha256"]] for x in s]  # noqa: E731
    if key(old["sources"]) != key(sources):
        raise PrepareError(
            f"--out {out!r} holds a cache of another corpus ({len(old['sources'])} source file(s), "
            f"{sum(s['size'] for s in old['sources']):,} bytes); pass --overwrite to replace it, "
            "or choose another folder"
        )


def _local_folder(out: str) -> str:
    """A new hidden folder beside ``out`` for the cache being written (and earlier ones of killed prepares removed)."""
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(parent, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.prepare-{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    return tmp


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
    progress: bool = False,
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
        progress: show progress on stderr (a bar with rate and ETA on a terminal, a line every few
            seconds otherwise; the local engine knows the bytes read) and a line per shard written.
    """
    if engine not in ("local", "ray"):
        raise PrepareError(f"engine must be `local` or `ray`, got {engine!r}")
    for field, value in (("shard_tokens", shard_tokens), ("batch_tokens", batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PrepareError(f"{field} must be a positive integer, got {value!r}")
    if engine == "ray":
        ray_engine.import_ray()  # before any work
    start = time.perf_counter()
    config = apply_overrides(load_config(config), overrides or [])
    output = tokens_stage(config)
    config = used_config(config, output)
    pipe = Pipeline.from_config(config, rank=0, world_size=1)  # the whole corpus, whatever $RANK says
    encode = pipe.stages[output]
    if getattr(encode, "encoding_name", None) is None:  # word_encode; bpe_encode with a tokenizer_file
        raise PrepareError(
            f"stage `{output}` ({encode.type_name}) has no BPE encoding to record; prepare supports bpe_encode"
        )
    encoding = encoding_identity(encode)
    dtype = token_dtype(encoding["n_vocab"])
    readers = [n for n in upstream_nodes(pipe.root) if isinstance(n, Reader)]
    paths = list(dict.fromkeys(path for n in readers for path in n.paths()))
    sources = describe_sources(paths)

    remote = is_remote(os.fspath(out))
    out = os.fspath(out).rstrip("/") if remote else os.path.abspath(os.fspath(out))
    _claim(out, overwrite, encoding, sources)
    tmp = tempfile.mkdtemp(prefix="textpipe-prepare-") if remote else _local_folder(out)
    try:
        total, read = corpus_bytes(pipe.root) if engine == "local" else (None, int)  # Ray's readers report elsewhere

        def written() -> str:
            return f"{writer.rows:,} rows, {writer.tokens:,} tokens written"

        def report(shard: dict[str, Any]) -> None:
            if remote:  # the old manifest goes before the first shard object is replaced
                if shard["file"] == SHARD_NAME.format(0):
                    remove(f"{out}/{MANIFEST}")
                upload(os.path.join(tmp, shard["file"]), f"{out}/{shard['file']}")
                os.remove(os.path.join(tmp, shard["file"]))
            shown.note(f"wrote shard {shard['file']}: {shard['tokens']:,} tokens, {shard['rows']:,} rows, "
                       f"{shard['bytes'] / 1e6:.1f} MB")

        shown = Progress(total, read, written, enabled=progress)
        writer = ShardWriter(tmp, dtype, encoding["n_vocab"], shard_tokens, batch_tokens, on_shard=report)
        counts: dict[str, int] = {}
        rows = (local_engine if engine == "local" else ray_engine).rows(pipe, encode, dtype, counts)
        for ids, block in rows:
            writer.add(ids, block)
            shown.update()
        shards = writer.close()
        shown.close()
        for source in sources:  # a file edited while we read it would give tokens of neither version
            if stat(source["path"]) != (source["size"], source["mtime_ns"]):
                raise PrepareError(f"source {source['path']} changed while it was being encoded; run prepare again")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "encoding": encoding,
            "dtype": dtype.name,
            "counts": {
                "documents": counts["documents"],
                "tokens": writer.tokens,
                "rows": writer.rows,
                "source_bytes": sum(s["size"] for s in sources),
            },
            "shards": shards,
            "sources": sources,
            "config": config,
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if remote:
            for stale in set(filter(_SHARD.fullmatch, list_under(out))) - {s["file"] for s in shards}:
                remove(f"{out}/{stale}")  # of an older cache or an interrupted prepare
            upload(os.path.join(tmp, MANIFEST), f"{out}/{MANIFEST}")  # last: the manifest makes it a cache
            shutil.rmtree(tmp, ignore_errors=True)
        else:
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
