"""Named kill points: deterministic crash tests without polling or timing.

A long-running step calls `kill_point("name")` where a crash matters (after a step's update, before a commit).
With `KEYEFLOW_KILL_POINT=name` in its environment the process SIGKILLs itself the first time it gets there;
`name@N` waits for the N-th time (e.g. `mpo.step@3`: after the third MPO step). Nothing happens otherwise,
so the hook costs one dictionary lookup. Tests start the real process with the variable set, let it die
exactly there, rerun it without the variable and compare with an uninterrupted run.

Before dying the process writes one line to stderr, ``keyeflow kill point NAME (arrival N): SIGKILL``, so a
test can tell a death at the named point from one anywhere else (a -9 exit code alone says neither where
nor why). Points are named ``<area>.<point>`` and sit between two writes; README lists them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

ENV = "KEYEFLOW_KILL_POINT"
_arrivals: dict[str, int] = {}
_lock = threading.Lock()  # shard tasks run on two threads: `name@N` must count each arrival once


def kill_point(name: str) -> None:
    """SIGKILL this process if `KEYEFLOW_KILL_POINT` names this point (and this is the asked-for arrival)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, count = wanted.partition("@")
    if point != name:
        return
    with _lock:
        _arrivals[name] = arrival = _arrivals.get(name, 0) + 1
        if arrival < (int(count) if count else 1):
            return
        # os.write, not print: unbuffered, so the line is out before the signal lands. Under the lock, so
        # no other thread passes this point (or the next arrival) while the signal is on its way.
        with contextlib.suppress(OSError, ValueError):
            os.write(
                sys.stderr.fileno(), f"keyeflow kill point {name} (arrival {arrival}): SIGKILL\n".encode()
            )
        os.kill(os.getpid(), signal.SIGKILL)
