"""The reward interface: one verifiable score per response, every call bounded in wall time."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod

from relax_pl.rewards.direct import score_in_child
from relax_pl.rewards.process import TIMED_OUT, ScoreFunction, in_scoring_process

__all__ = ["TIMED_OUT", "VerifiableReward", "bounded"]


def bounded(score: ScoreFunction) -> ScoreFunction:
    """``score`` run in a child process that is killed after the reward's ``timeout_s`` (see
    :func:`relax_pl.rewards.direct.score_in_child`); in a scoring process, ``score`` itself."""

    @functools.wraps(score)
    def bounded_score(self: VerifiableReward, completion: str, sample: dict) -> dict[str, float]:
        if in_scoring_process():
            return score(self, completion, sample)
        return score_in_child(self, score, completion, sample)

    bounded_score.unbounded = score  # type: ignore[attr-defined]
    return bounded_score


class VerifiableReward(ABC):
    """Scores one response against its dataset row; subclass it for a new reward type.

    ``score`` returns named components, always including ``"overall"`` (the scalar the policy is trained
    on); the other components (``"accuracy"``, ``"format"``, ...) are logged as ``reward/<name>``.

    Every call of ``score`` is bounded in wall time, wherever it is made: a subclass's ``score`` is wrapped when the
    class is defined, so that calling it (a notebook, an evaluation script, any thread) runs it in a forked child
    process that is killed after ``timeout_s``. A call that runs out of time returns
    ``{"overall": 0.0, "timed_out": 1.0}`` (:data:`TIMED_OUT`) and warns; a call whose code raises re-raises the
    error. A call returns within ``timeout_s`` plus
    :data:`~relax_pl.rewards.direct.DIRECT_CALL_OVERHEAD_S`. Training does not go through this path:
    :class:`~relax_pl.rewards.BoundedScorer` runs ``score`` in a pool of worker processes, so a reward needs no
    timeout logic of its own but must be picklable (define it at module level, keep no open files, locks or
    models in it). ``score`` runs in another process either way: state it changes is not seen by the caller.

    Args:
        timeout_s: wall-time bound for scoring one response; a response that takes longer gets reward 0.
        workers: scoring processes in training (``BoundedScorer``); ``None``: one per free CPU core of this
            process's share of the machine (:func:`~relax_pl.rewards.bounded.default_workers`).

    Raises:
        ValueError: if ``timeout_s`` is not positive or ``workers`` is below 1.

    Example::

        class ExactMatch(VerifiableReward):
            def score(self, completion: str, sample: dict) -> dict[str, float]:
                hit = float(completion.strip() == sample["answer"].strip())
                return {"overall": hit, "exact": hit}
    """

    def __init__(self, timeout_s: float = 1.0, workers: int | None = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1 (or None for one per free core), got {workers}")
        self.timeout_s = timeout_s
        self.workers = workers

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        score = cls.__dict__.get("score")
        if callable(score) and not getattr(score, "__isabstractmethod__", False) and not hasattr(score, "unbounded"):
            cls.score = bounded(score)  # type: ignore[method-assign]

    @abstractmethod
    def score(self, completion: str, sample: dict) -> dict[str, float]:
        """Components of the reward for ``completion``, including ``"overall"``.

        ``sample`` is the dataset row: at least ``"prompt"`` and ``"answer"`` (both str), plus the row's
        other columns.
        """
