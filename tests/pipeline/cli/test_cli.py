"""The command line, called as a user runs it: ``python -m pipeline run | inspect | bench | reference``."""

from __future__ import annotations

import ast
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.command_line import clean_error, cli
from tests.conftest import ROOT

MIX_SPLIT = ROOT / "examples" / "mix_split.yaml"
BOOK_STAGES = ("read", "encode", "window", "batch", "embed")  # examples/verdict.yaml and demo.yaml


def table(text: str, header_start: str) -> dict[str, dict[str, str]]:
    """Rows of a fixed-width table printed by the CLI, by first cell; columns cut at the header's words."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = lines[start]
    names = re.findall(r"\S+(?: \S+)*", header)  # words a single space apart form one column name
    starts = [header.index(name) for name in names]
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        rows[cells[0]] = dict(zip(names, cells))
    return rows


# --- run -----------------------------------------------------------------------------------------


def test_run_prints_what_each_stage_did(verdict_text):
    from stages.encoding import load_encoding

    done = cli("run", "examples/verdict.yaml", "--max-batches", "3", "--set", "batch.batch_size=2")
    assert done.returncode == 0, done.stderr
    rows = table(done.stdout, "stage ")
    assert list(rows) == list(BOOK_STAGES)
    assert {name: row["type"] for name, row in rows.items()} == {
        "read": "read_text", "encode": "bpe_encode", "window": "sliding_window", "batch": "batch", "embed": "embed",
    }
    assert rows["read"]["items out"] == "1"  # the book's text is one piece (20 KB < chunk_bytes)
    assert rows["encode"]["items in"] == "1"
    assert rows["encode"]["tokens"] == f"{len(load_encoding('gpt2').encode_ordinary(verdict_text)):,}"
    assert (rows["batch"]["items out"], rows["embed"]["items in"], rows["embed"]["items out"]) == ("3", "3", "3")
    assert rows["embed"]["tokens"] == "24"  # 3 batches of 2 windows of 4 tokens
    assert all(row["time"].endswith("%") for row in rows.values())
    assert "inputs [2, 4]" in done.stdout and "embeddings [2, 4, 256]" in done.stdout
    assert re.search(r"^batches: 3\b", done.stdout, re.M)


def test_run_names_skipped_records_and_why(tmp_path):
    (tmp_path / "a-empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "b.txt").write_text("Some words to encode, enough for two windows of four tokens.\n", encoding="utf-8")
    config = {
        "stages": {
            "read": {"type": "read_text", "paths": [str(tmp_path / "*.txt")]},
            "encode": {"type": "bpe_encode", "input": "read"},
            "window": {"type": "sliding_window", "input": "encode", "max_length": 4, "stride": 4},
            "batch": {"type": "batch", "input": "window", "batch_size": 2},
        }
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = cli("run", str(path))
    assert done.returncode == 0, done.stderr
    rows = table(done.stdout, "stage ")
    assert "empty" in rows["read"]["notes"] and rows["read"]["notes"].endswith(": 1")


def test_set_with_a_misspelt_field():
    stderr = clean_error(cli("run", "examples/verdict.yaml", "--set", "window.strid=3"))
    assert "unknown field `strid`" in stderr and "did you mean `stride`" in stderr and "`window`" in stderr


def test_set_on_a_stage_that_does_not_exist():
    stderr = clean_error(cli("run", "examples/verdict.yaml", "--set", "nosuchstage.x=1"))
    assert "nosuchstage" in stderr


READ = "stages:\n  read: {type: read_text, paths: [HERE]}\n"
BROKEN = {  # config text, words the message must hold
    "unknown type": (
        READ + "  tokens: {type: bpe_encdoe, input: read}\n",
        ["`tokens`", "bpe_encdoe", "did you mean `bpe_encode`"],
    ),
    "yaml syntax": (
        READ + "  tokens: {type: bpe_encode, input: read\n  window: {type: sliding_window}\n",
        ["tokens", "line 3"],
    ),
    "missing input": (READ + "  tokens: {type: bpe_encode}\n", ["`tokens`", "`input`"]),
}


@pytest.mark.parametrize("broken,command", [(broken, "run") for broken in BROKEN] + [("missing input", "inspect")])
def test_a_broken_config_exits_2_naming_the_stage(tmp_path, broken, command):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A few words.\n", encoding="utf-8")
    text, words = BROKEN[broken]
    path = tmp_path / "broken.yaml"
    path.write_text(text.replace("HERE", str(corpus)), encoding="utf-8")
    done = cli(command, str(path))
    stderr = clean_error(done)
    assert done.stdout == ""
    for word in words:
        assert word in stderr


# --- inspect -------------------------------------------------------------------------------------

# The kind of item each stage type takes, written out here (the oracle), for every edge of the example.
TAKES = {
    "mix": "documents",
    "split": "documents",
    "bpe_encode": "documents",
    "sliding_window": "tokens",
    "batch": "windows",
}


def example_edges() -> list[tuple[str, str, str]]:
    stages = yaml.safe_load(MIX_SPLIT.read_text(encoding="utf-8"))["stages"]
    edges = []
    for name, spec in stages.items():
        refs = spec.get("inputs", [spec["input"]] if "input" in spec else [])
        edges += [(ref, name, TAKES[spec["type"]]) for ref in refs]
    return edges


def test_inspect_shows_stages_edges_and_mermaid():
    done = cli("inspect", "examples/mix_split.yaml")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    stages = yaml.safe_load(MIX_SPLIT.read_text(encoding="utf-8"))["stages"]
    listed = out.split("stages:", 1)[1].split("edges:", 1)[0]
    for name, spec in stages.items():
        assert re.search(rf"^\s+{name}\s+{spec['type']}\b", listed, re.M), f"stage {name} not listed"
    edges = example_edges()
    assert len(edges) == 9
    for source, target, kind in edges:
        assert re.search(rf"^\s+{re.escape(source)} -> {target}: {kind}\b", out, re.M), f"edge {source} -> {target}"
    assert "split.train -> train_encode: documents" in out
    mermaid = out.split("flowchart LR", 1)[1].splitlines()
    for name, spec in stages.items():
        assert any(line.strip().startswith(f'{name}["{name}') and spec["type"] in line for line in mermaid), name
    for source, target, kind in edges:
        base, _, branch = source.partition(".")
        label = f"{branch}: {kind}" if branch else kind
        assert f"  {base} -->|{label}| {target}" in mermaid, (source, target)


def test_inspect_picture(tmp_path):
    picture = tmp_path / "graph.svg"
    done = cli("inspect", "examples/mix_split.yaml", "--picture", str(picture))
    if shutil.which("dot") is not None:
        assert done.returncode == 0, done.stderr
        svg = picture.read_text(encoding="utf-8")
        assert "<svg" in svg and "train_encode" in svg
    else:
        stderr = clean_error(done)
        assert "Graphviz" in stderr and "dot" in stderr
        assert not picture.exists()
        assert "flowchart LR" in done.stdout  # the Mermaid picture is still there


def test_inspect_sample_decodes_windows_and_shows_first_batches(verdict_text):
    from stages.encoding import load_encoding

    enc = load_encoding("gpt2")
    ids = enc.encode_ordinary(verdict_text)
    # Windows of 4 tokens, stride 4: context ids[4k : 4k + 4], next token ids[4k + 4].
    expected = [f"{enc.decode(ids[4 * k : 4 * k + 4])!r} ---> {enc.decode([ids[4 * k + 4]])!r}" for k in range(3)]
    assert expected[0] == "'I HAD always' ---> ' thought'"
    done = cli("inspect", "examples/verdict.yaml", "--sample", "3")
    assert done.returncode == 0, done.stderr
    windows = done.stdout.split("first 3 windows", 1)[1].splitlines()[1:]
    assert [line.strip() for line in windows if line.strip()] == expected
    first = done.stdout.split("first batch at every stage", 1)[1].split("\n\n", 1)[0]
    rows = {line.split()[0]: line for line in first.splitlines()[1:] if line.strip()}
    assert list(rows) == list(BOOK_STAGES)
    assert f"int32 [{len(ids)}]" in rows["encode"]
    assert "int32 [1024, 5]" in rows["window"]  # a block of block_windows (1024) windows of 4 + 1 tokens
    assert "inputs: torch int64 [8, 4]" in rows["batch"]
    assert "[8, 4]" in rows["embed"] and "embeddings: torch float32 [8, 4, 256]" in rows["embed"]


@pytest.fixture(scope="module")
def val_sample() -> subprocess.CompletedProcess:
    return cli("inspect", "examples/mix_split.yaml", "--output", "val_batch", "--sample", "1")


def test_inspect_sample_decodes_the_windows_of_the_output(val_sample, in_root):
    from pipeline import Pipeline

    first_piece = next(iter(Pipeline.from_config("examples/mix_split.yaml", output="split.validation")))["text"]
    assert val_sample.returncode == 0, val_sample.stderr
    line = val_sample.stdout.split("first 1 windows", 1)[1].splitlines()[1].strip()
    context = ast.literal_eval(line.split(" ---> ")[0])  # the repr() of the decoded context
    assert first_piece.startswith(context)


def test_inspect_sample_shows_the_branch_items(val_sample):
    assert val_sample.returncode == 0, val_sample.stderr
    first = val_sample.stdout.split("first batch at every stage", 1)[1].split("\n\n", 1)[0]
    row = next(line for line in first.splitlines() if line.strip().startswith("split.validation "))
    assert "(no items)" not in row and "split: 'validation'" in row


# --- bench ---------------------------------------------------------------------------------------


def test_bench_names_the_bottleneck():
    done = cli("bench", "examples/demo.yaml", "--max-batches", "5")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    rows = [line.split() for line in lines[header + 1 : header + 1 + len(BOOK_STAGES)]]
    assert [row[0] for row in rows] == list(BOOK_STAGES)  # stage, type, items, alone (s), items/s, M tokens/s
    for row in rows:
        assert len(row) == 6 and int(row[2].replace(",", "")) > 0 and float(row[3]) >= 0, row
    found = re.search(r"^bottleneck: `(\w+)`", done.stdout, re.M)
    assert found and found.group(1) in BOOK_STAGES


# --- reference -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> str:
    done = cli("reference")
    assert done.returncode == 0, done.stderr
    return done.stdout


def section(markdown: str, stage: str) -> str:
    return markdown.split(f"### `{stage}`", 1)[1].split("\n### ", 1)[0]


def test_reference_covers_every_stage_and_field(reference):
    import stages  # noqa: F401  (registers the stage types)
    from pipeline import STAGES

    assert len(STAGES) >= 9
    for name, cls in STAGES.items():
        assert f"### `{name}`" in reference, name
        # Every constructor argument (its signature, read here) is a row of the stage's table.
        for param in inspect.signature(cls.__init__).parameters:
            if param not in ("self", "source", "sources"):
                assert f"| `{param}` |" in section(reference, name), f"{name}.{param}"
    window = section(reference, "sliding_window")
    for field in ("max_length", "stride", "block_windows"):
        assert re.search(rf"^\| `{field}` \| `int` \|", window, re.M), field


def test_the_readme_reference_is_the_generated_one(reference):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- reference:start -->", "<!-- reference:end -->"
    assert start in readme and end in readme, f"README.md has no {start} ... {end} section"
    assert readme.split(start, 1)[1].split(end, 1)[0].strip() == reference.strip()


def test_reference_tables_have_four_cells_a_row(reference):
    # GitHub Markdown splits cells at every unescaped `|`, even inside backticks (`str | list[str]`).
    for line in reference.splitlines():
        if line.startswith("| "):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            assert len(cells) == 4, line


# --- the console script --------------------------------------------------------------------------


def test_the_console_script():
    script = Path(sys.executable).parent / "pipeline"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e . installs the `pipeline` console script)")
    done = subprocess.run([str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("run", "inspect", "bench", "reference"):
        assert command in done.stdout
