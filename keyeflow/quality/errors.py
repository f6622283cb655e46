"""Failed verdicts stay failures: what a judge, reward model, teacher or grader raises when it cannot give a
verdict, and the one rule that decides when a batch step stops because too many of its items failed.

A failed request or an unparsable reply is never turned into a value (a 0.5 "tie", a 0, a rule-based
stand-in): a value would train or select on a constant that says nothing about the item. The item is set
aside with the reason and counted instead, and the step goes on with the others while the failed share stays
at or below its threshold (`DEFAULT_MAX_ERROR_SHARE`, 5% unless a config says otherwise: a few failures of a
remote model are normal; more means the model or the server is broken, and training on what is left would
hide it). Past the threshold the step raises `ErrorShareExceeded`, naming the first failures.
"""

from __future__ import annotations

from collections.abc import Sequence

from keyeflow.config import check_number, invalid

DEFAULT_MAX_ERROR_SHARE = 0.05
NUM_NAMED_FAILURES = 3  # failures an ErrorShareExceeded message names


class ScoringError(RuntimeError):
    """A judge, reward model, teacher or grader gave no usable verdict for one item; the message names the
    item and the cause (the request's error or what is wrong with the reply)."""


class ErrorShareExceeded(RuntimeError):
    """More of a step's items failed than its threshold allows; the message names the first failures."""


def check_max_error_share(owner: str, value: object) -> float:
    """`value` as a share in [0, 1] (1: never stop for failures; failed items are still set aside)."""
    share = check_number(owner, "max_error_share", value, minimum=0)
    if share > 1:
        raise invalid(owner, "max_error_share", value, "must be in [0, 1]")
    return float(share)


def check_error_share(what: str, failures: Sequence[tuple[str, str]], total: int, max_share: float) -> float:
    """The failed share of a step's `total` items; raises ErrorShareExceeded when it passes `max_share`.
    `failures`: (item, reason) of each failed item, in the order met."""
    share = len(failures) / total if total else 0.0
    if share > max_share:
        named = "; ".join(f"{item}: {reason}" for item, reason in failures[:NUM_NAMED_FAILURES])
        more = len(failures) - NUM_NAMED_FAILURES
        raise ErrorShareExceeded(
            f"{what}: {len(failures)} of {total} items failed ({share:.1%} > max_error_share "
            f"{max_share:.1%}); first: {named}{f' (and {more} more)' if more > 0 else ''}"
        )
    return share
