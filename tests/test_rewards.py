import os
import pickle
import signal
import threading
import time
import warnings

import pytest

from relax_pl.rewards import (
    DIRECT_CALL_OVERHEAD_S,
    TIMED_OUT,
    BoundedScorer,
    Geo3kReward,
    MathReward,
    RewardScorer,
    RewardTimeoutWarning,
    ScoredBatch,
    VerifiableReward,
    answers_match,
    clean_answer,
    default_workers,
    last_boxed,
)
from relax_pl.rewards import bounded, direct

# (completion, answer, accuracy, format) for MathReward
GRADER_TABLE = [
    # fractions and decimals
    (r"so \boxed{0.5}", r"\frac{1}{2}", 1, 1),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1, 1),
    (r"\boxed{\frac{1}{2}}", "0.5", 1, 1),
    (r"\boxed{\dfrac{1}{2}}", "1/2", 1, 1),
    (r"\boxed{\tfrac{25}{4}}", "6.25", 1, 1),
    (r"\boxed{6.25}", r"\frac{25}{4}", 1, 1),
    (r"\boxed{\frac12}", "0.5", 1, 1),
    (r"\boxed{8.50}", "8.5", 1, 1),
    (r"\boxed{8.49}", "8.5", 0, 1),
    (r"\boxed{2}", r"\frac{1}{2}", 0, 1),
    (r"\boxed{1,000}", "1000", 1, 1),
    # degrees
    (r"\boxed{60^\circ}", "60", 1, 1),
    (r"\boxed{60^{\circ}}", "60", 1, 1),
    (r"\boxed{60 \degree}", "60", 1, 1),
    (r"\boxed{60°}", "60", 1, 1),
    (r"\boxed{60 degrees}", "60", 1, 1),
    (r"\boxed{30^\circ}", "60", 0, 1),
    # square roots
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", 1, 1),
    (r"\boxed{2 \sqrt 3}", r"2\sqrt{3}", 1, 1),
    (r"\boxed{4\sqrt{2}}", r"\sqrt{32}", 1, 1),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\sqrt{3}/2", 1, 1),
    (r"\boxed{2\sqrt{3}}", "3.4641", 0, 1),  # a rounded value is not the exact answer
    (r"\boxed{3\sqrt{2}}", r"2\sqrt{3}", 0, 1),
    # units and text
    (r"\boxed{5 \text{ cm}}", "5", 1, 1),
    (r"\boxed{5\text{cm}^2}", "5", 1, 1),
    (r"\boxed{12 \mbox{ units}}", "12", 1, 1),
    (r"\boxed{7 in}", "7", 1, 1),
    (r"\boxed{\text{(A)}}", "A", 1, 1),
    (r"\boxed{(B)}", "A", 0, 1),
    (r"\boxed{12\%}", "12", 1, 1),
    (r"\boxed{Paris}", "Paris", 1, 1),
    # assignments, signs, pi, trailing period
    (r"\boxed{x = 5}", "5", 1, 1),
    (r"\boxed{m \angle B = 60}", "60", 1, 1),
    (r"\boxed{-3}", "-3", 1, 1),
    ("\\boxed{\u22123}", "-3", 1, 1),
    (r"\boxed{3}", "-3", 0, 1),
    (r"\boxed{2\pi}", r"2\pi", 1, 1),
    (r"\boxed{\pi \cdot 2}", r"2\pi", 1, 1),
    (r"\boxed{3.14}", r"\pi", 0, 1),
    (r"\boxed{7}.", "7", 1, 1),
    (r"\boxed{7.}", "7", 1, 1),
    (r"$\boxed{7}$", "7", 1, 1),
    # which box counts
    (r"first \boxed{3}, then \boxed{4}", "4", 1, 1),
    (r"first \boxed{4}, then \boxed{3}", "4", 0, 1),
    (r"\boxed{\frac{\sqrt{3}}{\sqrt{4}}} is it", r"\frac{\sqrt{3}}{2}", 1, 1),  # nested braces inside the box
    (r"\boxed {9}", "9", 1, 1),
    (r"\fbox{9}", "9", 1, 1),
    (r"\boxed{\boxed{9}}", "9", 1, 1),
    (r"\boxed{4} and then \boxed{5", "4", 1, 1),  # an unclosed box does not count
    # no box, empty box
    ("the answer is 5", "5", 0, 0),
    ("", "5", 0, 0),
    (r"\boxed{}", "5", 0, 0),
    (r"\boxed{  }", "5", 0, 0),
    (r"\boxed{5} then \boxed{}", "5", 0, 0),
]


