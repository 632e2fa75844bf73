"""What the scoring processes share, at the bottom of the reward package's imports (``process`` <- ``bounded`` <-
``direct`` <- ``base``): the timed-out marker, the flag of a process whose only job is scoring, and what a
scorer calls on a reward (:class:`Scorable`, which every :class:`~relax_pl.rewards.VerifiableReward` is)."""

from __future__ import annotations

from typing import Callable, Protocol

# A direct call that ran out of time returns {"overall": 0.0, TIMED_OUT: 1.0}.
TIMED_OUT = "timed_out"

# True in a process whose only job is scoring (a BoundedScorer worker, a direct call's child): the caller there
# already bounds the time, so ``score`` runs as written, and a subclass's ``super().score(...)`` does too.
_in_scoring_process = False


class Scorable(Protocol):
    """What the scorers use of a reward."""

    timeout_s: float
    workers: int | None

    def score(self, completion: str, sample: dict) -> dict[str, float]: ...


ScoreFunction = Callable[[Scorable, str, dict], dict]


def mark_scoring_process() -> None:
    """Called first thing in a scoring process: ``score`` there runs unwrapped (see ``base.bounded``)."""
    global _in_scoring_process
    _in_scoring_process = True


def in_scoring_process() -> bool:
    return _in_scoring_process
