"""The command line on a list of arguments, as a finished process, for the CLI tests."""

import os
import subprocess
import sys
import traceback
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent


def remat(*args: str, cwd: Path | None = None, process: bool = False) -> subprocess.CompletedProcess:
    """`remat ARGS`. In this process through click's runner by default (a fresh one spends about 3 s importing
    torch); in a fresh process where what is checked lives below Python: a C library printing to file descriptor 1,
    torch's logging handlers, the entry point itself."""
    if process:
        return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                              cwd=cwd or ROOT, timeout=300)
    from cli import main

    here = os.getcwd()
    os.chdir(cwd or ROOT)
    try:
        result = CliRunner().invoke(main, list(args), prog_name="remat")
    finally:
        os.chdir(here)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):  # as Python would print it
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)