@pytest.mark.parametrize(("completion", "answer", "accuracy", "format_"), GRADER_TABLE)
def test_math_reward_grader_table(completion, answer, accuracy, format_):
    scores = MathReward().score(completion, {"prompt": "p", "answer": answer})
    assert scores == {"accuracy": accuracy, "format": format_, "overall": accuracy}


def test_last_boxed_and_clean_answer():
    assert last_boxed(r"a \boxed{1} b \boxed {x^{2}} c") == (14, "x^{2}")
    assert last_boxed(r"\boxed{1} \boxed{2") == (0, "1")
    assert last_boxed("no box {here}") is None
    assert clean_answer(r"$5 \text{ cm}$.") == "5"
    assert clean_answer(r"\left( 1, 2 \right)") == "( 1, 2 )"


def test_math_reward_weights():
    reward = MathReward(accuracy_weight=0.5, format_weight=0.25)
    assert reward.score(r"\boxed{2}", {"prompt": "", "answer": "2"})["overall"] == 0.75
    assert reward.score(r"\boxed{3}", {"prompt": "", "answer": "2"})["overall"] == 0.25


GEO3K_TABLE = [
    # (template, completion, answer, overall)
    ("boxed", r"The angle is \boxed{60}", "60", 1.0),
    ("boxed", r"The angle is \boxed{50}", "60", 0.1),
    ("boxed", "The angle is 60", "60", 0.0),
    ("think_boxed", r"<think>sum is 180</think> so \boxed{60}", "60", 1.0),
    ("think_boxed", r"  <think>sum is 180</think>\boxed{50}", "60", 0.1),
    ("think_boxed", r"sum is 180, so \boxed{60}", "60", 0.9),  # no think block
    ("think_boxed", r"<think>\boxed{60}</think> done", "60", 0.9),  # the box is inside the think block
    ("think_boxed", r"<think>sum is 180 so \boxed{60}", "60", 0.9),  # the think block never closes
    ("think_boxed", r"<think>x</think> \boxed{}", "60", 0.0),
]


@pytest.mark.parametrize(("template", "completion", "answer", "overall"), GEO3K_TABLE)
def test_geo3k_reward(template, completion, answer, overall):
    sample = {"prompt": "Find x.", "answer": answer, "choices": ["50", "60", "70", "80"]}
    assert Geo3kReward(format_template=template).score(completion, sample)["overall"] == pytest.approx(overall)


def test_reward_arguments_are_checked():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        MathReward(timeout_s=0)
    with pytest.raises(ValueError, match="format_template"):
        Geo3kReward(format_template="xml")


# Rewards scored in the worker process must be importable, so they live at module level.
class ExactMatch(VerifiableReward):
    """The documented example: a custom reward with its own component."""

    def score(self, completion: str, sample: dict) -> dict[str, float]:
        hit = float(completion.strip() == sample["answer"].strip())
        return {"overall": hit, "exact": hit}


class Misbehaving(VerifiableReward):
    """Raises, crashes, hangs or returns garbage depending on the completion."""

    def score(self, completion: str, sample: dict) -> dict[str, float]:
        if completion == "raise":
            raise ValueError("cannot grade this one")
        if completion == "oom":
            raise MemoryError("out of memory")
        if completion == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if completion == "hang":
            time.sleep(60)
        if completion == "no overall":
            return {"accuracy": 1.0}
        if completion == "nan":
            return {"overall": float("nan")}
        return {"overall": 1.0, "extra": 2.0}


