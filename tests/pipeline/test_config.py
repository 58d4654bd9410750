"""Config graphs: every error names the stage and the field before any byte is read; YAML = TOML = dict; the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from pipeline import ConfigError, Pipeline
from tests.command_line import cli


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("A small corpus. It is never read by these tests, only named.\n" * 20, encoding="utf-8")
    return str(path)


@pytest.fixture
def no_reading(monkeypatch):
    """Config errors come before the first byte of a corpus is read: reading one fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a corpus file was opened: {args[:1]}")

    monkeypatch.setattr("stages.read_text.open", refuse, raising=False)


def graph(corpus: str) -> dict:
    return {
        "stages": {
            "read": {"type": "read_text", "paths": [corpus]},
            "encode": {"type": "bpe_encode", "input": "read", "encoding": "gpt2"},
            "window": {"type": "sliding_window", "input": "encode", "max_length": 4, "stride": 4},
            "batch": {"type": "batch", "input": "window", "batch_size": 8},
            "embed": {
                "type": "embed", "input": "batch", "vocab_size": 50257, "d_model": 16, "context_length": 4, "seed": 1,
            },
        }
    }


def edited(corpus: str, stage: str, **changes) -> dict:
    """The graph with ``stage``'s fields changed (a value of None removes the field)."""
    config = copy.deepcopy(graph(corpus))
    for key, value in changes.items():
        if value is None:
            config["stages"][stage].pop(key, None)
        else:
            config["stages"][stage][key] = value
    return config


def config_error(config, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Pipeline.from_config(config, **kwargs)
    return info.value


def test_the_base_graph_builds(corpus, no_reading):
    pipe = Pipeline.from_config(graph(corpus))  # builds without reading: the fixture would fail otherwise
    assert pipe.output == "embed"


@pytest.mark.parametrize(
    "stage,changes,field,words",
    [
        ("window", {"type": "sliding_windw"}, "type", ["sliding_windw", "did you mean `sliding_window`"]),
        ("read", {"type": "read_txt"}, "type", ["read_txt", "did you mean `read_text`"]),
        ("window", {"strid": 4, "stride": None}, "strid", ["strid", "did you mean `stride`"]),
        ("batch", {"batch_sise": 8}, "batch_sise", ["batch_sise", "did you mean `batch_size`"]),
        ("window", {"max_length": None}, "max_length", ["max_length"]),
        ("embed", {"d_model": None}, "d_model", ["d_model"]),
        ("window", {"input": None}, "input", ["input"]),
        ("batch", {"input": "windw"}, "input", ["windw", "did you mean `window`"]),
        ("read", {"input": "encode"}, "input", ["input"]),
    ],
)
def test_stage_errors_name_the_stage_and_field(corpus, no_reading, stage, changes, field, words):
    error = config_error(edited(corpus, stage, **changes))
    assert f"`{stage}`" in str(error) or f"'{stage}'" in str(error)
    for word in words:
        assert word in str(error)
    assert (error.stage, error.field) == (stage, field)


def test_a_cycle(corpus, no_reading):
    config = graph(corpus)
    config["stages"]["window"]["input"] = "batch"  # window -> batch -> window
    error = config_error(config)
    assert "cycle" in str(error)
    assert "window" in str(error) and "batch" in str(error) and error.field == "input"


def test_a_stage_reading_itself(corpus, no_reading):
    config = graph(corpus)
    config["stages"]["window"]["input"] = "window"
    error = config_error(config)
    assert "cycle" in str(error) and error.stage == "window"


def test_output_naming_no_stage(corpus, no_reading):
    error = config_error(graph(corpus), output="windo")
    assert "windo" in str(error) and "output" in str(error) and "did you mean `window`" in str(error)
    error = config_error({**graph(corpus), "output": "nowhere"})
    assert "nowhere" in str(error) and "output" in str(error)


@pytest.mark.parametrize(
    "stage,field,value",
    [
        ("window", "max_length", 0), ("window", "stride", -1), ("window", "stride", "4"), ("batch", "batch_size", 0),
        ("read", "chunk_bytes", 0), ("read", "errors", "ignore"), ("encode", "encoding", "nope"),
        ("encode", "num_threads", 0),
    ],
)
def test_bad_values_are_raised_at_build_naming_the_stage(corpus, no_reading, stage, field, value):
    error = config_error(edited(corpus, stage, **{field: value}))
    assert f"`{stage}`" in str(error) or f"'{stage}'" in str(error)
    assert error.stage == stage
    assert field in str(error)


def test_a_window_longer_than_the_position_table(corpus, no_reading):
    config = edited(corpus, "window", max_length=5)
    error = config_error(config)
    assert "embed" in str(error) and "context_length" in str(error) and "window" in str(error) and "5" in str(error)
    assert error.stage == "embed"


@pytest.mark.parametrize("field,value", [("positional", "rotary"), ("dtype", "float64"), ("vocab_size", 0)])
def test_bad_embed_values(corpus, no_reading, field, value):
    error = config_error(edited(corpus, "embed", **{field: value}))
    assert error.stage == "embed" and "`embed`" in str(error)
    assert field in str(error)


def test_an_unknown_device(corpus, no_reading):
    error = config_error(edited(corpus, "embed", device="tpu"))
    assert error.stage == "embed" and "device" in str(error)


def test_config_files_that_are_not_configs(tmp_path, no_reading):
    missing = tmp_path / "missing.yaml"
    error = config_error(str(missing))
    assert str(missing) in str(error)
    for text in ("- a\n- list\n", "just a string\n", ""):
        path = tmp_path / "not_a_mapping.yaml"
        path.write_text(text, encoding="utf-8")
        error = config_error(str(path))
        assert str(path) in str(error)
    path = tmp_path / "no_stages.yaml"
    path.write_text("stage: {}\n", encoding="utf-8")
    assert "stages" in str(config_error(str(path)))


def test_a_json_config_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]", encoding="utf-8")
    assert str(path) in str(config_error(str(path)))


