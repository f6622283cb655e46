"""Named kill points: deterministic crash tests without polling or timing.

A long-running step calls `kill_point("name")` where a crash matters (after a step's update, before a commit).
With `KEYEFLOW_KILL_POINT=name` in its environment the process SIGKILLs itself the first time it gets there;
`name@N` waits for the N-th time (e.g. `mpo.step@3`: after the third MPO step). Nothing happens otherwise,
so the hook costs one dictionary lookup. Tests start the real process with the variable set, let it die
exactly there, rerun it without the variable and compare with an uninterrupted run.
"""

from __future__ import annotations

import os
import signal

ENV = "KEYEFLOW_KILL_POINT"
_arrivals: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process if `KEYEFLOW_KILL_POINT` names this point (and this is the asked-for arrival)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, count = wanted.partition("@")
    if point != name:
        return
    _arrivals[name] = _arrivals.get(name, 0) + 1
    if _arrivals[name] >= (int(count) if count else 1):
        os.kill(os.getpid(), signal.SIGKILL)