def _samples(n: int, answer: str = "5") -> list[dict]:
    return [{"prompt": "p", "answer": answer} for _ in range(n)]


@pytest.fixture(scope="module")
def math_scorer():
    with BoundedScorer(MathReward(accuracy_weight=0.9, format_weight=0.1)) as scorer:
        yield scorer


def test_scorer_well_behaved_batch_is_fast(math_scorer):
    completions = [rf"Step by step... so x = \boxed{{\frac{{{i}}}{{4}}}}" for i in range(32)]
    samples = [{"prompt": "p", "answer": str(i / 4)} for i in range(32)]
    math_scorer(completions[:1], samples[:1])  # start the worker
    start = time.perf_counter()
    batch = math_scorer(completions, samples)
    elapsed = time.perf_counter() - start
    print(f"32 well-behaved completions: {elapsed * 1000:.0f} ms")
    assert batch.components["overall"] == [1.0] * 32
    assert batch.components["format"] == [1.0] * 32
    assert (batch.timeouts, batch.errors, batch.first_error) == (0, 0, None)
    assert elapsed < 2.0  # well under 1 s on an idle core; generous for a shared machine


HOSTILE = [  # benchmarks/direct_call_bound.py times these as direct calls
    r"\boxed{9^{9^{9^{9}}}}",  # sympy would try to build a number of 9^387420489 digits
    "x" * 1_000_000,
    r"\boxed{" + "{" * 10_000 + "5" + "}" * 10_000 + "}",
    r"\boxed{" + "{" * 40 + "5" + "}" * 40 + "}",  # short, but math-verify's set parsing explodes
    r"\boxed{" + "5" * 1_000_000 + "}",
]
HANGS = {HOSTILE[0], HOSTILE[3]}  # the two that never finish without a bound


def test_scorer_hostile_batch_is_bounded(math_scorer):
    hostile = HOSTILE
    start = time.perf_counter()
    batch = math_scorer([*hostile, r"fine: \boxed{5}"], _samples(len(hostile) + 1))
    elapsed = time.perf_counter() - start
    print(f"hostile batch: {elapsed:.2f} s, {batch.timeouts} timeouts")
    assert batch.components["accuracy"] == [0.0] * len(hostile) + [1.0]
    assert batch.components["overall"][:-1] == [0.0, 0.0, 0.1, 0.0, 0.1]  # over-long boxes keep the format
    assert batch.timeouts == 2 and batch.errors == 0
    assert elapsed < 10.0
    assert math_scorer([r"\boxed{5}"], _samples(1)).components["overall"] == [1.0]  # the worker was replaced


