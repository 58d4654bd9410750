"""Run in a fresh process by tests/pipeline/test_resume.py: restore pipeline states and dump what follows each.

Reads one JSON spec a line from stdin (a process serves a whole test module: a start costs seconds of imports)
and answers each with a line naming the file it wrote.
"""

import json
import sys

import numpy as np

from pipeline import Pipeline

if __name__ == "__main__":
    for line in sys.stdin:
        spec = json.loads(line)
        rests = {}
        for i, (state, count) in enumerate(spec["resume"]):
            pipe = Pipeline.from_config(spec["config"], **spec["loader"])
            pipe.load_state_dict(state)
            rest = []
            while len(rest) < count:  # on through the end of the epoch into the next one
                rest += [batch["inputs"].numpy() for batch, _ in zip(pipe, range(count - len(rest)))]
            rests[str(i)] = np.stack(rest)
        np.savez(spec["out"], **rests)
        print(spec["out"], flush=True)
