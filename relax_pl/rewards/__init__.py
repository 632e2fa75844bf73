"""Verifiable rewards: the :class:`VerifiableReward` interface, the math graders, and time-bounded scoring."""

from relax_pl.rewards.base import VerifiableReward
from relax_pl.rewards.bounded import BoundedScorer, ScoredBatch
from relax_pl.rewards.math import Geo3kReward, MathReward, answers_match, clean_answer, last_boxed

__all__ = [
    "BoundedScorer",
    "Geo3kReward",
    "MathReward",
    "ScoredBatch",
    "VerifiableReward",
    "answers_match",
    "clean_answer",
    "last_boxed",
]
