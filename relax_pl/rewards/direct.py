"""Direct scoring calls, bounded: the work runs in a forked child that is killed at the deadline.

Why a process per call: a grader can hang inside one long C call (sympy building ``9^(9^(9^9))``) that neither
``signal.alarm`` nor a thread can interrupt, and ``signal.alarm`` works only in a main thread. Why ``fork``: the
child starts in milliseconds, needs no import, and runs whatever the caller has (a reward defined in a notebook,
a lambda it holds), with no ``if __name__ == "__main__"`` guard. A child that deadlocks on a lock some other
thread of the caller held at the fork (forking a threaded process is unsafe in general) runs into the same
deadline: it costs that call a timeout, never a hang. Where ``fork`` does not exist (Windows) a reward's
``score`` goes to a one-off :class:`~relax_pl.rewards.BoundedScorer` worker instead (slower: it imports the
reward anew).
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import pickle
import time
import traceback
import warnings
from multiprocessing.connection import Connection
from typing import Any, Callable

from relax_pl.rewards.process import TIMED_OUT, Scorable, ScoreFunction, mark_scoring_process

# What a direct call may take beyond its timeout: killing and reaping the child (milliseconds for a small caller,
# tens of milliseconds for one that holds a few GB). Checked in tests/test_rewards.py.
DIRECT_CALL_OVERHEAD_S = 0.5


class RewardTimeoutWarning(UserWarning):
    """A direct ``score`` call ran out of time and returned ``{"overall": 0.0, "timed_out": 1.0}``."""


class TimedOut(Exception):
    """:func:`call_in_child` gave up (a class of its own: the child's code may raise ``TimeoutError`` itself)."""


def _child(conn: Connection, fn: Callable[..., Any], args: tuple) -> None:
    mark_scoring_process()
    faulthandler.disable()  # a crash here is reported by the caller; a dump would show the caller's threads
    try:
        reply = ("ok", fn(*args))
    except BaseException as error:  # noqa: BLE001 - the caller re-raises it
        reply = ("error", (error, traceback.format_exc()))
    try:
        conn.send(reply)
    except Exception:  # the error (or the result) does not pickle: send its text
        conn.send(("error", (None, traceback.format_exc() if reply[0] == "ok" else reply[1][1])))


def call_in_child(fn: Callable[..., Any], args: tuple, timeout_s: float, name: str) -> Any:
    """``fn(*args)`` in a forked child, given up after ``timeout_s`` seconds (raises :class:`TimedOut`).

    Re-raises what ``fn`` raised (its traceback in the child attached as a note); raises ``RuntimeError`` when the
    child died (a crash in C code, out of memory). ``name`` says what ran, in those messages.
    """
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    start = time.monotonic()
    child = context.Process(target=_child, args=(writer, fn, args), daemon=True)
    child.start()
    writer.close()
    try:
        if not reader.poll(max(0.0, timeout_s - (time.monotonic() - start))):
            raise TimedOut
        try:
            status, payload = reader.recv()
        except EOFError:
            child.join()
            raise RuntimeError(f"{name} crashed its scoring process (exit code {child.exitcode})") from None
    finally:
        reader.close()
        child.kill()
        child.join()
        child.close()
    if status == "ok":
        return payload
    error, child_traceback = payload
    if error is None:
        raise RuntimeError(f"{name} failed in its scoring process:\n{child_traceback}")
    if hasattr(error, "add_note"):
        error.add_note(f"raised in {name}'s scoring process:\n{child_traceback}")
    raise error


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def score_in_child(reward: Scorable, score: ScoreFunction, completion: str, sample: dict) -> dict[str, float]:
    """``score(reward, completion, sample)`` in a child process, given up after ``reward.timeout_s``.

    Returns what ``score`` returned, or ``{"overall": 0.0, "timed_out": 1.0}`` (with a
    :class:`RewardTimeoutWarning`) when the time ran out; errors as :func:`call_in_child`.
    """
    name = f"{type(reward).__name__}.score"
    if not can_fork():
        return _score_in_worker(reward, completion, sample)
    try:
        return call_in_child(score, (reward, completion, sample), reward.timeout_s, name)
    except TimedOut:
        warnings.warn(
            f"{name} gave up after {reward.timeout_s:g} s (timeout_s) and returned overall 0 with '{TIMED_OUT}': 1.0",
            RewardTimeoutWarning,
            stacklevel=3,
        )
        return {"overall": 0.0, TIMED_OUT: 1.0}


def _score_in_worker(reward: Scorable, completion: str, sample: dict) -> dict[str, float]:
    from relax_pl.rewards.bounded import BoundedScorer

    try:
        pickle.dumps(reward)
    except Exception as error:
        raise TypeError(f"without fork, {type(reward).__name__} must be picklable to be scored: {error}") from error
    with BoundedScorer(reward, workers=1) as scorer:
        batch = scorer([completion], [{"prompt": "", "answer": "", **sample}])
    if batch.timeouts:
        return {"overall": 0.0, TIMED_OUT: 1.0}
    if batch.errors:
        raise RuntimeError(f"{type(reward).__name__}.score failed in its scoring process: {batch.first_error}")
    return {name: values[0] for name, values in batch.components.items()}
