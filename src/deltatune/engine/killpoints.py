"""Crash tests: SIGKILL (or hold) this process at a named point. Never set outside tests.

A leaf module (it imports nothing from deltatune), so that every writer can mark its dangerous
moments without importing the modules that use it.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

KILL_ENV = "DELTATUNE_TEST_KILL"
KILL_RANK_ENV = "DELTATUNE_TEST_KILL_RANK"
HOLD_ENV = "DELTATUNE_TEST_HOLD"
_reached: Counter[str] = Counter()


def kill_point(name: str) -> None:
    """`DELTATUNE_TEST_KILL=name:N` kills this process with SIGKILL the N-th time `name` is reached;
    `DELTATUNE_TEST_HOLD=name:N:FILE` waits there (up to 2 minutes) until FILE exists.
    `DELTATUNE_TEST_KILL_RANK=R` limits the kill to global rank R (torchrun gives every rank one environment)."""
    spec, hold = os.environ.get(KILL_ENV), os.environ.get(HOLD_ENV)
    if not spec and not hold:
        return
    _reached[name] += 1
    only = os.environ.get(KILL_RANK_ENV)
    mine = only is None or only == os.environ.get("RANK", "0")
    for item in (spec or "").split(","):
        point, _, n = item.partition(":")
        if mine and point == name and _reached[name] == int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)
    if hold:
        point, n, go = hold.split(":", 2)
        if point == name and _reached[name] == int(n):
            deadline = time.time() + 120
            while not Path(go).exists() and time.time() < deadline:
                time.sleep(0.05)
