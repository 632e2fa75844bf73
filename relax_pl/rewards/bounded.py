"""Time-bounded reward scoring in a worker process.

A symbolic grader can hang on a hostile answer (``\\boxed{9^{9^{9^{9}}}}`` asks sympy for a number with more
digits than atoms in the universe) and only killing a process stops it reliably: ``signal.alarm`` works only in
a main thread and does not interrupt a long C call. So one worker process scores one response at a time,
the caller waits with a deadline, and a worker that misses it is killed and replaced.
"""

from __future__ import annotations

import math
import multiprocessing
import pickle
import signal
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from relax_pl.rewards.base import VerifiableReward

# Starting a worker imports the reward's module (math-verify: about half a second); on a loaded machine
# that can take much longer, and it is not what timeout_s bounds.
_STARTUP_TIMEOUT_S = 120.0
_MAX_ERROR_CHARS = 2000


@dataclass
class ScoredBatch:
    """Reward components for a batch of responses.

    Attributes:
        components: one list per component name (the union over responses, ``"overall"`` always present),
            each as long as the batch; a component a response did not return is 0.
        timeouts: responses whose scoring exceeded the time bound (all their components are 0).
        errors: responses whose scoring raised or crashed the worker (all their components are 0).
        first_error: the message of the first error, ``None`` when there was none.
    """

    components: dict[str, list[float]]
    timeouts: int = 0
    errors: int = 0
    first_error: str | None = None


def _checked_score(reward: VerifiableReward, completion: str, sample: dict) -> dict[str, float]:
    scores = reward.score(completion, sample)
    name = type(reward).__name__
    if not isinstance(scores, dict) or "overall" not in scores:
        raise TypeError(f"{name}.score must return a dict with an 'overall' key, got {scores!r:.200}")
    scores = {str(key): float(value) for key, value in scores.items()}
    if not_finite := [key for key, value in scores.items() if not math.isfinite(value)]:
        raise ValueError(f"{name}.score returned non-finite values for {not_finite}")
    return scores


def _serve(conn: Connection, reward_bytes: bytes) -> None:
    """Worker loop: receive ``(completion, sample)``, send ``("ok", scores)`` or ``("error", message)``."""
    # Ctrl-C reaches the whole process group; the parent decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        reward = pickle.loads(reward_bytes)
    except Exception:
        conn.send(("error", traceback.format_exc(limit=-3)[-_MAX_ERROR_CHARS:]))
        return
    conn.send(("ready", None))
    while (request := conn.recv()) is not None:
        try:
            conn.send(("ok", _checked_score(reward, *request)))
        except Exception:
            conn.send(("error", traceback.format_exc(limit=-3)[-_MAX_ERROR_CHARS:]))


class BoundedScorer:
    """Scores responses with a :class:`VerifiableReward`, each call bounded in wall time.

    Scoring runs in a persistent ``spawn`` worker process (safe after torch started its threads, and from any
    thread of the caller). A response that takes longer than ``timeout_s``, raises, or kills the worker
    (segfault, out of memory) gets 0 for every component and is counted in the returned
    :class:`ScoredBatch`; a worker that timed out or died is replaced. Well-behaved responses cost a pipe
    round trip (tens of microseconds) on top of the reward itself. Calls from several threads are serialised.

    Args:
        reward: the reward; it is pickled into the worker, so it must be picklable and defined at module
            level (in a script, under ``if __name__ == "__main__":``).
        timeout_s: bound per response in seconds; ``None`` takes ``reward.timeout_s``.

    Raises:
        TypeError: if ``reward`` cannot be pickled.
        ValueError: if ``timeout_s`` is not positive.

    Example::

        with BoundedScorer(MathReward()) as scorer:
            batch = scorer(["... \\boxed{4}"], [{"prompt": "2 + 2?", "answer": "4"}])
        batch.components["overall"]  # [1.0]
    """

    def __init__(self, reward: VerifiableReward, timeout_s: float | None = None) -> None:
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._lock = threading.Lock()
        self.reward = reward
        self.timeout_s = reward.timeout_s if timeout_s is None else timeout_s
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")
        try:
            self._reward_bytes = pickle.dumps(reward)
        except Exception as error:
            raise TypeError(
                f"{type(reward).__name__} must be picklable to be scored in a worker process: {error}"
            ) from error

    def __call__(self, completions: list[str], samples: list[dict]) -> ScoredBatch:
        if len(completions) != len(samples):
            raise ValueError(f"got {len(completions)} completions but {len(samples)} samples")
        for index, sample in enumerate(samples):
            missing = [key for key in ("prompt", "answer") if key not in sample]
            if missing:
                raise ValueError(f"samples[{index}] lacks {missing}; it has {sorted(sample)}")
        with self._lock:
            outcomes = [self._score_one(completion, sample) for completion, sample in zip(completions, samples)]
        return _collect(outcomes)

    def _score_one(self, completion: str, sample: dict) -> tuple[str, dict[str, float] | str | None]:
        """``("ok", scores)``, ``("timeout", None)`` or ``("error", message)`` for one response."""
        conn = self._ready_worker()
        try:
            conn.send((completion, sample))
        except Exception as error:
            self._restart()
            return "error", f"could not send the sample to the reward worker: {error!r}"
        if not wait([conn], timeout=self.timeout_s):
            self._restart()
            return "timeout", None
        try:
            return conn.recv()
        except EOFError:
            assert self._process is not None
            self._process.join(timeout=1.0)
            exitcode = self._process.exitcode
            self._restart()
            return "error", f"the reward worker died (exit code {exitcode}) while scoring a response"

    def _ready_worker(self) -> Connection:
        if self._process is None:
            self._start()
        assert self._conn is not None
        if not self._ready:
            if not self._conn.poll(_STARTUP_TIMEOUT_S):
                self._kill()
                raise RuntimeError(f"the reward worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")
            try:
                status, message = self._conn.recv()
            except EOFError:
                self._process.join(timeout=1.0)
                status, message = "error", f"it exited with code {self._process.exitcode}"
            if status != "ready":
                self._kill()
                raise RuntimeError(f"the reward worker could not load {type(self.reward).__name__}: {message}")
            self._ready = True
        return self._conn

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child_conn, self._reward_bytes), name="relax_pl-reward", daemon=True
        )
        self._process.start()
        child_conn.close()
        self._conn, self._ready = parent_conn, False

    def _restart(self) -> None:
        """Kill the worker and start its replacement now, so that it loads while the caller does other work."""
        self._kill()
        self._start()

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
            self._process.close()
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn, self._ready = None, None, False

    def close(self) -> None:
        """Stop the worker (the next call starts a new one). It holds no state, so it is simply killed."""
        with self._lock:
            self._kill()

    def __enter__(self) -> BoundedScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickling a module that holds the scorer) gets its own worker on first use.
        return {"reward": self.reward, "timeout_s": self.timeout_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["reward"], state["timeout_s"])


def _collect(outcomes: list[tuple[str, dict[str, float] | str | None]]) -> ScoredBatch:
    """Gather per-response outcomes into per-component lists, zeros for failed responses."""
    scores = [payload if status == "ok" else {} for status, payload in outcomes]
    names = dict.fromkeys(["overall", *(name for score in scores for name in score)])
    errors = [payload for status, payload in outcomes if status == "error"]
    return ScoredBatch(
        components={name: [score.get(name, 0.0) for score in scores] for name in names},
        timeouts=sum(status == "timeout" for status, _ in outcomes),
        errors=len(errors),
        first_error=errors[0] if errors else None,
    )