@pytest.mark.parametrize(
    "name,text",
    [
        ("bad.yaml", "stages:\n  read: {type: read_text, paths: [x\n"),
        ("bad.toml", "stages = [\n"),
        ("bad.json", '{"stages": '),
    ],
)
def test_a_config_with_a_syntax_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert str(path) in str(config_error(str(path)))


def test_input_as_a_list(corpus, no_reading):
    config = graph(corpus)
    config["stages"]["encode"]["input"] = ["read", "read"]
    error = config_error(config)
    assert error.stage == "encode" and error.field == "input"


def test_a_vocabulary_larger_than_the_token_table(corpus, no_reading):
    error = config_error(edited(corpus, "embed", vocab_size=1000))
    assert error.stage == "embed" and "vocab_size" in str(error)


# --- the same graph from every format -----------------------------------------------------------


def toml_of(config: dict) -> str:
    lines = []
    for name, spec in config["stages"].items():
        lines.append(f"[stages.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in spec.items()]  # JSON scalars and lists are TOML
    return "\n".join(lines) + "\n"


def test_yaml_toml_json_and_dict_give_the_same_first_batch(tmp_path, verdict_path):
    config = graph(str(verdict_path))
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (tmp_path / "g.toml").write_text(toml_of(config), encoding="utf-8")
    (tmp_path / "g.json").write_text(json.dumps(config), encoding="utf-8")
    sources = (config, str(tmp_path / "g.yaml"), str(tmp_path / "g.toml"), str(tmp_path / "g.json"))
    batches = [next(iter(Pipeline.from_config(c))) for c in sources]
    first = batches[0]
    assert first["inputs"][0].tolist() == [40, 367, 2885, 1464]  # the book's first window
    for other in batches[1:]:
        assert set(other) == set(first)
        for key in first:
            assert torch.equal(other[key], first[key]), key


# --- the command line ---------------------------------------------------------------------------


def test_cli_runs_the_verdict_example(verdict_path):
    done = cli("run", "examples/verdict.yaml")
    assert done.returncode == 0, done.stderr
    assert "batches: 160" in done.stdout
    assert "[8, 4, 256]" in done.stdout


def test_cli_max_batches(verdict_path):
    done = cli("run", "examples/verdict.yaml", "--max-batches", "3")
    assert done.returncode == 0, done.stderr
    assert "batches: 3 " in done.stdout


def test_cli_broken_config_exits_2(tmp_path, verdict_path):
    config = graph(str(verdict_path))
    config["stages"]["window"]["strid"] = config["stages"]["window"].pop("stride")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = cli("run", str(path))
    assert done.returncode == 2
    assert "error:" in done.stderr and "window" in done.stderr and "strid" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_cli_yaml_syntax_error_exits_2(tmp_path):
    path = tmp_path / "syntax.yaml"
    path.write_text("stages:\n  read: {type: read_text, paths: [x\n", encoding="utf-8")
    done = cli("run", str(path))
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr


# --- fan-in and fan-out: mix and split ----------------------------------------------------------


def fan_graph(corpus: str) -> dict:
    """Two readers mixed, then split; the training branch encoded and windowed."""
    return {
        "stages": {
            "books": {"type": "read_text", "paths": [corpus]},
            "web": {"type": "read_text", "paths": [corpus]},
            "mix": {"type": "mix", "inputs": ["books", "web"], "weights": [0.3, 0.7], "seed": 0},
            "split": {"type": "split", "input": "mix", "fractions": {"train": 0.9, "validation": 0.1}},
            "encode": {"type": "bpe_encode", "input": "split.train"},
            "window": {"type": "sliding_window", "input": "encode", "max_length": 4, "stride": 4},
        }
    }


def test_the_fan_graph_builds(corpus, no_reading):
    assert Pipeline.from_config(fan_graph(corpus)).output == "window"
    assert Pipeline.from_config(fan_graph(corpus), output="split.validation").output == "split.validation"


@pytest.mark.parametrize(
    "stage,changes,field,words",
    [
        ("encode", {"input": "split.trian"}, "input", ["trian", "did you mean `train`"]),
        ("encode", {"input": "mix.train"}, "input", ["mix.train", "not a split"]),
        ("mix", {"input": "books", "inputs": None}, "input", ["`inputs`"]),
        ("mix", {"inputs": "books"}, "inputs", ["list of stage names"]),
        ("mix", {"inputs": ["books", "wbe"]}, "inputs", ["wbe", "did you mean `web`"]),
        ("mix", {"weights": [0.3, 0.3, 0.4]}, "weights", ["2 inputs, 3 weights"]),
        ("mix", {"weights": [1, -1]}, "weights", ["positive", "-1"]),
        ("mix", {"weights": None}, "weights", ["missing required field `weights`"]),
        ("mix", {"stop": "last"}, "stop", ["'last'", "first", "all", "cycle"]),
        ("split", {"fractions": [0.9, 0.1]}, "fractions", ["dict[str, float]"]),
        ("split", {"fractions": {"train": 1.1, "validation": -0.1}}, "fractions", ["non-negative", "-0.1"]),
        ("split", {"key": 3}, "key", ["`key`", "3"]),
        ("window", {"input": "split.train"}, "input", ["takes tokens", "`split.train` gives documents"]),
    ],
)
def test_mix_and_split_errors_name_the_stage_and_field(corpus, no_reading, stage, changes, field, words):
    config = copy.deepcopy(fan_graph(corpus))
    for key, value in changes.items():
        if value is None:
            config["stages"][stage].pop(key)
        else:
            config["stages"][stage][key] = value
    error = config_error(config)
    assert f"`{stage}`" in str(error)
    for word in words:
        assert word in str(error), word
    assert (error.stage, error.field) == (stage, field)


def test_an_unknown_top_level_key(corpus, no_reading):
    error = config_error({**graph(corpus), "outptu": "batch"})
    assert "`outptu`" in str(error) and "did you mean `output`" in str(error)


def test_a_stage_name_with_a_dot(corpus, no_reading):
    config = graph(corpus)
    config["stages"] = {"read.all": config["stages"].pop("read"), **config["stages"]}
    error = config_error(config)
    assert error.stage == "read.all" and "`.`" in str(error)


def test_an_encoding_whose_file_is_not_available(corpus, no_reading, tmp_path, monkeypatch):
    from stages import encoding

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    encoding._load.cache_clear()
    try:
        error = config_error(edited(corpus, "encode", encoding="cl100k_base"))
    finally:
        encoding._load.cache_clear()
    assert (error.stage, error.field) == ("encode", "encoding")
    assert "`encode`" in str(error) and "cl100k_base.tiktoken" in str(error)


def test_output_naming_no_branch(corpus, no_reading):
    error = config_error(fan_graph(corpus), output="split.trian")
    assert "split.trian" in str(error) and "output" in str(error) and "did you mean `train`" in str(error)
    assert error.field == "output"


def test_python_constructors_and_configs_share_the_field_validator(corpus, no_reading):
    from torchdata.nodes import IterableWrapper

    from pipeline.schema import FieldError
    from stages import SlidingWindow

    with pytest.raises(FieldError) as built:
        SlidingWindow(IterableWrapper([]), max_length=0, stride=1)
    error = config_error(edited(corpus, "window", max_length=0))
    assert built.value.field == error.field == "max_length"
    assert str(error) == f"stage `window`: {built.value}"
