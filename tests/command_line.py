"""The command line called in this process, as a user types ``python -m pipeline VERB ...`` in the project root.

A fresh ``python -m pipeline`` costs seconds of imports; only the tests that need a real process
(signals, SIGKILL, the console script) start one.
"""

from __future__ import annotations

import io
import os
import subprocess
from contextlib import redirect_stderr, redirect_stdout

from pipeline.cli import main
from tests.conftest import ROOT


def cli(*args: str) -> subprocess.CompletedProcess:
    """``main(args)`` run from the project root: its exit status and what it printed, as a finished process."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's usage errors
                code = e.code
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(["python", "-m", "pipeline", *args], code, out.getvalue(), err.getvalue())


def clean_error(done: subprocess.CompletedProcess) -> str:
    """A config error: exit status 2, one `error:` message on stderr, no traceback; returns stderr."""
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert done.stderr.startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr
