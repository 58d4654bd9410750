"""``prepare``: token shards and their manifest; atomic under SIGKILL; refusals; the Ray engine."""

from __future__ import annotations

import base64
import filecmp
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from pipeline import Pipeline
from pipeline.cli import main
from stages.tokens.prepare import MANIFEST, PrepareError, prepare, token_dtype
from stages.encoding import load_encoding
from stages.tokens import ReadTokens
from tests.command_line import cli
from tests.corpora import write_arrow_corpus, write_text_corpus
from tests.conftest import ROOT

ENC = load_encoding("gpt2")


def text_config(folder, **read) -> dict:
    return {"stages": {
        "read": {"type": "read_text", "paths": [str(folder)], "chunk_bytes": 300, **read},
        "encode": {"type": "bpe_encode", "input": "read", "batch_bytes": 500},
        "window": {"type": "sliding_window", "input": "encode", "max_length": 8, "stride": 8},  # not run by prepare
        "batch": {"type": "batch", "input": "window", "batch_size": 2},
    }}


def arrow_config(folder) -> dict:
    return {
        "stages": {
            "read": {"type": "read_arrow", "paths": [str(folder)]},
            "encode": {"type": "bpe_encode", "input": "read"},
        }
    }


def shard_rows(folder) -> list[dict]:
    """Every row of a cache's shards, in order: {"ids": [...], "source": ...}."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    out = []
    for shard in manifest["shards"]:
        with pa.memory_map(str(Path(folder) / shard["file"])) as source:
            out += ipc.open_file(source).read_all().to_pylist()
    return out


def same_cache(a, b) -> None:
    """Two caches are the same bytes: manifest and every shard."""
    assert (Path(a) / MANIFEST).read_bytes() == (Path(b) / MANIFEST).read_bytes()
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        assert filecmp.cmp(Path(a) / name, Path(b) / name, shallow=False), name


def r50k_file(path) -> str:
    """r50k_base.tiktoken written from GPT-2's ranks (as tests/stages/test_bpe_encode.py does)."""
    ranks = sorted(ENC._mergeable_ranks.items(), key=lambda item: item[1])
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks))
    return str(path)


# --- what a cache holds --------------------------------------------------------------------------------


