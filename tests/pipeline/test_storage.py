"""Readers on object storage: a real S3-compatible server (moto in server mode) started on the loopback address.

The readers reach it the way they reach AWS: through ``pyarrow.fs`` with the endpoint and keys from the
standard environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), never from the config.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import os
import random
import re
import threading
import time
import warnings
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import zstandard
from torchdata.nodes import Loader

from pipeline import Pipeline, storage
from pipeline.stage import StageError
from stages import BpeEncode, ReadArrow, ReadJsonl, ReadText
from stages.tokens import ReadTokens, format, local_engine, objects
from stages.tokens import prepare as prepare_module
from stages.tokens.prepare import PrepareError, prepare
from tests.command_line import cli
from tests.corpora import write_arrow_corpus, write_text_corpus
from tests.resume import check_resume

moto_server = pytest.importorskip("moto.server", reason="moto[server] (dev extra) runs the S3-compatible server")
boto3 = pytest.importorskip("boto3")

_buckets = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh bucket: ``(name, put)`` where ``put(key, bytes)`` uploads an object."""
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"corpus-{next(_buckets)}"
    client.create_bucket(Bucket=name)
    return name, lambda key, body: client.put_object(Bucket=name, Key=key, Body=body)


def _jsonl_zst(records: list[dict]) -> bytes:
    return zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in records).encode())


def _upload_corpus(tmp_path, put) -> tuple[list[str], list[str]]:
    """Parquet files under ``parquet/`` and JSONL.zst files under ``jsonl/`` (also in ``tmp_path/pq`` and
    ``tmp_path/jsonl``); returns the ids of each."""
    parquet_ids = write_arrow_corpus(tmp_path / "pq", fmt="parquet")
    for path in sorted((tmp_path / "pq").iterdir()):
        put(f"parquet/{path.name}", path.read_bytes())
    jsonl_ids = []
    (tmp_path / "jsonl").mkdir(exist_ok=True)  # the same files locally
    for f in range(5):
        records = [{"id": f"j-{f}-{i}", "text": f"document {i} of file {f}"} for i in range(3 + 4 * f)]
        jsonl_ids += [r["id"] for r in records]
        put(f"jsonl/part-{f}.jsonl.zst", _jsonl_zst(records))
        (tmp_path / "jsonl" / f"part-{f}.jsonl.zst").write_bytes(_jsonl_zst(records))
    return parquet_ids, jsonl_ids


def test_parquet_and_jsonl_zst_read_from_s3_equal_the_local_read(tmp_path, bucket):
    name, put = bucket
    _upload_corpus(tmp_path, put)
    remote = list(ReadArrow(f"s3://{name}/parquet/*.parquet"))
    local = list(ReadArrow(str(tmp_path / "pq")))
    assert [{**d, "source": d["source"].rsplit("/", 1)[1]} for d in remote] == [
        {**d, "source": d["source"].rsplit("/", 1)[1]} for d in local
    ]
    docs = list(ReadJsonl(f"s3://{name}/jsonl/"))  # a prefix, like a directory
    assert [d["id"] for d in docs] == [f"j-{f}-{i}" for f in range(5) for i in range(3 + 4 * f)]
    assert docs[0]["source"] == f"s3://{name}/jsonl/part-0.jsonl.zst"


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_world_size_2_by_2_workers_read_every_document_exactly_once(tmp_path, bucket, kind):
    name, put = bucket
    parquet_ids, jsonl_ids = _upload_corpus(tmp_path, put)
    reader = {"type": "read_arrow", "paths": [f"s3://{name}/parquet/*.parquet"]}
    if kind == "jsonl":
        reader = {"type": "read_jsonl", "paths": [f"s3://{name}/jsonl/*.jsonl.zst"]}
    seen = Counter()
    for rank in range(2):
        pipe = Pipeline.from_config({"stages": {"read": reader}}, rank=rank, world_size=2, num_workers=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fewer units than workers in one of them: idle workers warn
            seen.update(doc["id"] for doc in pipe)
    assert sorted(seen) == sorted(parquet_ids if kind == "parquet" else jsonl_ids)
    assert max(seen.values()) == 1


def test_plain_jsonl_byte_ranges_and_text_read_by_ranged_requests(tmp_path, bucket):
    name, put = bucket
    lines = [json.dumps({"id": i, "text": f"line {i} " + "x" * (i % 13)}) for i in range(400)]
    put("plain/a.jsonl", ("\n".join(lines) + "\n").encode())
    node = ReadJsonl(f"s3://{name}/plain/a.jsonl", shard_bytes=1000)
    assert len(node.units) > 10
    assert [d["id"] for d in node] == list(range(400))
    text = "Every word here is read by ranged requests. " * 500
    put("plain/t.txt", text.encode())
    pieces = list(ReadText(f"s3://{name}/plain/t.txt", chunk_bytes=1000, shard_bytes=4000))
    assert "".join(p["text"] for p in pieces) == text and len(pieces) > 10


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_resume_from_s3_is_exact(tmp_path, bucket, kind):
    name, put = bucket
    _upload_corpus(tmp_path, put)
    if kind == "parquet":
        check_resume(lambda: ReadArrow(f"s3://{name}/parquet/*.parquet", shuffle=True), stop_after=[0, 7, 40])
    else:
        check_resume(lambda: BpeEncode(ReadJsonl(f"s3://{name}/jsonl/*.zst", shuffle=True)), stop_after=[0, 1, 20, 44])


def test_a_saved_state_is_refused_after_an_object_changed(tmp_path, bucket):
    name, put = bucket
    _upload_corpus(tmp_path, put)
    config = {"stages": {"read": {"type": "read_jsonl", "paths": [f"s3://{name}/jsonl/*.zst"]}}}
    pipe = Pipeline.from_config(config, rank=0, world_size=1, num_workers=0)
    it = iter(pipe)
    next(it)
    state = json.loads(json.dumps(pipe.state_dict()))
    put("jsonl/part-1.jsonl.zst", _jsonl_zst([{"id": "new", "text": "same key, new object"}]))
    again = Pipeline.from_config(config, rank=0, world_size=1, num_workers=0)
    with pytest.raises(ValueError, match="`corpus` was"):
        again.load_state_dict(state)


def test_missing_object_and_wrong_bucket_are_clear_errors(tmp_path, bucket):
    name, put = bucket
    put("jsonl/a.jsonl", b'{"text": "a"}\n')
    with pytest.raises(FileNotFoundError, match=rf"s3://{name}/jsonl/missing\.jsonl: no such object"):
        ReadJsonl(f"s3://{name}/jsonl/missing.jsonl")
    with pytest.raises(FileNotFoundError, match=rf"s3://{name}/parquet/\*\.parquet: no object matches"):
        ReadArrow(f"s3://{name}/parquet/*.parquet")
    with pytest.raises(
        FileNotFoundError, match=r"s3://no-such-bucket-here/x\.jsonl: no bucket s3://no-such-bucket-here"
    ):
        ReadJsonl("s3://no-such-bucket-here/x.jsonl")
    node = ReadJsonl(f"s3://{name}/jsonl/a.jsonl")
    boto3.client("s3").delete_object(Bucket=name, Key="jsonl/a.jsonl")  # gone after the pipeline was built
    with pytest.raises(
        StageError, match=rf"stage 'read_jsonl', file s3://{name}/jsonl/a\.jsonl: cannot open: .*no such object"
    ):
        list(node)


def _flaky_proxy(
    target: str, failures: int, log: list | None = None
) -> tuple[ThreadingHTTPServer, Counter]:
    """An HTTP proxy to ``target`` that answers 503 SlowDown to the first ``failures`` GETs of each object
    (and appends ``(method, key, Range header, bytes sent)`` of each request it forwards to ``log``)."""
    host, port = target.removeprefix("http://").split(":")
    refused: Counter = Counter()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: Nagle held the body ~40 ms for an ACK

        def log_message(self, *args) -> None:
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            key = self.path.split("?")[0]
            if self.command == "GET" and "." in key and refused[key] < failures:  # an object's bytes, not a listing
                refused[key] += 1
                error = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(error)))
                self.end_headers()
                self.wfile.write(error)
                return
            upstream = http.client.HTTPConnection(host, int(port))
            upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(name, value)
            self.send_header(
                "Content-Length", response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            )
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            if log is not None:
                log.append((self.command, key, self.headers.get("Range"), len(data)))

        do_GET = do_HEAD = do_PUT = do_POST = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, refused


