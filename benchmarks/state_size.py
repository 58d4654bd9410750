"""Size of a pipeline's saved state (JSON bytes) on a corpus, mid-epoch, with and without workers, and
after a restore on another topology (8 ranks x 2 workers saved, 6 x 2 resumed with ``reshard=True``).

    python benchmarks/state_size.py bench-out/arrow-2GB
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import Pipeline  # noqa: E402


def config(corpus: str, shuffle: bool) -> dict:
    return {
        "stages": {
            "read": {"type": "read_arrow", "paths": [corpus], "shuffle": shuffle},
            "encode": {"type": "bpe_encode", "input": "read"},
            "window": {"type": "sliding_window", "input": "encode", "max_length": 256, "stride": 128},
            # shuffle groups of one batch: a save is never inside a partly batched group (a reshard refuses that)
            "batch": {"type": "batch", "input": "window", "batch_size": 8, "shuffle": shuffle, "shuffle_windows": 8},
        }
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus")
    parser.add_argument("--batches", type=int, default=500)
    args = parser.parse_args()
    files = [os.path.join(args.corpus, f) for f in os.listdir(args.corpus)]
    size = sum(os.path.getsize(f) for f in files)
    print(f"corpus: {args.corpus}, {len(files)} files, {size / 1e9:.2f} GB\n")
    print("| workers | shuffle | world size | state after batches | JSON bytes |\n| --- | --- | --- | --- | --- |")
    for workers in (0, 2):
        for shuffle in (False, True):
            for world_size in (1, 8):
                pipe = Pipeline.from_config(
                    config(args.corpus, shuffle), num_workers=workers, rank=0, world_size=world_size
                )
                for _, batch in zip(range(args.batches), pipe):
                    pass
                state = json.dumps(pipe.state_dict())
                print(f"| {workers} | {shuffle} | {world_size} | {args.batches} | {len(state):,} |")
    print("\n| resharded | shuffle | state after batches (each side) | JSON bytes |\n| --- | --- | --- | --- |")
    for shuffle in (False, True):
        print(
            f"| 8 x 2 -> 6 x 2 | {shuffle} | {args.batches} "
            f"| {len(json.dumps(resharded(args.corpus, shuffle, args.batches))):,} |"
        )


def resharded(corpus: str, shuffle: bool, batches: int) -> dict:
    """Rank 0's state, ``batches`` into the epoch continued on 6 x 2 from 8 x 2 ranks' states."""
    states = []
    for rank in range(8):
        with Pipeline.from_config(config(corpus, shuffle), num_workers=2, rank=rank, world_size=8) as pipe:
            for _, batch in zip(range(batches), pipe):
                pass
            states.append(pipe.state_dict())
    with Pipeline.from_config(config(corpus, shuffle), num_workers=2, rank=0, world_size=6) as pipe:
        pipe.load_state_dict(states, reshard=True)
        for _, batch in zip(range(batches), pipe):
            pass
        return pipe.state_dict()


if __name__ == "__main__":
    main()
