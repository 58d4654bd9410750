"""The command line called in this process, as a user types ``python -m pipeline VERB ...`` in the project root.

A fresh ``python -m pipeline`` costs seconds of imports; only the tests that need a real process
(signals, SIGKILL, the console script) start one.
"""

from __future__ import annotations

import io
import os
import runpy
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from pipeline.cli import main
from tests.conftest import ROOT


def cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` (its ``main``) run from the project root: exit status and what it printed."""
    return _in_process(["python", "-m", "pipeline", *args], lambda: main(list(args)))


def script(path: str, *args: str) -> subprocess.CompletedProcess:
    """``python PATH ARGS`` run as ``__main__`` from the project root, in this process."""

    def run() -> int:
        argv = sys.argv
        sys.argv = [path, *args]
        try:
            runpy.run_path(path, run_name="__main__")
        finally:
            sys.argv = argv
        return 0

    return _in_process(["python", path, *args], run)


def _in_process(command: list[str], run) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = run()
            except SystemExit as e:  # sys.exit(status), argparse's usage errors
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(command, code, out.getvalue(), err.getvalue())


def run_process(*args: str, **kwargs) -> subprocess.Popen:
    """``python -m pipeline run ARGS`` as a real process (for signals and kills), its output piped."""
    command = [sys.executable, "-m", "pipeline", "run", *args]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def trace_digests(path: str | os.PathLike) -> list[str]:
    """The batch digests a ``run --trace`` file holds, in order (none when it does not exist)."""
    if not os.path.exists(path):
        return []
    lines = [line.split() for line in open(path).read().splitlines()]
    return [words[1] for words in lines if len(words) == 2 and len(words[1]) == 16]


def clean_error(done: subprocess.CompletedProcess) -> str:
    """A config error: exit status 2, one `error:` message on stderr, no traceback; returns stderr."""
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert done.stderr.startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr
