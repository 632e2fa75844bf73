"""The reward interface: one verifiable score per response."""

from __future__ import annotations

from abc import ABC, abstractmethod


class VerifiableReward(ABC):
    """Scores one response against its dataset row; subclass it for a new reward type.

    ``score`` returns named components, always including ``"overall"`` (the scalar the policy is trained
    on); the other components (``"accuracy"``, ``"format"``, ...) are logged as ``reward/<name>``.
    Training never calls ``score`` directly: :class:`~relax_pl.rewards.BoundedScorer` runs it in a worker
    process and gives up on a response after ``timeout_s`` seconds, so a reward needs no timeout logic of
    its own but must be picklable (define it at module level, keep no open files, locks or models in it).

    Args:
        timeout_s: wall-time bound for scoring one response; a response that takes longer gets reward 0.

    Raises:
        ValueError: if ``timeout_s`` is not positive.

    Example::

        class ExactMatch(VerifiableReward):
            def score(self, completion: str, sample: dict) -> dict[str, float]:
                hit = float(completion.strip() == sample["answer"].strip())
                return {"overall": hit, "exact": hit}
    """

    def __init__(self, timeout_s: float = 1.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        self.timeout_s = timeout_s

    @abstractmethod
    def score(self, completion: str, sample: dict) -> dict[str, float]:
        """Components of the reward for ``completion``, including ``"overall"``.

        ``sample`` is the dataset row: at least ``"prompt"`` and ``"answer"`` (both str), plus the row's
        other columns.
        """