def _upload_kilobyte_objects(put) -> list[dict]:
    """Three .jsonl.zst objects of ~2 KB: larger than an error body. (The AWS SDK writes a 503's body into
    the read's buffer, so a read of fewer bytes than that, an object of a few dozen bytes, fails instead
    of being retried.)"""
    records = [
        {"id": f"{f}-{i}", "text": f"{i} " + random.Random(i).randbytes(40).hex()} for f in range(3) for i in range(30)
    ]
    for f in range(3):
        put(f"jsonl/part-{f}.jsonl.zst", _jsonl_zst(records[30 * f : 30 * f + 30]))
    return records


def _quick_retries(monkeypatch) -> None:
    """The SDK's legacy retry strategy (25 ms * 2**n before retry n) in place of the standard one's jittered
    backoff (up to 2**n s): as many attempts (``storage.RETRIES``), on the same errors, without seconds of sleep."""
    monkeypatch.setattr(storage, "S3_RETRY_STRATEGY", pafs.AwsDefaultS3RetryStrategy)


@pytest.mark.parametrize("failures", [1, 3])
def test_transient_errors_are_retried(tmp_path, bucket, s3_endpoint, monkeypatch, failures):
    name, put = bucket
    if failures > 1:  # one failure per object is retried with the library's own strategy (~0.5 s an object)
        _quick_retries(monkeypatch)
    parquet_ids = write_arrow_corpus(tmp_path / "pq", fmt="parquet")
    for path in sorted((tmp_path / "pq").iterdir()):
        put(f"parquet/{path.name}", path.read_bytes())
    records = _upload_kilobyte_objects(put)
    server, refused = _flaky_proxy(s3_endpoint, failures)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        assert [d["id"] for d in ReadArrow(f"s3://{name}/parquet/*.parquet")] == parquet_ids
        assert [d["id"] for d in ReadJsonl(f"s3://{name}/jsonl/*.zst")] == [r["id"] for r in records]
    finally:
        server.shutdown()
    assert len(refused) == 4 + 3 and set(refused.values()) == {failures}  # every object refused, then read


def test_an_object_that_keeps_failing_is_a_clear_error(tmp_path, bucket, s3_endpoint, monkeypatch):
    name, put = bucket
    _quick_retries(monkeypatch)
    records = _upload_kilobyte_objects(put)
    put("plain/a.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    server, refused = _flaky_proxy(s3_endpoint, failures=10**6)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        node = ReadJsonl(f"s3://{name}/plain/a.jsonl")  # built from a listing: no object read yet
        with pytest.raises(
            StageError,
            match=rf"stage 'read_jsonl', file s3://{name}/plain/a\.jsonl: cannot read \(AWS Error",
        ):
            list(node)
        with pytest.raises(
            ValueError, match=rf"s3://{name}/jsonl/part-0\.jsonl\.zst: cannot read \(AWS Error"
        ):
            ReadJsonl(f"s3://{name}/jsonl/*.zst")  # its seek table is looked for when the pipeline is built
    finally:
        server.shutdown()
    assert min(refused.values()) > 1  # retried before giving up


def test_hugging_face_dataset_dict_folder_on_s3(tmp_path, bucket):
    datasets = pytest.importorskip("datasets")
    name, put = bucket
    splits = {"train": [f"train {i}" for i in range(40)], "validation": [f"val {i}" for i in range(6)]}
    folder = tmp_path / "dd"
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(folder), num_shards={"train": 3, "validation": 1}
    )
    for path in folder.rglob("*"):
        if path.is_file():
            put(f"dd/{path.relative_to(folder)}", path.read_bytes())
    with pytest.raises(ValueError, match="splits train, validation; set `split`"):
        ReadArrow(f"s3://{name}/dd")
    assert [d["text"] for d in ReadArrow(f"s3://{name}/dd", split="train")] == splits["train"]
    assert [d["text"] for d in ReadArrow(f"s3://{name}/dd/", split="validation")] == splits["validation"]