def test_rows_are_the_encode_items_and_the_manifest_describes_them(tmp_path):
    files = write_text_corpus(tmp_path / "corpus")
    config = text_config(tmp_path / "corpus", shard_bytes=700)
    manifest = prepare(config, tmp_path / "cache", shard_tokens=400, batch_tokens=150)

    items = list(Pipeline.from_config(config, output="encode"))
    got = shard_rows(tmp_path / "cache")
    assert [r["ids"] for r in got] == [item["ids"].tolist() for item in items]  # one row per item, separators included
    assert [r["source"] for r in got] == [item["source"] for item in items]
    stream = [t for item in items for t in item["ids"].tolist()]
    first = ENC.encode_ordinary(files[sorted(files)[0]])
    assert stream[: len(first) + 1] == first + [50256]

    on_disk = json.loads((tmp_path / "cache" / MANIFEST).read_text())
    assert on_disk == {k: v for k, v in manifest.items() if k != "seconds"}
    assert manifest["encoding"] == {
        "name": "gpt2",
        "ranks_sha256": manifest["encoding"]["ranks_sha256"],
        "n_vocab": 50257,
        "eot_token": 50256,
    }
    ranks = b"".join(
        base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ENC._mergeable_ranks.items(), key=lambda i: i[1])
    )
    assert manifest["encoding"]["ranks_sha256"] == hashlib.sha256(ranks).hexdigest()
    assert manifest["dtype"] == "uint16"
    nonempty = [p for p, t in files.items() if t]
    assert manifest["counts"] == {
        "documents": len(nonempty),
        "tokens": len(stream),
        "rows": len(items),
        "source_bytes": sum(os.path.getsize(p) for p in files),
    }
    assert [s["path"] for s in manifest["sources"]] == sorted(files)
    for source in manifest["sources"]:
        assert source["sha256"] == hashlib.sha256(Path(source["path"]).read_bytes()).hexdigest()
        assert source["size"] == os.path.getsize(source["path"])
    assert len(manifest["shards"]) > 3 and sum(s["tokens"] for s in manifest["shards"]) == len(stream)
    for shard in manifest["shards"]:
        data = (tmp_path / "cache" / shard["file"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
        assert shard["tokens"] >= 400 or shard is manifest["shards"][-1]
    with pa.memory_map(str(tmp_path / "cache" / manifest["shards"][0]["file"])) as source:
        reader = ipc.open_file(source)
        assert reader.schema.field("ids").type == pa.list_(pa.uint16())
        assert reader.num_record_batches > 1
    # the config used: the stages that made the tokens (later ones are neither run nor recorded)
    assert manifest["config"] == {"stages": {k: config["stages"][k] for k in ("read", "encode")}, "output": "encode"}
    assert (tmp_path / "cache").stat().st_mode & 0o777 != 0o700


def test_wide_vocabularies_get_uint32_shards(tmp_path, monkeypatch):
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    import stages.tokens.prepare

    monkeypatch.setattr(
        stages.tokens.prepare, "token_dtype", lambda n: np.dtype(np.uint32)
    )  # as for cl100k_base's 100,277
    write_arrow_corpus(tmp_path / "corpus")
    manifest = prepare(arrow_config(tmp_path / "corpus"), tmp_path / "cache", shard_tokens=100, batch_tokens=30)
    assert manifest["dtype"] == "uint32"
    stream = np.concatenate([i["ids"] for i in Pipeline.from_config(arrow_config(tmp_path / "corpus"))])
    assert [t for r in shard_rows(tmp_path / "cache") for t in r["ids"]] == stream.tolist()
    windows = np.concatenate(list(ReadTokens(str(tmp_path / "cache"), 5, 3)))
    assert np.array_equal(windows, np.stack([stream[i : i + 6] for i in range(0, len(stream) - 5, 3)]))


def test_the_whole_corpus_whatever_the_rank(tmp_path, monkeypatch):
    write_arrow_corpus(tmp_path / "corpus")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    manifest = prepare(arrow_config(tmp_path / "corpus"), tmp_path / "cache")
    monkeypatch.delenv("RANK"), monkeypatch.delenv("WORLD_SIZE")
    items = list(Pipeline.from_config(arrow_config(tmp_path / "corpus")))
    assert manifest["counts"]["rows"] == len(items) and manifest["counts"]["documents"] == len(items)


@pytest.mark.parametrize("kind", ["text", "arrow"])
def test_a_config_giving_blocks_makes_the_same_shards(tmp_path, kind):
    if kind == "text":  # pieces of a file continue one another: rows without a separator
        write_text_corpus(tmp_path / "corpus")
        config = text_config(tmp_path / "corpus", shard_bytes=700)
    else:
        write_arrow_corpus(tmp_path / "corpus")
        config = arrow_config(tmp_path / "corpus")
    blocks = json.loads(json.dumps(config))
    blocks["stages"]["encode"]["blocks"] = True
    rows = prepare(config, tmp_path / "rows", shard_tokens=400, batch_tokens=150)
    made = prepare(blocks, tmp_path / "blocks", shard_tokens=400, batch_tokens=150)
    assert made["counts"] == rows["counts"] and made["shards"] == rows["shards"] and len(rows["shards"]) > 1
    for shard in rows["shards"]:
        assert filecmp.cmp(tmp_path / "rows" / shard["file"], tmp_path / "blocks" / shard["file"], shallow=False)


def test_the_encoding_is_recorded_alike_whether_or_not_tiktokens_encoding_is_built(tmp_path, backend, monkeypatch):
    from stages import encoding as encoding_module

    write_arrow_corpus(tmp_path / "corpus")
    built = arrow_config(tmp_path / "corpus")
    built["stages"]["encode"]["backend"] = "tiktoken"
    expected = prepare(built, tmp_path / "built")["encoding"]
    loads, load = [], encoding_module._load
    monkeypatch.setattr(encoding_module, "_load", lambda *args: loads.append(args) or load(*args))
    config = arrow_config(tmp_path / "corpus")
    config["stages"]["encode"]["backend"] = backend
    assert prepare(config, tmp_path / "cache")["encoding"] == expected
    # gigatoken over tiktoken's cached GPT-2 ranks (ENC's load left them there) needs no Encoding
    assert loads == ([] if backend == "gigatoken" else [("gpt2", ())])


# --- refusals and replacing ------------------------------------------------------------------------------


def test_another_encoding_in_out_is_refused_unless_overwrite(tmp_path):
    write_arrow_corpus(tmp_path / "corpus")
    prepare(arrow_config(tmp_path / "corpus"), tmp_path / "cache")
    other = arrow_config(tmp_path / "corpus")
    other["stages"]["encode"].update(
        encoding="r50k_base", encoding_files={"r50k_base.tiktoken": r50k_file(tmp_path / "r50k_base.tiktoken")}
    )
    with pytest.raises(
        PrepareError, match="holds a cache of encoding `gpt2`, this config encodes with `r50k_base`.*--overwrite"
    ):
        prepare(other, tmp_path / "cache")
    manifest = prepare(other, tmp_path / "cache", overwrite=True)
    assert manifest["encoding"]["name"] == "r50k_base"
    # the same ranks (r50k_base is GPT-2's vocabulary), but read_tokens asking for gpt2 is told
    assert (
        manifest["encoding"]["ranks_sha256"]
        == prepare(arrow_config(tmp_path / "corpus"), tmp_path / "g")["encoding"]["ranks_sha256"]
    )
    with pytest.raises(ValueError, match="prepared with encoding `r50k_base`, this stage asks for `gpt2`"):
        ReadTokens(str(tmp_path / "cache"), 4, 4, encoding="gpt2")


def test_another_corpus_in_out_is_refused_and_the_same_one_is_replaced(tmp_path):
    write_arrow_corpus(tmp_path / "a")
    write_arrow_corpus(tmp_path / "b", batches_per_file=(2,))
    prepare(arrow_config(tmp_path / "a"), tmp_path / "cache")
    with pytest.raises(PrepareError, match="holds a cache of another corpus"):
        prepare(arrow_config(tmp_path / "b"), tmp_path / "cache")
    again = prepare(arrow_config(tmp_path / "a"), tmp_path / "cache", shard_tokens=40)  # same corpus: rebuilt
    assert len(again["shards"]) > 1
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "cache"]  # nothing left beside it


def test_a_folder_that_is_not_a_cache_is_never_replaced(tmp_path):
    write_arrow_corpus(tmp_path / "corpus")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(PrepareError, match="non-empty folder without manifest.json"):
            prepare(arrow_config(tmp_path / "corpus"), tmp_path / "mine", overwrite=overwrite)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_prepare_and_its_errors(tmp_path, capsys):
    write_arrow_corpus(tmp_path / "corpus")
    config = tmp_path / "c.json"
    config.write_text(json.dumps(arrow_config(tmp_path / "corpus")))
    assert main(["prepare", str(config), "--out", str(tmp_path / "cache"), "--shard-tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert "prepared" in out and "tokens (uint16)" in out and "MB/s" in out
    other = tmp_path / "o.json"
    other.write_text(json.dumps(arrow_config(tmp_path / "corpus" / "part-0.arrow")))  # one file of the corpus
    assert main(["prepare", str(other), "--out", str(tmp_path / "cache")]) == 2
    assert "another corpus" in capsys.readouterr().err
    no_encode = tmp_path / "n.json"
    no_encode.write_text(json.dumps({"stages": {"read": {"type": "read_arrow", "paths": [str(tmp_path / "corpus")]}}}))
    assert main(["prepare", str(no_encode), "--out", str(tmp_path / "x")]) == 2
    assert "needs a stage that gives tokens" in capsys.readouterr().err


def test_engine_ray_without_ray_says_how_to_install(tmp_path, capsys, monkeypatch):
    write_arrow_corpus(tmp_path / "corpus")
    config = tmp_path / "c.json"
    config.write_text(json.dumps(arrow_config(tmp_path / "corpus")))
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["prepare", str(config), "--out", str(tmp_path / "cache"), "--engine", "ray"]) == 2
    assert "pip install '.[ray]'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["c.json", "corpus"]


# --- atomic: killed, then run again ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """~20 MB of Arrow documents made from the project's own sample text."""
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "data" / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    folder = tmp_path_factory.mktemp("big")
    make_corpus.make_corpus(
        sorted((ROOT / "data" / "sample").glob("*.txt")), 20_000_000, folder / "corpus", fmt="arrow"
    )
    config = folder / "config.json"
    config.write_text(json.dumps(arrow_config(folder / "corpus")))
    return folder, config


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_cache_and_a_rerun_makes_the_right_one(big_corpus):
    folder, config = big_corpus
    out = folder / "cache"
    command = [sys.executable, "-m", "pipeline", "prepare", str(config), "--out", str(out), "--shard-tokens", "200000"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    started = []
    while not started and proc.poll() is None and time.monotonic() < deadline:
        started = [p for p in folder.glob(".cache.prepare-*/tokens-00002.arrow")]  # two shards written, a third begun
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert started and proc.returncode == -signal.SIGKILL, "prepare ended before it could be killed mid-run"
    assert not out.exists()  # nothing that looks like a cache
    assert list(folder.glob(".cache.prepare-*"))  # its leftovers, which the next run removes

    done = cli(*command[3:])  # the same command again, in this process
    assert done.returncode == 0, done.stderr
    assert not list(folder.glob(".cache.*"))
    prepare(config, folder / "uninterrupted", shard_tokens=200_000)
    same_cache(out, folder / "uninterrupted")
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["shards"]) > 5 and manifest["counts"]["source_bytes"] > 20_000_000
    windows = ReadTokens(str(out), 256, 128)
    assert windows.n_windows == len(range(0, manifest["counts"]["tokens"] - 256, 128))


# --- the Ray engine ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the Ray engine needs `pip install '.[ray]'`")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ray_engine_writes_the_same_cache_as_the_local_one(ray_cluster, tmp_path):
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "data" / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    sample = sorted((ROOT / "data" / "sample").glob("*.txt"))
    make_corpus.make_corpus(sample, 2_000_000, tmp_path / "text", fmt="text", file_size=700_000)
    make_corpus.make_corpus(sample, 2_000_000, tmp_path / "arrow", fmt="arrow", docs_per_batch=200)
    (tmp_path / "text" / "empty.txt").write_text("")
    configs = {
        # byte ranges smaller than the files: pieces continue across Ray batches (no separator between them)
        "text": text_config(tmp_path / "text", shard_bytes=150_000, chunk_bytes=40_000),
        "arrow": arrow_config(tmp_path / "arrow"),
    }
    for name, config in configs.items():
        local = prepare(config, tmp_path / f"{name}-local", shard_tokens=150_000, batch_tokens=30_000)
        ray = prepare(config, tmp_path / f"{name}-ray", engine="ray", shard_tokens=150_000, batch_tokens=30_000)
        assert local["counts"] == ray["counts"] and len(local["shards"]) > 2
        same_cache(tmp_path / f"{name}-local", tmp_path / f"{name}-ray")
