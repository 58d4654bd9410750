"""Where corpus files live: local paths, or URIs (``s3://``, ``gs://``, ``file://``) through ``pyarrow.fs``.

Every reader names, lists, sizes and opens its files through this module. Local paths stay as given
(so ``source`` in documents is the path the user wrote); a URI is kept as a URI. Credentials, regions
and endpoints come only from each store's standard environment variables and config files (for S3:
``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ``~/.aws/config``; for GCS: application
default credentials), never from a pipeline config. Remote reads are ranged (``open_input``) or one
streamed request (``open_stream``); nothing is copied to local disk. Transient errors (HTTP 5xx,
throttling, timeouts, dropped connections) are retried with exponential backoff by the store's SDK
(S3: the AWS standard retry strategy with ``RETRIES`` attempts; GCS: for ``GCS_RETRY_SECONDS``).
"""

from __future__ import annotations

import datetime
import functools
import glob
import os
import re
import warnings

import pyarrow as pa
import pyarrow.fs as pafs

RETRIES = 6  # attempts per request, with the SDK's exponential backoff and jitter in between
# The AWS standard strategy waits up to 2**n s (random) before retry n; pyarrow 26 offers no backoff setting, so the
# tests set the SDK's legacy strategy (25 ms * 2**n) here to retry without seconds of sleep.
S3_RETRY_STRATEGY = pafs.AwsStandardS3RetryStrategy
GCS_RETRY_SECONDS = 30.0
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URI of a remote store (``file://`` is local)."""
    match = _SCHEME.match(path)
    return bool(match) and match.group(1).lower() != "file"


def local_path(path: str) -> str:
    """A local path as a path: ``file://`` taken off."""
    return path[len("file://") :] if path.lower().startswith("file://") else path


@functools.cache
def _store(scheme: str, bucket: str, pid: int) -> pafs.FileSystem:
    """One filesystem per bucket and process (a forked worker makes its own: connections are not shared),
    with retries set (``from_uri`` finds an S3 bucket's region)."""
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=GCS_RETRY_SECONDS))
    try:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}/")
    except (OSError, ValueError) as e:
        raise OSError(f"{scheme}://{bucket}: cannot reach this store ({e})") from None
    if isinstance(fs, pafs.S3FileSystem):  # the same settings (region, endpoint from the environment), more retries
        settings = fs.__reduce__()[1][0]  # what pickling rebuilds it from: S3FileSystem(**settings)
        return pafs.S3FileSystem(**settings, retry_strategy=S3_RETRY_STRATEGY(max_attempts=RETRIES))
    return fs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a remote ``uri`` and the path inside it (``bucket/key``)."""
    scheme, rest = uri.split("://", 1)
    return _store(scheme.lower(), rest.split("/", 1)[0], os.getpid()), rest


def _missing(uri: str, what: str = "no such object") -> FileNotFoundError:
    """A not-found error that says whether the bucket or the object is missing."""
    fs, path = resolve(uri)
    bucket = uri.split("://", 1)[0] + "://" + path.split("/", 1)[0]
    if fs.get_file_info(path.split("/", 1)[0]).type == pafs.FileType.NotFound:
        return FileNotFoundError(f"{uri}: no bucket {bucket} (or not visible with these credentials)")
    return FileNotFoundError(f"{uri}: {what}")


def _glob_regex(pattern: str) -> re.Pattern:
    """``glob`` semantics on object keys: ``*`` and ``?`` stay within one ``/`` level, ``**/`` spans levels."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _list_remote(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    fs, path = resolve(uri)
    scheme = uri.split("://", 1)[0]
    try:
        if glob.has_magic(path):
            base = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            wanted = _glob_regex(path)
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            found = [i.path for i in infos if i.is_file and wanted.match(i.path)]
        else:
            info = fs.get_file_info(path)
            found = [path] if info.is_file else []
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                found = [i.path for i in infos if i.is_file and (not suffixes or i.path.endswith(suffixes))]
    except OSError as e:
        raise OSError(f"{uri}: cannot list ({e})") from None
    if not found:
        raise _missing(uri, "no object matches" if glob.has_magic(path) else "no such object")
    return sorted(f"{scheme}://{p}" for p in found)


def expand_paths(paths: str | list[str], suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files named by ``paths`` (files, globs, directories, local or URIs), in order; raises if one matches nothing.

    A local path that exists is taken as it is, even with ``[``, ``*`` or ``?`` in its name; any other is a glob.
    In a directory (or a URI prefix), only files ending with one of ``suffixes`` are taken (all when empty).
    """
    files: list[str] = []
    for pattern in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
        pattern = os.fspath(pattern)
        if is_remote(pattern):
            files.extend(_list_remote(pattern, suffixes))
            continue
        pattern = local_path(pattern)
        if os.path.isdir(pattern):
            matches = sorted(p for p in _files_under(pattern) if not suffixes or p.endswith(suffixes))
        elif os.path.isfile(pattern) or not glob.has_magic(pattern):
            matches = [pattern] if os.path.isfile(pattern) else []
        else:
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"no file matches {pattern!r} (working directory {os.getcwd()})")
        files.extend(matches)
    return files


def _files_under(folder: str) -> list[str]:
    """The files in a local ``folder`` and its subfolders, hidden names left out as globs do.

    Links to files are read; links to folders are not followed (as ``find`` and ``rsync -r`` do): a link
    such as ``self -> .`` or ``latest -> v2`` would read files twice or more. Each skipped link is warned
    about, naming it; name its target in ``paths`` to read it.
    """
    found = []
    for top, folders, names in os.walk(folder):
        links = sorted(d for d in folders if os.path.islink(os.path.join(top, d)) and not d.startswith("."))
        for link in links:
            path = os.path.join(top, link)
            warnings.warn(
                f"{path}: a link to a folder ({os.readlink(path)}), not followed; name its target in `paths` "
                "to read it",
                stacklevel=4,
            )
        folders[:] = [d for d in folders if not d.startswith(".") and d not in links]
        found += [os.path.join(top, n) for n in names if not n.startswith(".") and os.path.isfile(os.path.join(top, n))]
    return found


def is_dir(path: str) -> bool:
    """Whether ``path`` is a local directory or a remote prefix holding objects."""
    if not is_remote(path):
        return os.path.isdir(local_path(path))
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def stat(path: str) -> tuple[int, int] | None:
    """``(size, modification time in ns)`` of a file or object; ``None`` when there is none."""
    if not is_remote(path):
        try:
            st = os.stat(local_path(path))
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    return (info.size, info.mtime_ns) if info.is_file else None


def version(path: str) -> list:
    """What tells a changed file: ``[size]`` locally, ``[size, modification time in ns]`` for an object."""
    if not is_remote(path):
        return [os.path.getsize(path)] if os.path.exists(path) else [None]
    found = stat(path)
    return list(found) if found else [None]


def size(path: str) -> int:
    """The size of a file or object in bytes (``FileNotFoundError`` naming it when it is gone)."""
    if not is_remote(path):
        return os.path.getsize(path)
    found = version(path)[0]
    if found is None:
        raise _missing(path)
    return found


def _open(path: str, method: str, **options):
    fs, inner = resolve(path)
    try:
        return getattr(fs, method)(inner, **options)
    except FileNotFoundError:
        raise _missing(path) from None
    except OSError as e:
        raise OSError(f"{path}: cannot open ({e})") from None


def _open_local(path: str) -> pa.NativeFile:
    try:
        return pa.OSFile(path)
    except OSError as e:  # the OS's words (``No such file or directory``), as Python's ``open`` gives them
        raise type(e)(e.errno, os.strerror(e.errno) if e.errno else str(e), path) from None


def open_input(path: str) -> pa.NativeFile:
    """A seekable binary file (``read``, ``seek``, ``size()``): local, or an object read by ranged requests."""
    return _open_local(path) if not is_remote(path) else _open(path, "open_input_file")


def open_stream(path: str) -> pa.NativeFile:
    """A sequential binary stream: local, or an object read in one streamed request."""
    return (
        _open_local(path) if not is_remote(path) else _open(path, "open_input_stream", compression=None)
    )  # bytes as stored


def list_under(uri: str) -> list[str]:
    """The objects under a remote prefix ``uri``, as names relative to it (``[]`` when there are none);
    ``FileNotFoundError`` naming the bucket when it does not exist."""
    fs, inner = resolve(uri)
    inner = inner.rstrip("/")
    if fs.get_file_info(inner.split("/", 1)[0]).type == pafs.FileType.NotFound:
        raise _missing(uri)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    return sorted(i.path[len(inner) + 1 :] for i in infos if i.is_file)


def upload(local: str, uri: str) -> None:
    """Copy a local file to the object ``uri``, streamed (a multipart upload for a large file)."""
    fs, inner = resolve(uri)
    try:
        pafs.copy_files(local, inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as e:
        raise OSError(f"{uri}: cannot write ({e})") from None


def remove(uri: str) -> None:
    """Delete the object ``uri`` (nothing when it is not there)."""
    fs, inner = resolve(uri)
    if fs.get_file_info(inner).is_file:
        fs.delete_file(inner)


def load_text(path: str) -> str:
    """A small text file (a manifest), whole."""
    with open_stream(path) as f:
        return f.read().decode("utf-8")
