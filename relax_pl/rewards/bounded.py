"""Time-bounded reward scoring in a pool of worker processes.

A symbolic grader can hang on a hostile answer (``\\boxed{9^{9^{9^{9}}}}`` asks sympy for a number with more
digits than atoms in the universe) and only killing a process stops it for sure: ``signal.alarm`` works only in a
main thread and does not interrupt a long C call. So worker processes score one response at a time each; inside a
worker an interval timer interrupts a response that runs past ``timeout_s`` (the worker lives on), and the
caller kills a worker that still has not answered ``KILL_GRACE_S`` later (stuck in C code) and starts its
replacement, while the other workers go on.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from relax_pl.rewards.process import Scorable, mark_scoring_process

# Starting a worker imports the reward's module (math-verify: about half a second); on a loaded machine
# that can take much longer, and it is not what timeout_s bounds.
_STARTUP_TIMEOUT_S = 120.0
_MAX_ERROR_CHARS = 2000
# How long the caller waits past timeout_s for the worker's own interruption before it kills the worker.
KILL_GRACE_S = 0.5
# Default pool size cap: each worker holds its own sympy/math-verify (about 100 MB); more than this rarely pays.
MAX_DEFAULT_WORKERS = 8


def default_workers(processes_per_node: int = 1, cores: int | None = None, cap: int = MAX_DEFAULT_WORKERS) -> int:
    """Scoring workers for one training process: its share of the cores it may run on, less one for itself.

    ``cores`` defaults to the CPUs this process may use (``os.sched_getaffinity``, which honours taskset, cgroups'
    cpusets and SLURM's binding; ``os.cpu_count`` where that does not exist). ``processes_per_node`` training
    processes (one per GPU) share them, each with its own pool. Between 1 and ``cap``.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cap, cores // max(1, processes_per_node) - 1))


@dataclass
class ScoredBatch:
    """Reward components for a batch of responses.

    Attributes:
        components: one list per component name (the union over responses, ``"overall"`` always present),
            each as long as the batch; a component a response did not return is 0.
        timeouts: responses whose scoring exceeded the time bound (all their components are 0).
        errors: responses whose scoring raised or crashed the worker (all their components are 0).
        first_error: the message of the first error, ``None`` when there was none.
        all_failed: the rewards that failed (raised or timed out) on every response, each with its first error.
    """

    components: dict[str, list[float]]
    timeouts: int = 0
    errors: int = 0
    first_error: str | None = None
    all_failed: dict[str, str] = field(default_factory=dict)


def _checked_score(reward: Scorable, completion: str, sample: dict) -> dict[str, float]:
    scores = reward.score(completion, sample)
    name = type(reward).__name__
    if not isinstance(scores, dict) or "overall" not in scores:
        raise TypeError(f"{name}.score must return a dict with an 'overall' key, got {scores!r:.200}")
    scores = {str(key): float(value) for key, value in scores.items()}
    if not_finite := [key for key, value in scores.items() if not math.isfinite(value)]:
        raise ValueError(f"{name}.score returned non-finite values for {not_finite}")
    return scores


class _OutOfTime(BaseException):
    """Raised inside a worker when a response's time is up. Not an ``Exception``: graders catch those broadly
    (math-verify turns any ``Exception`` into "no match") and would carry on."""


class _Alarm:
    """Interrupts the worker's main thread ``seconds`` after :meth:`arm`, then every 50 ms until :meth:`disarm`
    (a reward that swallows one interruption gets the next)."""

    def __init__(self) -> None:
        self.armed = False
        signal.signal(signal.SIGALRM, self._ring)

    def _ring(self, signum: int, frame: object) -> None:
        if self.armed:  # a signal that arrives after disarm() is ignored
            raise _OutOfTime

    def arm(self, seconds: float) -> None:
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)

    def disarm(self) -> None:
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def _serve(conn: Connection, reward_bytes: bytes, timeout_s: float) -> None:
    """Worker loop: receive ``(completion, sample)``, send ``("ok", scores)``, ``("timeout", None)`` or
    ``("error", message)``."""
    mark_scoring_process()
    # Ctrl-C reaches the whole process group; the parent decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        reward = pickle.loads(reward_bytes)
    except Exception:
        conn.send(("error", traceback.format_exc(limit=-3)[-_MAX_ERROR_CHARS:]))
        return
    alarm = _Alarm()
    conn.send(("ready", None))
    while (request := conn.recv()) is not None:
        try:
            try:
                alarm.arm(timeout_s)
                reply = ("ok", _checked_score(reward, *request))
            finally:
                alarm.disarm()
        except _OutOfTime:
            reply = ("timeout", None)
        except Exception:
            reply = ("error", traceback.format_exc(limit=-3)[-_MAX_ERROR_CHARS:])
        conn.send(reply)


class _Worker:
    """One scoring process, the pipe to it, and the response it is scoring."""

    def __init__(self, reward_bytes: bytes, timeout_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child_conn, reward_bytes, timeout_s), name="relax_pl-reward", daemon=True
        )
        self.process.start()
        child_conn.close()
        self.ready = False
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT_S  # of starting up, then of the task
        self.task: int | None = None  # index into the batch being scored

    def send(self, task: int, request: tuple[str, dict], timeout_s: float) -> None:
        self.task = task
        self.deadline = time.monotonic() + timeout_s + KILL_GRACE_S
        self.conn.send(request)

    def exit_code(self) -> int | None:
        self.process.join(timeout=1.0)
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.process.close()
        self.conn.close()


Outcome = tuple[str, "dict[str, float] | str | None"]


