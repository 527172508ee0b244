"""Train one run of a comparison in a process of its own.

Its own process, one at a time, so each method's timings and peak memory are its own: in one process a later
run would find the kernels an earlier one compiled, and the heap it left mapped, and measure less than a user
training that method alone. The child is the ordinary `deltatune train CONFIG --resume auto`, so a run the
comparison left unfinished continues from its newest checkpoint (train.save_every) or starts over.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

MAX_REASON = 600  # characters of the child's error kept in compare.json's status


def train(config_file: Path, log_file: Path, show: bool = True) -> tuple[int, str]:
    """Run `deltatune train config_file --resume auto`; its output goes to log_file (and to stderr when
    `show`). Returns (exit code, its output)."""
    cmd = [sys.executable, "-m", "deltatune", "train", str(config_file), "--resume", "auto"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines as they happen, not when a pipe buffer fills
    # Into a pipe rich would wrap every line at 80 columns: use the terminal's width (log files: 120).
    env.setdefault("COLUMNS", str(shutil.get_terminal_size((120, 24)).columns))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    with open(log_file, "w", encoding="utf-8") as log, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
            env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if show:
                sys.stderr.write(line)
                sys.stderr.flush()
    return proc.returncode, "".join(lines)


def failure_reason(output: str, code: int) -> str:
    """Why a child failed, in one line: the CLI's `error:` message (all its lines), else the last line of a
    traceback, else the exit code."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    if starts:
        reason = " ".join(lines[starts[-1]:])[len("error:"):].strip()
    elif lines:
        reason = lines[-1]
    else:
        reason = "no output"
    if code < 0:
        reason += f" (killed by signal {-code})"
    return reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 3] + "..."