# --- read_tokens: a token cache in object storage ---------------------------------------------------


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory) -> Path:
    """A token cache prepared locally, in shards of ~2000 tokens and record batches of ~500: windows cross both."""
    root = tmp_path_factory.mktemp("tokens")
    write_text_corpus(root / "corpus")
    config = {"stages": {
        "read": {"type": "read_text", "paths": [str(root / "corpus")], "chunk_bytes": 300, "shard_bytes": 2000},
        "encode": {"type": "bpe_encode", "input": "read", "batch_bytes": 500},
    }}
    assert len(prepare(config, root / "cache", shard_tokens=2000, batch_tokens=500)["shards"]) > 4
    return root / "cache"


def _upload_cache(cache: Path, put, prefix: str = "cache") -> None:
    for path in sorted(cache.iterdir()):
        put(f"{prefix}/{path.name}", path.read_bytes())


def _next_second() -> None:
    """Wait into the next whole second of the clock (0.01-1.01 s, not a fixed 1.1 s): what is put from now on has
    a later modification time than anything put before, as S3 keeps them (in whole seconds)."""
    time.sleep(1.01 - time.time() % 1)


def _windows(node) -> np.ndarray:
    return np.concatenate([np.asarray(block) for block in Loader(node)])


@pytest.mark.parametrize(
    "max_length,stride,shuffle,small_requests",
    [(8, 3, False, False), (16, 40, False, False), (8, 3, True, False), (8, 3, False, True), (64, 7, True, True)],
)
def test_read_tokens_from_s3_equals_the_local_cache(
    token_cache, bucket, monkeypatch, max_length, stride, shuffle, small_requests
):
    name, put = bucket
    _upload_cache(token_cache, put)
    if small_requests:  # many requests a block, each of a few windows
        monkeypatch.setattr(objects, "GAP_TOKENS", 5)
        monkeypatch.setattr(objects, "READ_TOKENS", 2 * max_length + 20)
    args = dict(max_length=max_length, stride=stride, shuffle=shuffle, seed=3, block_windows=300)
    local = _windows(ReadTokens(str(token_cache), **args))
    assert len(local) > 300
    assert np.array_equal(_windows(ReadTokens(f"s3://{name}/cache{'/' if shuffle else ''}", **args)), local)
    assert np.array_equal(_windows(ReadTokens(f"file://{token_cache}", **args)), local)


