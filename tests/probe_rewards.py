"""Rewards that test recipes name. They live apart from probes.py, which imports torch and Lightning: a scoring
worker imports the reward's module, and a light module keeps its start (and every replacement's) short."""

from __future__ import annotations

import time
import zlib

from relax_pl.rewards import VerifiableReward


class UnhurriedReward(VerifiableReward):
    """A 30 s bound instead of 1 s: these scores take microseconds, but a response that ran out of time on a busy
    machine would score 0 and fail a bit-for-bit comparison of two runs for no reason of the test's."""

    def __init__(self, timeout_s: float = 30.0, workers: int | None = None) -> None:
        super().__init__(timeout_s=timeout_s, workers=workers)


class LengthParityReward(UnhurriedReward):
    """1 for a response of an even number of characters: rewards that differ within a group, so advantages do."""

    def score(self, completion: str, sample: dict) -> dict[str, float]:
        return {"overall": float(len(completion) % 2 == 0)}


class ParityAccuracyReward(UnhurriedReward):
    """LengthParityReward's score as ``accuracy``, whether the response has a digit as ``format``:
    ``overall = 0.9 accuracy + 0.1 format``, components that vary within groups like MathReward's would."""

    def score(self, completion: str, sample: dict) -> dict[str, float]:
        accuracy = float(len(completion) % 2 == 0)
        format_ = float(any(c.isdigit() for c in completion))
        return {"overall": 0.9 * accuracy + 0.1 * format_, "accuracy": accuracy, "format": format_}


class EvenRowsParityReward(UnhurriedReward):
    """Length parity for prompts of even rows, 0 for odd rows: a step holds groups that vary and groups that
    do not, which dynamic sampling must keep and drop."""

    def score(self, completion: str, sample: dict) -> dict[str, float]:
        return {"overall": float(len(completion) % 2 == 0) if sample["row"] % 2 == 0 else 0.0}


class FlakyReward(VerifiableReward):
    """Misbehaves on about half of the responses, chosen by a hash of the text (so the same responses on a
    rerun): raises, returns NaN, returns no "overall", or hangs past ``timeout_s``; length parity otherwise.
    ``hang_first`` also hangs on the first response each process scores, so a run has a timeout whatever it
    samples."""

    def __init__(self, timeout_s: float = 1.0, hang_first: bool = False) -> None:
        super().__init__(timeout_s=timeout_s)
        self.hang_first = hang_first

    def score(self, completion: str, sample: dict) -> dict[str, float]:
        if self.hang_first:
            self.hang_first = False  # in the process that scores: each reward worker holds its own copy
            time.sleep(30)
        kind = zlib.crc32(completion.encode()) % 8
        if kind == 0:
            raise ValueError("flaky reward raised")
        if kind == 1:
            return {"overall": float("nan")}
        if kind == 2:
            return {"accuracy": 1.0}
        if kind == 3:
            time.sleep(30)
        return {"overall": float(len(completion) % 2 == 0)}


class BrokenReward(VerifiableReward):
    """Raises on every response: a reward with a bug (a wrong column name)."""

    def score(self, completion: str, sample: dict) -> dict[str, float]:
        return {"overall": float(sample["solution"] == completion)}
