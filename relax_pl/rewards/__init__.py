"""Verifiable rewards: the :class:`VerifiableReward` interface, the math graders, time-bounded scoring, and several
rewards weighted in one run (:class:`RewardScorer`)."""

from relax_pl.rewards.base import TIMED_OUT, VerifiableReward
from relax_pl.rewards.bounded import BoundedScorer, ScoredBatch, default_workers
from relax_pl.rewards.direct import DIRECT_CALL_OVERHEAD_S, RewardTimeoutWarning
from relax_pl.rewards.math import Geo3kReward, MathReward, answers_match, clean_answer, last_boxed
from relax_pl.rewards.weighted import RewardScorer, named_rewards, reward_fields

__all__ = [
    "DIRECT_CALL_OVERHEAD_S",
    "TIMED_OUT",
    "BoundedScorer",
    "Geo3kReward",
    "MathReward",
    "RewardScorer",
    "RewardTimeoutWarning",
    "ScoredBatch",
    "VerifiableReward",
    "answers_match",
    "clean_answer",
    "default_workers",
    "last_boxed",
    "named_rewards",
    "reward_fields",
]