def test_read_tokens_reads_byte_ranges_not_whole_objects(tmp_path, bucket, s3_endpoint, monkeypatch):
    name, put = bucket
    write_text_corpus(tmp_path / "corpus")
    config = {"stages": {
        "read": {"type": "read_text", "paths": [str(tmp_path / "corpus")]},
        "encode": {"type": "bpe_encode", "input": "read"},
    }}
    manifest = prepare(config, tmp_path / "cache", batch_tokens=1000)  # one shard, batches of ~1000 tokens
    assert len(manifest["shards"]) == 1 and manifest["counts"]["tokens"] > 10_000
    _upload_cache(tmp_path / "cache", put)
    log: list = []
    server, _ = _flaky_proxy(s3_endpoint, failures=0, log=log)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        node = ReadTokens(f"s3://{name}/cache", max_length=16, stride=16, block_windows=20)
        block = next(iter(Loader(node)))
    finally:
        server.shutdown()
    expected = next(iter(Loader(ReadTokens(str(tmp_path / "cache"), 16, 16, block_windows=20))))
    assert np.array_equal(block, expected)
    reads = [(r, sent) for method, key, r, sent in log if method == "GET" and key.endswith(".arrow")]
    assert reads and all(r is not None and r.startswith("bytes=") for r, _ in reads)  # ranged requests only
    # the first 20 windows: their 340 tokens and the footer, not the 20+ KB object
    assert sum(sent for _, sent in reads) < manifest["shards"][0]["bytes"] / 4


@pytest.mark.parametrize("shuffle", [False, True])
def test_read_tokens_from_s3_world_size_2_by_2_workers_each_window_exactly_once(token_cache, bucket, shuffle):
    name, put = bucket
    _upload_cache(token_cache, put)
    stage = {"type": "read_tokens", "path": f"s3://{name}/cache", "max_length": 8, "stride": 3, "shuffle": shuffle,
             "block_windows": 16}
    seen = []
    for rank in range(2):
        pipe = Pipeline.from_config({"stages": {"tokens": stage}}, rank=rank, world_size=2, num_workers=2)
        seen += [row.tobytes() for block in pipe for row in np.asarray(block)]
    local = _windows(ReadTokens(str(token_cache), 8, 3))
    assert len(seen) == len(local) and Counter(seen) == Counter(row.tobytes() for row in local)


def test_read_tokens_resume_from_s3_is_exact(token_cache, bucket):
    name, put = bucket
    _upload_cache(token_cache, put)
    reference = check_resume(
        lambda: ReadTokens(f"s3://{name}/cache", 16, 23, shuffle=True, seed=2, block_windows=60), stop_after=[0, 3]
    )
    assert len(reference) > 5


def test_read_tokens_refuses_a_replaced_shard_object(token_cache, bucket):
    name, put = bucket
    _upload_cache(token_cache, put)
    shard = sorted(token_cache.glob("tokens-*.arrow"))[1]
    config = {"stages": {"tokens": {"type": "read_tokens", "path": f"s3://{name}/cache", "max_length": 8,
                                    "stride": 3}}}
    pipe = Pipeline.from_config(config, num_workers=0)
    next(iter(pipe))
    state = json.loads(json.dumps(pipe.state_dict()))
    node = ReadTokens(f"s3://{name}/cache", 8, 3)
    _next_second()
    put(f"cache/{shard.name}", shard.read_bytes())  # the same size: only its modification time tells
    with pytest.raises(ValueError, match="`corpus` was"):
        Pipeline.from_config(config, num_workers=0).load_state_dict(state)
    with pytest.raises(StageError, match=rf"stage 'read_tokens', file s3://{name}/cache/{shard.name}: changed since"):
        list(Loader(node))