class BoundedScorer:
    """Scores responses with a :class:`VerifiableReward` in a pool of worker processes, each response bounded
    in wall time.

    The workers are persistent ``spawn`` processes (safe after torch started its threads, and from any thread
    of the caller), started on first use. Each scores one response at a time; results come back in input order
    and do not depend on the number of workers. A response that takes longer than ``timeout_s``, raises, or
    kills its worker (segfault, out of memory) gets 0 for every component and is counted in the returned
    :class:`ScoredBatch`. A worker stuck past ``timeout_s + KILL_GRACE_S`` is killed and replaced while the
    others go on; what they scored is kept. Well-behaved responses cost a pipe round trip (tens of
    microseconds) on top of the reward itself. Calls from several threads are serialised.

    Args:
        reward: the reward; it is pickled into the workers, so it must be picklable and defined at module
            level (in a script, under ``if __name__ == "__main__":``).
        timeout_s: bound per response in seconds; ``None`` takes ``reward.timeout_s``.
        workers: worker processes; ``None`` takes ``reward.workers``, and if that is ``None`` too,
            :func:`default_workers` for ``processes_per_node``.
        processes_per_node: training processes on this machine, each with a pool of its own (one per GPU).

    Raises:
        TypeError: if ``reward`` cannot be pickled.
        ValueError: if ``timeout_s`` is not positive or ``workers`` is below 1.

    Example::

        with BoundedScorer(MathReward(), workers=4) as scorer:
            batch = scorer(["... \\boxed{4}"], [{"prompt": "2 + 2?", "answer": "4"}])
        batch.components["overall"]  # [1.0]
    """

    def __init__(
        self,
        reward: Scorable,
        timeout_s: float | None = None,
        workers: int | None = None,
        processes_per_node: int = 1,
    ) -> None:
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.reward = reward
        self.timeout_s = reward.timeout_s if timeout_s is None else timeout_s
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")
        workers = getattr(reward, "workers", None) if workers is None else workers
        self.workers = default_workers(processes_per_node) if workers is None else workers
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
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
            outcomes = self._score_all(list(zip(completions, samples)))
        scored = _collect(outcomes)
        if outcomes and scored.timeouts + scored.errors == len(outcomes):
            first = scored.first_error or f"every response timed out (timeout_s={self.timeout_s})"
            scored.all_failed = {type(self.reward).__name__: first}
        return scored

    def _score_all(self, requests: list[tuple[str, dict]]) -> list[Outcome]:
        """Hand each request to the next free worker; collect answers, time-outs and deaths as they come."""
        outcomes: list[Outcome | None] = [None] * len(requests)
        pending = deque(range(len(requests)))
        while len(self._workers) < min(self.workers, len(requests)):
            self._workers.append(_Worker(self._reward_bytes, self.timeout_s))
        while pending or any(worker.task is not None for worker in self._workers):
            for slot, worker in enumerate(self._workers):
                if worker.ready and worker.task is None and pending:
                    task = pending.popleft()
                    try:
                        worker.send(task, requests[task], self.timeout_s)
                    except Exception as error:
                        outcomes[task] = ("error", f"could not send the sample to the reward worker: {error!r}")
                        self._replace(slot)
            by_conn = {worker.conn: slot for slot, worker in enumerate(self._workers)}
            until = min(worker.deadline for worker in self._workers) - time.monotonic()
            for conn in wait(list(by_conn), timeout=None if until == math.inf else max(0.0, until)):
                self._receive(by_conn[conn], outcomes)
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.deadline >= now:
                    continue
                if not worker.ready:
                    self.close_workers()
                    raise RuntimeError(
                        f"the reward worker did not start within {_STARTUP_TIMEOUT_S:.0f} s. It is a spawned process "
                        "that imports your entry script: a script that starts training at import (no "
                        "`if __name__ == '__main__':` guard) never lets it start"
                    )
                if worker.task is not None:
                    outcomes[worker.task] = ("timeout", None)
                    self._replace(slot)
        return outcomes  # type: ignore[return-value]

    def _receive(self, slot: int, outcomes: list[Outcome | None]) -> None:
        worker = self._workers[slot]
        try:
            status, payload = worker.conn.recv()
        except (EOFError, OSError):
            message = f"the reward worker died (exit code {worker.exit_code()})"
            if not worker.ready:
                self.close_workers()
                raise RuntimeError(
                    f"{message} while loading {type(self.reward).__name__} (its error is above; a worker imports the "
                    "main script again: keep a script's own code under if __name__ == '__main__':)"
                ) from None
            if worker.task is not None:
                outcomes[worker.task] = ("error", f"{message} while scoring a response")
            self._replace(slot)
            return
        if not worker.ready:
            if status != "ready":
                self.close_workers()
                raise RuntimeError(f"the reward worker could not load {type(self.reward).__name__}: {payload}")
            worker.ready = True
            worker.deadline = math.inf
            return
        assert worker.task is not None, "a reward worker answered without a request"
        outcomes[worker.task] = (status, payload)
        worker.task, worker.deadline = None, math.inf

    def _replace(self, slot: int) -> None:
        """Kill the worker and start its replacement now, so that it loads while the others go on."""
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self._reward_bytes, self.timeout_s)

    def close_workers(self) -> None:
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def close(self) -> None:
        """Stop the workers (the next call starts new ones). They hold no state, so they are simply killed."""
        with self._lock:
            self.close_workers()

    def __enter__(self) -> BoundedScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_lock"):
            self.close()

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickling a module that holds the scorer) gets its own workers on first use.
        return {"reward": self.reward, "timeout_s": self.timeout_s, "workers": self.workers}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["reward"], state["timeout_s"], state.get("workers"))


def _collect(outcomes: list[Outcome]) -> ScoredBatch:
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
