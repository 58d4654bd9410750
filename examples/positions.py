"""Why position embeddings: the token "I" at many places of the-verdict, embedded by the pipeline.

Run from the project root:

    python examples/positions.py [--path ../shared/data/the-verdict.txt]

The token stream (GPT-2 BPE) is cut into windows of 1024 tokens, stride 1024 (GPT-2's context
length: window w holds the stream's tokens w*1024 .. w*1024+1023), and each window is embedded with
a position table of 1024 rows. Token "I" (id 40) looks up the same row of the token table wherever
it is; the position table adds a different vector at each position inside the window, so the input
embeddings differ. The script prints what it finds and exits 1 if a fact it states does not hold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from pipeline import ConfigError, Pipeline  # noqa: E402
from stages.encoding import load_encoding  # noqa: E402

CONTEXT = 1024  # window length and position-table rows: GPT-2's context length
TOKEN, TOKEN_ID, COUNT, FIRST = "I", 40, 29, [0, 379, 736, 882, 895]
MODES = {
    "learned": "Learned positions (nn.Embedding(1024, 256), as the book's GPTModel)",
    "sinusoidal": "Sinusoidal positions (the fixed sin/cos table of 'Attention Is All You Need')",
    "none": "No positions (for comparison)",
}



class Facts:
    """Prints each fact with [ok] or [FAILED]; ``finish`` gives the exit status."""

    def __init__(self) -> None:
        self.failed = 0

    def check(self, fact: str, holds: bool) -> bool:
        print(f"  [{'ok' if holds else 'FAILED'}] {fact}")
        self.failed += not holds
        return holds

    def finish(self) -> int:
        print(f"\n{'All facts hold.' if not self.failed else f'{self.failed} fact(s) do NOT hold.'}")
        return 1 if self.failed else 0


def config(path: str, positional: str) -> dict:
    return {
        "stages": {
            "read": {"type": "read_text", "paths": [path]},
            "encode": {"type": "bpe_encode", "input": "read", "encoding": "gpt2"},
            "window": {"type": "sliding_window", "input": "encode", "max_length": CONTEXT, "stride": CONTEXT},
            "batch": {"type": "batch", "input": "window", "batch_size": 1, "drop_last": False},
            "embed": {"type": "embed", "input": "batch", "vocab_size": 50257, "d_model": 256, "context_length": CONTEXT,
                      "positional": positional, "device": "cpu", "seed": 123},
        }
    }


def occurrences(path: str, positional: str) -> dict[str, list]:
    """Every place of the token in the windows: its place in the stream and in its window, and its vectors."""
    pipe = Pipeline.from_config(config(path, positional))
    found: dict[str, list] = {"stream": [], "window": [], "token": [], "input": [], "rebuilt": []}
    for w, batch in enumerate(pipe):  # one window per batch
        inputs, embeddings = batch["inputs"][0], batch["embeddings"][0]
        token_vectors = pipe.embedding.tok_emb(inputs)
        if positional == "learned":
            position_vectors = pipe.embedding.pos_emb.weight
        elif positional == "sinusoidal":
            position_vectors = pipe.embedding.pos_table
        else:
            position_vectors = torch.zeros(CONTEXT, token_vectors.shape[1])
        for p in (inputs == TOKEN_ID).nonzero().flatten().tolist():
            found["stream"].append(w * CONTEXT + p)
            found["window"].append(p)
            found["token"].append(token_vectors[p])
            found["input"].append(embeddings[p])
            found["rebuilt"].append(token_vectors[p] + position_vectors[p])
    return found


def distinct(vectors: list[torch.Tensor]) -> int:
    return len({tuple(v.tolist()) for v in vectors})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default="../shared/data/the-verdict.txt", help="the text (default: %(default)s)")
    path = parser.parse_args(argv).path

    try:
        encoded = Pipeline.from_config(config(path, "learned"), output="encode")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    facts = Facts()
    check = facts.check
    print(f"Token {TOKEN!r} in {path}, GPT-2 BPE")
    check(f"{TOKEN!r} is the single token id {TOKEN_ID}", load_encoding("gpt2").encode(TOKEN) == [TOKEN_ID])
    ids = np.concatenate([item["ids"] for item in encoded])
    places = np.flatnonzero(ids == TOKEN_ID).tolist()
    print(f"  the stream has {len(ids):,} tokens; id {TOKEN_ID} is at {places[:8]} ... {places[-1:]}")
    check(f"id {TOKEN_ID} occurs {COUNT} times in the stream", len(places) == COUNT)
    check(f"its first places are {', '.join(map(str, FIRST))}", places[: len(FIRST)] == FIRST)
    if facts.failed:  # the rest compares the vectors at those places
        return facts.finish()

    for positional, title in MODES.items():
        found = occurrences(path, positional)
        n, first = len(found["stream"]), found["input"][: len(FIRST)]
        print(f"\n{title}; x(p): the input embedding at stream position p")
        if not check(f"all {COUNT} places lie in windows (stream position p is position p - w*{CONTEXT} of window w)",
                     found["stream"] == places):
            continue
        check(f"the token embedding of id {TOKEN_ID} is the same vector at all {n} places",
              all(torch.equal(v, found["token"][0]) for v in found["token"]))
        in_window = len(set(found["window"]))
        print(f"  positions inside the windows: {found['window'][:8]} ... ({in_window} different)")
        print(f"  |x({FIRST[0]}) - x({FIRST[1]})| = {(first[0] - first[1]).norm().item():.2f}")
        if positional == "none":
            check(f"without position embeddings the {n} input embeddings are all the same vector",
                  distinct(found["input"]) == 1)
            continue
        check("each x(p) is that vector plus the position table's row for p's position in its window",
              all(torch.equal(x, r) for x, r in zip(found["input"], found["rebuilt"])))
        named = ", ".join(f"x({p})" for p in FIRST)
        check(f"{named} (window 0: positions = stream positions) are {len(FIRST)} different vectors",
              distinct(first) == len(FIRST))
        check(f"over all {n} places, {in_window} different positions in the window give {in_window} different x",
              distinct(found["input"]) == in_window)

    return facts.finish()


if __name__ == "__main__":
    sys.exit(main())