def test_read_tokens_missing_cache_bucket_shard_and_layout_are_clear_errors(token_cache, bucket):
    name, put = bucket
    with pytest.raises(ValueError, match=rf"s3://{name}/nowhere.*no such object.*not a prepared token cache"):
        ReadTokens(f"s3://{name}/nowhere", 8, 3)
    with pytest.raises(ValueError, match="no bucket s3://no-such-bucket-here.*not a prepared token cache"):
        ReadTokens("s3://no-such-bucket-here/cache", 8, 3)
    manifest = json.loads((token_cache / "manifest.json").read_text())
    for path in sorted(token_cache.glob("tokens-*.arrow"))[1:]:
        put(f"cache/{path.name}", path.read_bytes())
    put("cache/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ValueError, match=rf"s3://{name}/cache.*shard tokens-00000\.arrow is missing"):
        ReadTokens(f"s3://{name}/cache", 8, 3)
    shard = sorted(token_cache.glob("tokens-*.arrow"))[0]
    put(f"cache/{shard.name}", shard.read_bytes())
    for entry in manifest["shards"]:
        del entry["ids_at"]  # a cache prepared before shards said where their tokens lie
    put("cache/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ValueError, match=r"does not say where shard tokens-00000\.arrow.s tokens lie.*prepare it"):
        ReadTokens(f"s3://{name}/cache", 8, 3)


# --- prepare: a corpus in object storage -----------------------------------------------------------------


def _prepare_config(kind: str, where: str) -> dict:
    """prepare's config: the Parquet or JSONL.zst corpus under ``where`` (a local folder or an s3:// prefix)."""
    reader = {"type": "read_arrow", "paths": [f"{where}/parquet/*.parquet"]}
    if kind == "jsonl":
        reader = {"type": "read_jsonl", "paths": [f"{where}/jsonl/*.jsonl.zst"]}
    return {"stages": {"read": reader, "encode": {"type": "bpe_encode", "input": "read", "batch_bytes": 200}}}


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_prepare_a_corpus_in_s3_gives_the_caches_windows_of_the_local_corpus(tmp_path, bucket, kind):
    name, put = bucket
    _upload_corpus(tmp_path, put)
    (tmp_path / "parquet").symlink_to(tmp_path / "pq")  # the same layout locally
    local = prepare(_prepare_config(kind, str(tmp_path)), tmp_path / "local", shard_tokens=100, batch_tokens=30)
    config = tmp_path / "s3.json"
    config.write_text(json.dumps(_prepare_config(kind, f"s3://{name}")))
    run = cli("prepare", str(config), "--out", str(tmp_path / "remote"), "--shard-tokens", "100")
    assert run.returncode == 0, run.stderr
    remote = json.loads((tmp_path / "remote" / "manifest.json").read_text())
    assert remote["counts"] == local["counts"] and len(local["shards"]) > 2
    for theirs, ours in zip(remote["sources"], local["sources"], strict=True):
        assert theirs["path"] == theirs["abspath"] == f"s3://{name}/{kind}/" + ours["path"].rsplit("/", 1)[1]
        assert [theirs["size"], theirs["sha256"]] == [ours["size"], ours["sha256"]]
        local_bytes = Path(ours["abspath"]).read_bytes()
        assert [theirs["size"], theirs["sha256"]] == [len(local_bytes), hashlib.sha256(local_bytes).hexdigest()]
    for args in [(8, 3), (32, 32)]:
        windows = _windows(ReadTokens(str(tmp_path / "remote"), *args))
        assert len(windows) > 9 and np.array_equal(windows, _windows(ReadTokens(str(tmp_path / "local"), *args)))


def _replace(where: str, tmp_path, put, key: str, body: bytes) -> None:
    """Put ``body`` in place of the file or object ``key``, with a later modification time."""
    _next_second()
    if where == "s3":
        put(key, body)
    else:
        (tmp_path / key).write_bytes(body)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_replaced_source_is_a_stale_cache_and_another_corpus_as_for_local_files(tmp_path, bucket, where):
    name, put = bucket
    _upload_corpus(tmp_path, put)
    config = _prepare_config("jsonl", f"s3://{name}" if where == "s3" else str(tmp_path))
    prepare(config, tmp_path / "cache")
    prepare(config, tmp_path / "cache")  # the same corpus: replaced, not refused
    assert ReadTokens(str(tmp_path / "cache"), 8, 3).n_windows > 0
    old = (tmp_path / "jsonl" / "part-2.jsonl.zst").read_bytes()
    _replace(where, tmp_path, put, "jsonl/part-2.jsonl.zst", old[::-1])  # the same size, other bytes
    with pytest.raises(ValueError, match=r"stale cache: source .*part-2\.jsonl\.zst changed .*same size, another sha"):
        ReadTokens(str(tmp_path / "cache"), 8, 3)
    _replace(where, tmp_path, put, "jsonl/part-2.jsonl.zst", old)  # back: a new mtime, the same sha256
    assert ReadTokens(str(tmp_path / "cache"), 8, 3).n_windows > 0
    _replace(where, tmp_path, put, "jsonl/part-2.jsonl.zst", old + b"\n")
    with pytest.raises(ValueError, match=rf"stale cache: source .*part-2\.jsonl\.zst is now {len(old) + 1:,} bytes"):
        ReadTokens(str(tmp_path / "cache"), 8, 3)
    with pytest.raises(PrepareError, match="holds a cache of another corpus"):
        prepare(config, tmp_path / "cache")


def test_a_cache_of_s3_sources_is_read_where_the_store_cannot_be_reached(tmp_path, bucket, monkeypatch):
    name, put = bucket
    _upload_corpus(tmp_path, put)
    prepare(_prepare_config("jsonl", f"s3://{name}"), tmp_path / "cache")
    expected = _windows(ReadTokens(str(tmp_path / "cache"), 8, 3))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(storage, "RETRIES", 1)
    storage._store.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            node = ReadTokens(str(tmp_path / "cache"), 8, 3)
    finally:
        storage._store.cache_clear()  # no filesystem of that endpoint for the next tests
    unchecked = [str(w.message) for w in caught if "not checked" in str(w.message)]
    assert len(unchecked) == 1  # one warning for the bucket's 5 sources
    assert re.search(rf"the sources in s3://{name}/ not checked \(.*connect", unchecked[0])
    assert np.array_equal(_windows(node), expected)


def test_an_object_replaced_while_prepare_reads_it_leaves_no_cache(tmp_path, bucket, monkeypatch):
    name, put = bucket
    _upload_corpus(tmp_path, put)
    rows = local_engine.rows

    def replacing(*args):
        for n, row in enumerate(rows(*args)):
            if n == 0:  # the local engine gives a block of rows per encode call: this corpus is one or two
                _replace("s3", tmp_path, put, "jsonl/part-4.jsonl.zst", _jsonl_zst([{"text": "a new object"}]))
            yield row

    monkeypatch.setattr(local_engine, "rows", replacing)
    with pytest.raises(PrepareError, match=rf"source s3://{name}/jsonl/part-4\.jsonl\.zst changed while it was being"):
        prepare(_prepare_config("jsonl", f"s3://{name}"), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_prepare_names_a_missing_object_or_bucket(tmp_path, bucket, monkeypatch):
    name, put = bucket
    _upload_corpus(tmp_path, put)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(_prepare_config("jsonl", f"s3://{name}/nowhere")))
    run = cli("prepare", str(config), "--out", str(tmp_path / "cache"))
    assert run.returncode == 2 and f"s3://{name}/nowhere/jsonl/*.jsonl.zst: no object matches" in run.stderr
    config.write_text(json.dumps(_prepare_config("jsonl", "s3://no-such-bucket-here")))
    run = cli("prepare", str(config), "--out", str(tmp_path / "cache"))
    assert run.returncode == 2 and "no bucket s3://no-such-bucket-here" in run.stderr
    describe = format.describe_sources

    def deleting(paths):  # gone after the pipeline listed it, before prepare read it
        boto3.client("s3").delete_object(Bucket=name, Key="jsonl/part-1.jsonl.zst")
        return describe(paths)

    monkeypatch.setattr(prepare_module, "describe_sources", deleting)
    config.write_text(json.dumps(_prepare_config("jsonl", f"s3://{name}")))
    run = cli("prepare", str(config), "--out", str(tmp_path / "cache"))
    assert run.returncode == 2 and f"source s3://{name}/jsonl/part-1.jsonl.zst: no such file or object" in run.stderr
    assert not (tmp_path / "cache").exists()


# --- prepare --out s3://: shards first, the manifest last ------------------------------------------------


def _objects(name: str, prefix: str) -> dict[str, bytes]:
    client = boto3.client("s3")
    listed = client.list_objects_v2(Bucket=name, Prefix=f"{prefix}/").get("Contents", [])
    keys = [o["Key"] for o in listed if not o["Key"].endswith("/")]  # pyarrow marks a folder emptied by a delete
    return {key[len(prefix) + 1 :]: client.get_object(Bucket=name, Key=key)["Body"].read() for key in keys}


def _stop_after(monkeypatch, shards: int, then) -> None:
    """prepare calls ``then()`` once it has uploaded ``shards`` shard objects (and raises what it raises)."""
    uploaded = []

    def stopping(local: str, uri: str) -> None:
        storage.upload(local, uri)
        uploaded.append(uri)
        if len(uploaded) == shards and not uri.endswith("manifest.json"):
            then()

    monkeypatch.setattr(prepare_module, "upload", stopping)


def test_prepare_out_to_s3_writes_the_local_cache_with_the_manifest_last(tmp_path, bucket, monkeypatch):
    name, put = bucket
    _upload_corpus(tmp_path, put)
    monkeypatch.chdir(tmp_path)
    config = _prepare_config("jsonl", f"s3://{name}")
    prepare(config, tmp_path / "local", shard_tokens=100, batch_tokens=30)
    midway = []
    _stop_after(monkeypatch, 1, lambda: midway.append(sorted(_objects(name, "cache"))))
    prepare(config, f"s3://{name}/cache/", shard_tokens=100, batch_tokens=30)
    assert midway[0] and "manifest.json" not in midway[0]  # shards were uploaded before it
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    assert _objects(name, "cache") == local and len(local) > 3  # the same bytes, manifest included
    for args in [(8, 3), (5, 11)]:
        windows = _windows(ReadTokens(f"s3://{name}/cache", *args))
        assert len(windows) > 20 and np.array_equal(windows, _windows(ReadTokens(str(tmp_path / "local"), *args)))
    assert sorted(os.listdir(tmp_path)) == ["jsonl", "local", "pq"]  # no local folder named s3:


def test_an_interrupted_prepare_to_s3_leaves_no_cache_and_a_rerun_makes_the_right_one(tmp_path, bucket, monkeypatch):
    name, put = bucket
    _upload_corpus(tmp_path, put)
    config = _prepare_config("jsonl", f"s3://{name}")
    prepare(config, f"s3://{name}/cache", shard_tokens=100)
    assert ReadTokens(f"s3://{name}/cache", 8, 3).n_windows > 0

    def interrupt():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        _stop_after(patch, 1, interrupt)
        with pytest.raises(KeyboardInterrupt):
            prepare(config, f"s3://{name}/cache", shard_tokens=100)
    assert "manifest.json" not in _objects(name, "cache") and len(_objects(name, "cache")) > 1
    with pytest.raises(ValueError, match=rf"s3://{name}/cache.*not a prepared token cache"):
        ReadTokens(f"s3://{name}/cache", 8, 3)
    put("cache/tokens-00099.arrow", b"left by a killed prepare")
    prepare(config, f"s3://{name}/cache", shard_tokens=200)  # fewer shards than before: the others removed
    prepare(config, tmp_path / "local", shard_tokens=200)
    assert _objects(name, "cache") == {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    with pytest.raises(PrepareError, match="holds a cache of another corpus"):
        prepare(_prepare_config("parquet", f"s3://{name}"), f"s3://{name}/cache")
    put("notes/read-me.txt", b"keep me")
    with pytest.raises(PrepareError, match=rf"s3://{name}/notes' holds objects without manifest.json \(read-me"):
        prepare(config, f"s3://{name}/notes", overwrite=True)
    assert _objects(name, "notes") == {"read-me.txt": b"keep me"}
    with pytest.raises(FileNotFoundError, match="no bucket s3://no-such-bucket-here"):
        prepare(config, "s3://no-such-bucket-here/cache")
