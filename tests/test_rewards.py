import os
import pickle
import signal
import threading
import time

import pytest

from relax_pl.rewards import (
    BoundedScorer,
    Geo3kReward,
    MathReward,
    ScoredBatch,
    VerifiableReward,
    clean_answer,
    last_boxed,
)

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


def test_scorer_hostile_batch_is_bounded(math_scorer):
    hostile = [
        r"\boxed{9^{9^{9^{9}}}}",  # sympy would try to build a number of 9^387420489 digits
        "x" * 1_000_000,
        r"\boxed{" + "{" * 10_000 + "5" + "}" * 10_000 + "}",
        r"\boxed{" + "{" * 40 + "5" + "}" * 40 + "}",  # short, but math-verify's set parsing explodes
        r"\boxed{" + "5" * 1_000_000 + "}",
    ]
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
    assert copy._process is None
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