def test_scorer_from_a_non_main_thread(math_scorer):
    results = {}

    def score() -> None:
        results["batch"] = math_scorer([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{\sqrt{12}}"], _samples(2, r"2\sqrt{3}"))

    thread = threading.Thread(target=score)
    start = time.perf_counter()
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and time.perf_counter() - start < 10.0
    assert results["batch"].components["accuracy"] == [0.0, 1.0]
    assert results["batch"].timeouts == 1


def test_scorer_counts_errors_crashes_and_timeouts():
    completions = ["ok", "raise", "oom", "segfault", "no overall", "nan", "hang", "ok"]
    with BoundedScorer(Misbehaving(), timeout_s=0.5) as scorer:
        start = time.perf_counter()
        batch = scorer(completions, _samples(len(completions)))
        elapsed = time.perf_counter() - start
    assert isinstance(batch, ScoredBatch)
    assert batch.components == {
        "overall": [1.0, 0, 0, 0, 0, 0, 0, 1.0],
        "extra": [2.0, 0, 0, 0, 0, 0, 0, 2.0],
    }
    assert (batch.errors, batch.timeouts) == (5, 1)
    assert "ValueError: cannot grade this one" in batch.first_error
    assert elapsed < 10.0


def test_a_reward_that_fails_on_every_response_is_named():
    """What RLVRModule counts to stop a run that would train on nothing: each reward (of a list too) that failed
    on every response, with its first error; a reward that failed on some responses only is not named."""
    with BoundedScorer(Misbehaving(), timeout_s=0.5) as scorer:
        failed = scorer(["raise", "hang"], _samples(2))
        partly = scorer(["raise", "ok"], _samples(2))
        timed_out = scorer(["hang"], _samples(1))
    assert list(failed.all_failed) == ["Misbehaving"]
    assert "ValueError: cannot grade this one" in failed.all_failed["Misbehaving"]  # the first error, not the time-out
    assert partly.all_failed == {}
    assert timed_out.all_failed == {"Misbehaving": "every response timed out (timeout_s=0.5)"}
    scorer = RewardScorer([ExactMatch(), Misbehaving(timeout_s=0.5)])
    try:
        batch = scorer(["raise", "raise"], _samples(2, answer="raise"))
    finally:
        scorer.close()
    assert list(batch.all_failed) == ["Misbehaving"]  # ExactMatch scored both


def test_scorer_reports_a_worker_crash():
    with BoundedScorer(Misbehaving()) as scorer:
        batch = scorer(["segfault", "ok"], _samples(2))
    assert batch.errors == 1 and "exit code -11" in batch.first_error
    assert batch.components["overall"] == [0.0, 1.0]


def test_custom_reward_through_the_scorer():
    reward = ExactMatch(timeout_s=2.0)
    assert reward.score(" 5 ", {"prompt": "p", "answer": "5"}) == {"overall": 1.0, "exact": 1.0}
    scorer = BoundedScorer(reward)
    assert scorer.timeout_s == 2.0
    copy = pickle.loads(pickle.dumps(scorer))  # a copy starts its own worker
    batch = copy(["5", "6"], _samples(2))
    assert batch.components == {"overall": [1.0, 0.0], "exact": [1.0, 0.0]}
    copy.close()
    assert copy._workers == []
    scorer.close()


def test_scorer_rejects_bad_input(math_scorer):
    with pytest.raises(ValueError, match="2 completions but 1 samples"):
        math_scorer(["a", "b"], _samples(1))
    with pytest.raises(ValueError, match=r"samples\[1\] lacks \['answer'\]"):
        math_scorer(["a", "b"], [{"prompt": "p", "answer": "1"}, {"prompt": "p", "problem": "q"}])
    with pytest.raises(TypeError, match="must be picklable"):
        unpicklable = ExactMatch()
        unpicklable.lock = threading.Lock()
        BoundedScorer(unpicklable)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        BoundedScorer(ExactMatch(), timeout_s=-1.0)


# ------------------------------------------------------------------------------------------------ direct calls
def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


@pytest.mark.parametrize("completion", HOSTILE, ids=["power_tower", "1e6_chars", "10k_braces", "40_braces", "1e6_digits"])
def test_direct_score_call_is_bounded(completion):
    """A user's own evaluation script calling MathReward().score: each hostile completion returns within
    timeout_s + DIRECT_CALL_OVERHEAD_S (before: the power tower and the 40 braces never returned)."""
    reward = MathReward(timeout_s=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores, elapsed = _timed(reward.score, completion, {"prompt": "p", "answer": "5"})
    print(f"direct call: {elapsed:.2f} s -> {scores}")
    assert elapsed < reward.timeout_s + DIRECT_CALL_OVERHEAD_S
    if completion in HANGS:
        assert scores == {"overall": 0.0, TIMED_OUT: 1.0}
        assert [w.category for w in caught] == [RewardTimeoutWarning]
        assert "MathReward.score gave up after 1 s" in str(caught[0].message)
    else:
        assert scores["overall"] == 0.0 and TIMED_OUT not in scores and not caught


def test_direct_calls_from_threads_and_helpers_are_bounded():
    reward = MathReward(timeout_s=1.0)
    results = {}

    def score(key: str, completion: str) -> None:
        results[key] = _timed(reward.score, completion, {"prompt": "p", "answer": r"2\sqrt{3}"})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardTimeoutWarning)
        calls = [("hang", HOSTILE[0]), ("ok", r"\boxed{2\sqrt 3}")]
        threads = [threading.Thread(target=score, args=call) for call in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert results["hang"][0] == {"overall": 0.0, TIMED_OUT: 1.0}
    assert results["ok"][0] == {"accuracy": 1.0, "format": 1.0, "overall": 1.0}
    assert max(elapsed for _, elapsed in results.values()) < 1.0 + DIRECT_CALL_OVERHEAD_S
    # the grading helper is bounded too; its cheap exact-match path needs no child process
    assert answers_match(r"\dfrac{1}{2}", r"\frac{1}{2}") and answers_match("0.5", r"\frac{1}{2}")
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"answers_match gave up on '9\^\{9"):
        answers_match("9^{9^{9^{9}}}", "5", timeout_s=0.5)
    assert time.perf_counter() - start < 0.5 + DIRECT_CALL_OVERHEAD_S


def test_direct_call_reraises_errors_and_reports_crashes():
    reward = Misbehaving(timeout_s=0.5)
    with pytest.raises(ValueError, match="cannot grade this one") as raised:
        reward.score("raise", {})
    assert "Misbehaving.score's scoring process" in "".join(getattr(raised.value, "__notes__", []))
    with pytest.raises(RuntimeError, match=r"Misbehaving.score crashed its scoring process \(exit code -11\)"):
        reward.score("segfault", {})
    with pytest.warns(RewardTimeoutWarning):
        assert reward.score("hang", {}) == {"overall": 0.0, TIMED_OUT: 1.0}
    assert reward.score("ok", {}) == {"overall": 1.0, "extra": 2.0}


def test_notebook_reward_and_subclass_calls_are_bounded_once():
    """A reward defined in a function (as in a notebook: not importable, not picklable) scores directly, and a
    subclass calling super().score() is bounded once, in one child process."""

    class Notebook(MathReward):
        def score(self, completion: str, sample: dict) -> dict[str, float]:
            scores = super().score(completion, sample)
            return {**scores, "pid": float(os.getpid()), "length": float(len(completion))}

    reward = Notebook(timeout_s=0.5)
    scores = reward.score(r"\boxed{5}", {"prompt": "p", "answer": "5"})
    assert scores["accuracy"] == 1.0 and scores["length"] == 9.0
    assert scores["pid"] != os.getpid()  # it ran in a child
    with pytest.warns(RewardTimeoutWarning):
        scores, elapsed = _timed(reward.score, HOSTILE[3], {"prompt": "p", "answer": "5"})
    assert scores == {"overall": 0.0, TIMED_OUT: 1.0} and elapsed < 0.5 + DIRECT_CALL_OVERHEAD_S
    assert Geo3kReward.score is MathReward.score  # inherited, wrapped once


def test_direct_call_without_fork_uses_a_worker(monkeypatch):
    monkeypatch.setattr(direct, "can_fork", lambda: False)
    start = time.perf_counter()
    assert Misbehaving(timeout_s=0.5).score("hang", {}) == {"overall": 0.0, TIMED_OUT: 1.0}
    assert time.perf_counter() - start < 30  # mostly the worker's start
    with pytest.raises(RuntimeError, match="cannot grade this one"):
        Misbehaving().score("raise", {})


# ------------------------------------------------------------------------------------------------ worker pool
class SleepyEcho(VerifiableReward):
    """Returns the sample's index after sleeping what the sample says: later responses can finish first."""

    def score(self, completion: str, sample: dict) -> dict[str, float]:
        if completion == "stuck":  # in C code the worker's interval timer cannot interrupt: only a kill stops it
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(30)
        time.sleep(sample["sleep"])
        return {"overall": float(sample["index"]), "pid": float(os.getpid())}


def test_default_workers_divides_the_free_cores():
    assert default_workers(cores=2) == 1
    assert default_workers(cores=16) == 8  # capped: each worker holds its own grader
    assert default_workers(cores=16, cap=32) == 15
    assert default_workers(processes_per_node=8, cores=96) == 8
    assert default_workers(processes_per_node=8, cores=32) == 3  # 4 cores per rank, one for the rank itself
    assert default_workers(processes_per_node=8, cores=8) == 1
    assert 1 <= default_workers() <= bounded.MAX_DEFAULT_WORKERS
    with pytest.raises(ValueError, match="workers must be >= 1"):
        MathReward(workers=0)
    assert BoundedScorer(MathReward(workers=3)).workers == 3
    assert BoundedScorer(MathReward(), processes_per_node=64).workers == 1


def test_pool_keeps_input_order_and_survives_a_stuck_worker():
    samples = [{"prompt": "p", "answer": "", "index": i, "sleep": 0.3 if i % 3 == 0 else 0.0} for i in range(9)]
    completions = ["fine"] * 9
    completions[4] = "stuck"
    with BoundedScorer(SleepyEcho(), timeout_s=1.0, workers=3) as scorer:
        scorer(["fine"] * 3, samples[:3])  # start the workers
        before = {w.process.pid for w in scorer._workers}
        batch = scorer(completions, samples)
        after = {w.process.pid for w in scorer._workers}
    assert batch.components["overall"] == [float(i) if i != 4 else 0.0 for i in range(9)]  # input order
    assert (batch.timeouts, batch.errors) == (1, 0)
    assert len(set(batch.components["pid"]) - {0.0}) > 1  # the work was shared
    assert len(before - after) == 1 and len(after) == 3  # the stuck worker alone was killed and replaced


class Spins(VerifiableReward):
    """Loops in pure Python on "spin" (what the worker's own alarm interrupts); its pid otherwise."""

    def score(self, completion: str, sample: dict) -> dict[str, float]:
        while completion == "spin":
            pass
        return {"overall": 1.0, "pid": float(os.getpid())}


def test_a_pure_python_overrun_is_interrupted_inside_the_worker_which_lives_on(monkeypatch):
    """The worker's own alarm ends an overrun in Python code: the worker lives on (same pid, no replacement). With
    the alarm off the caller's kill still bounds the response, but every overrun then costs a worker restart."""
    replaced = []
    replace = BoundedScorer._replace
    monkeypatch.setattr(BoundedScorer, "_replace", lambda self, slot: (replaced.append(slot), replace(self, slot)))
    with BoundedScorer(Spins(), timeout_s=0.5, workers=1) as scorer:
        first = scorer(["fine"], _samples(1))
        pid = scorer._workers[0].process.pid
        batch = scorer(["spin", "fine"], _samples(2))
        assert scorer._workers[0].process.pid == pid and scorer._workers[0].process.is_alive()
    assert first.components["pid"] == [pid]
    assert (batch.timeouts, batch.errors) == (1, 0) and batch.components["pid"] == [0.0, pid]  # the same worker
    assert replaced == []


def test_pool_gives_the_same_rewards_as_one_worker():
    answers = ["5", r"\frac{1}{2}", "60", r"2\sqrt{3}"]
    completions = [
        r"so \boxed{5}", r"\boxed{0.5}", r"\boxed{60^\circ}", r"\boxed{\sqrt{12}}", r"\boxed{6}", "no box",
        HOSTILE[0], r"\boxed{\frac{2}{4}}", HOSTILE[3], r"\boxed{3\sqrt{2}}", "x" * 10_000, r"\boxed{5 \text{ cm}}",
    ]
    samples = [{"prompt": "p", "answer": answers[i % 4]} for i in range(len(completions))]
    reward = Geo3kReward(timeout_s=1.0)
    with BoundedScorer(reward, workers=1) as one, BoundedScorer(reward, workers=3) as three:
        batches = one(completions, samples), three(completions, samples)
    assert batches[0] == batches[1]
    assert batches[0].timeouts == 2 and batches[0].errors == 0
    assert sum(batches[0].components["accuracy"]) == 4
