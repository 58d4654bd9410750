"""Bad input on the command line and in configs and checkpoints: one `error:` line naming the stage and
field, exit 2, before the run starts; never a traceback, never a run on a silently different config."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import yaml

from pipeline import ConfigError, Pipeline, StageError
from tests.command_line import clean_error, cli
from tests.conftest import ROOT

CONFIG = """stages:
  read:   {type: read_text, paths: [CORPUS], chunk_bytes: 256}
  encode: {type: bpe_encode, input: read}
  window: {type: sliding_window, input: encode, max_length: 8, stride: 8}
  batch:  {type: batch, input: window, batch_size: 2}
"""


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(f"word{i} and more." for i in range(400)), encoding="utf-8")
    return path


def config_file(tmp_path, corpus, text: str = CONFIG) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("CORPUS", str(corpus)), encoding="utf-8")
    return str(path)


def error_of(*argv: str) -> str:
    """The CLI must fail with exit 2 and one `error:` line, no traceback, before the run; return the line."""
    done = cli(*argv)
    if done.stderr.startswith("usage:"):  # argparse's own errors: usage, then `prog: error: ...`
        assert done.returncode == 2 and "error: " in done.stderr and "Traceback" not in done.stderr, done.stderr
    else:
        clean_error(done)
    assert "batches:" not in done.stdout  # refused before the run
    return done.stderr


def run_ok(*argv: str) -> str:
    done = cli(*argv)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# --- item 4: wrong configs that ran ------------------------------------------------------------


@pytest.mark.parametrize("fractions", ["{train: .nan, validation: 0.5}", "{train: .inf, validation: 0.5}"])
def test_split_fractions_that_are_not_numbers_are_refused(tmp_path, corpus, fractions):
    text = CONFIG.replace("encode: {type: bpe_encode, input: read}",
                          "split:  {type: split, input: read, fractions: F}\n"
                          "  encode: {type: bpe_encode, input: split.train}").replace("F", fractions)
    err = error_of("run", config_file(tmp_path, corpus, text))
    assert "stage `split`" in err and "fractions" in err


@pytest.mark.parametrize("style", ["flow", "block"])
def test_a_yaml_key_given_twice_is_refused_naming_key_and_stage(tmp_path, corpus, style):
    if style == "flow":
        text = CONFIG.replace("stride: 8}", "stride: 4, stride: 400}")
    else:
        text = CONFIG.replace("  window: {type: sliding_window, input: encode, max_length: 8, stride: 8}\n",
                              "  window:\n    type: sliding_window\n    input: encode\n    max_length: 8\n"
                              "    stride: 4\n    stride: 400\n")
    err = error_of("run", config_file(tmp_path, corpus, text))
    assert "duplicate key `stride`" in err and "stage `window`" in err


def test_a_stage_given_twice_is_refused(tmp_path, corpus):
    text = CONFIG + "  batch:  {type: batch, input: window, batch_size: 64}\n"
    assert "duplicate key `batch` in `stages`" in error_of("run", config_file(tmp_path, corpus, text))


def test_a_json_key_given_twice_is_refused(tmp_path, corpus):
    path = tmp_path / "config.json"
    path.write_text('{"stages": {"read": {"type": "read_text", "paths": ["x"], "paths": ["y"]}}}')
    assert "duplicate key `paths`" in error_of("run", str(path))


def test_embed_on_the_meta_device_is_refused(tmp_path, corpus):
    text = CONFIG + ("  embed:  {type: embed, input: batch, vocab_size: 50257, d_model: 8, context_length: 8, "
                     "device: meta}\n")
    err = error_of("run", config_file(tmp_path, corpus, text))
    assert "stage `embed`" in err and "meta" in err


# --- item 7: bench on the README's fan-in / fan-out example --------------------------------------


def test_bench_runs_the_mix_split_example(in_root):
    out = run_ok("bench", "examples/mix_split.yaml", "--max-batches", "2")
    assert "split.train" in out and "bottleneck:" in out


# --- item 8: tracebacks where an error belongs ---------------------------------------------------

BAD_CONFIGS = {  # an edit of CONFIG, words the message must hold
    "stage named 1": (("  batch: ", "  1: "), ["stage `1`", "quote"]),
    "output 5": (("stages:", "output: 5\nstages:"), ["`output`", "5"]),
    "output list": (("stages:", "output: [batch]\nstages:"), ["`output`", "['batch']"]),
    "split seed 2**64": (("encode: {type: bpe_encode, input: read}", "split: {type: split, input: read, "
                          "fractions: {a: 1}, seed: 18446744073709551616}\n"
                          "  encode: {type: bpe_encode, input: split.a}"),
                         ["stage `split`", "seed"]),
    "chunk_bytes 10**12": (("chunk_bytes: 256", "chunk_bytes: 1000000000000"), ["stage `read`", "chunk_bytes"]),
    "chunk_bytes 2**63": (("chunk_bytes: 256", "chunk_bytes: 9223372036854775808"), ["stage `read`", "chunk_bytes"]),
    "negative seed": (("batch_size: 2}", "batch_size: 2, shuffle: true, seed: -1}"), ["stage `batch`", "seed"]),
    "mix weights nan": (("encode: {type: bpe_encode, input: read}", "mix: {type: mix, inputs: [read], "
                         "weights: [.nan]}\n  encode: {type: bpe_encode, input: mix}"), ["stage `mix`", "weights"]),
    "mix weights inf": (("encode: {type: bpe_encode, input: read}", "mix: {type: mix, inputs: [read], "
                         "weights: [.inf]}\n  encode: {type: bpe_encode, input: mix}"), ["stage `mix`", "weights"]),
    "mix weights overflow": (("read:   {", "other: {type: read_text, paths: [CORPUS]}\n  read:   {"),
                             ("encode: {type: bpe_encode, input: read}", "mix: {type: mix, inputs: [read, other], "
                              "weights: [1.0e+308, 1.0e+308]}\n  encode: {type: bpe_encode, input: mix}"),
                             ["stage `mix`", "weights"]),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_bad_config_is_an_error_naming_stage_and_field(tmp_path, corpus, case):
    *edits, words = BAD_CONFIGS[case]
    text = CONFIG
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    err = error_of("run", config_file(tmp_path, corpus, text))
    for word in words:
        assert word in err


def test_set_with_a_value_that_is_not_yaml(tmp_path, corpus):
    err = error_of("run", config_file(tmp_path, corpus), "--set", "read.paths=[a")
    assert "stage `read`" in err and "read.paths=[a" in err


@pytest.mark.parametrize("flag,value", [("--checkpoint-every", "0"), ("--checkpoint-every", "-3"),
                                        ("--max-batches", "-1")])
def test_flags_out_of_range_are_refused(tmp_path, corpus, flag, value):
    assert flag in error_of("run", config_file(tmp_path, corpus), flag, value)


def test_a_checkpoint_path_that_is_a_directory_is_refused_before_the_run(tmp_path, corpus):
    (tmp_path / "ck").mkdir()
    err = error_of("run", config_file(tmp_path, corpus), "--checkpoint", str(tmp_path / "ck"))
    assert "is a directory" in err


def checkpoint(tmp_path, corpus, *more: str) -> dict:
    path = tmp_path / "ck.json"
    run_ok("run", config_file(tmp_path, corpus), "--max-batches", "3", "--checkpoint", str(path), *more)
    return json.loads(path.read_text())


@pytest.mark.parametrize("edit,words", [
    (lambda ck: ck.pop("pipeline"), ["`pipeline`", "missing"]),
    (lambda ck: ck.pop("batches"), ["`batches`", "missing"]),
    (lambda ck: ck["pipeline"].pop("fits"), ["`fits`"]),
    (lambda ck: ck["pipeline"].update(fits={}), ["`graph`"]),  # an empty fits must not skip the check
    (lambda ck: ck["pipeline"]["fits"].pop("corpus"), ["`corpus`"]),
    (lambda ck: ck.update(batches="3"), ["`batches`", "'3'"]),
])
def test_a_checkpoint_lacking_a_field_is_refused_naming_it(tmp_path, corpus, edit, words):
    saved = checkpoint(tmp_path, corpus)
    edit(saved)
    (tmp_path / "edited.json").write_text(json.dumps(saved))
    err = error_of("run", config_file(tmp_path, corpus), "--resume", str(tmp_path / "edited.json"))
    assert "edited.json" in err
    for word in words:
        assert word in err


def test_a_truncated_checkpoint_is_an_error_naming_the_file(tmp_path, corpus):
    checkpoint(tmp_path, corpus)
    text = (tmp_path / "ck.json").read_text()
    (tmp_path / "ck.json").write_text(text[: len(text) // 2])
    err = error_of("run", config_file(tmp_path, corpus), "--resume", str(tmp_path / "ck.json"))
    assert str(tmp_path / "ck.json") in err and "JSON" in err


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    import pipeline.checkpoint

    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 1:  # the first checkpoint (after batch 2) is written; the next finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(pipeline.checkpoint.os, "fsync", fsync)
    path = tmp_path / "ck.json"
    done = cli("run", config_file(tmp_path, corpus), "--checkpoint", str(path), "--checkpoint-every", "2")
    err = done.stderr
    assert done.returncode == 1 and "Traceback" not in err
    assert err.startswith("error: cannot write checkpoint") and str(path) in err and "No space left" in err
    assert json.loads(path.read_text())["batches"] == 2  # the previous one, whole
    assert [f for f in os.listdir(tmp_path) if f.startswith(".checkpoint-")] == []  # no half-written file left


def test_sigint_during_prepare_leaves_nothing_and_no_traceback(tmp_path, corpus):
    # A real process and a real signal: the first shard write sends SIGINT to the process itself.
    child = (
        "import os, signal, sys\n"
        # as from a terminal: an ignored or blocked SIGINT in the test runner's process would survive exec
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
        "from stages.tokens.writer import ShardWriter\n"
        "def add(self, ids, source):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "ShardWriter.add = add\n"
        "from pipeline.cli import main\n"
        f"sys.exit(main(['prepare', {config_file(tmp_path, corpus)!r}, '--out', {str(tmp_path / 'cache')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 130, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "interrupted" in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "corpus.txt"]  # no cache, no hidden partial folder


# --- item 9: errors that mislead ----------------------------------------------------------------


def test_allowed_special_as_one_name_is_that_token(tmp_path):
    from stages.bpe_encode import BpeEncode
    from torchdata.nodes import IterableWrapper

    def ids(allowed):
        doc = IterableWrapper([{"text": "a<|endoftext|>b", "source": "x"}])
        return next(iter(Pipeline(BpeEncode(doc, allowed_special=allowed))))["ids"].tolist()

    assert ids("<|endoftext|>") == ids(["<|endoftext|>"]) == [64, 50256, 65]


def _states(node: dict, key: str):
    """Every dict holding ``key`` inside a nested state."""
    if isinstance(node, dict):
        if key in node:
            yield node
        for value in node.values():
            yield from _states(value, key)


@pytest.mark.parametrize("reader", ["read_text", "read_arrow"])
@pytest.mark.parametrize("field,value", [("position", 10**9), ("position", -5), ("index", 7), ("index", -1)])
def test_reader_positions_are_checked_on_load(tmp_path, corpus, reader, field, value):
    if reader == "read_text":
        spec = {"type": "read_text", "paths": [str(corpus)]}
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["one", "two", "three"]}), tmp_path / "docs.parquet")
        spec = {"type": "read_arrow", "paths": [str(tmp_path / "docs.parquet")]}
    config = {"stages": {"docs": spec}}
    pipe = Pipeline.from_config(config)
    next(iter(pipe))
    state = json.loads(json.dumps(pipe.state_dict()))
    for reader_state in _states(state["loader"], "index"):
        reader_state[field] = value
    fresh = Pipeline.from_config(config)
    with pytest.raises(StageError, match=f"stage 'docs'.*{field}"):
        fresh.load_state_dict(state)
        next(iter(fresh))


@pytest.mark.parametrize("value", [10**9, -5])
def test_read_tokens_positions_are_checked_on_load(tmp_path, corpus, value):
    from stages.tokens.prepare import prepare

    prepare({"stages": {"read": {"type": "read_text", "paths": [str(corpus)]}, "encode": {"type": "bpe_encode",
             "input": "read"}}}, tmp_path / "cache")
    tokens = {"type": "read_tokens", "path": str(tmp_path / "cache"), "max_length": 4, "stride": 4}
    config = {"stages": {"tokens": tokens}}
    pipe = Pipeline.from_config(config)
    next(iter(pipe))
    state = json.loads(json.dumps(pipe.state_dict()))
    for reader_state in _states(state["loader"], "position"):
        reader_state["position"] = value
    fresh = Pipeline.from_config(config)
    with pytest.raises(StageError, match="stage 'tokens'.*position"):
        fresh.load_state_dict(state)
        next(iter(fresh))


def test_a_state_without_fits_is_refused_on_the_python_path(tmp_path, corpus):
    pipe = Pipeline.from_config(config_file(tmp_path, corpus))
    state = pipe.state_dict()
    with pytest.raises(ValueError, match="`graph`"):
        pipe.load_state_dict({**state, "fits": {}})


# --- item 10: --max-batches ----------------------------------------------------------------------


def test_max_batches_0_runs_no_batch(tmp_path, corpus):
    trace = tmp_path / "trace"
    out = run_ok("run", config_file(tmp_path, corpus), "--max-batches", "0", "--trace", str(trace))
    assert "batches: 0 " in out
    assert not trace.exists() or trace.read_text() == ""


def test_max_batches_after_resume_counts_this_runs_batches(tmp_path, corpus):
    saved = checkpoint(tmp_path, corpus)
    assert saved["batches"] == 3
    trace = tmp_path / "trace"
    out = run_ok("run", config_file(tmp_path, corpus), "--resume", str(tmp_path / "ck.json"),
                 "--checkpoint", str(tmp_path / "ck.json"), "--max-batches", "5", "--trace", str(trace))
    assert [line.split()[0] for line in trace.read_text().splitlines()] == ["4", "5", "6", "7", "8"]
    assert "batches: 8 " in out and json.loads((tmp_path / "ck.json").read_text())["batches"] == 8
    assert "batches of this run" in " ".join(cli("run", "--help").stdout.split())


def test_config_errors_on_the_python_path_too(tmp_path, corpus):
    config = yaml.safe_load(CONFIG.replace("CORPUS", str(corpus)))
    config["stages"]["batch"]["seed"] = -1
    with pytest.raises(ConfigError, match="stage `batch`"):
        Pipeline.from_config(config)
