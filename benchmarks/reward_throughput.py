"""Reward scoring throughput: responses/s of BoundedScorer with 1, 2 and 4 worker processes, side by side.

    python benchmarks/reward_throughput.py                     # 2,048 responses, workers 1 2 4 (minutes)
    python benchmarks/reward_throughput.py --responses 64      # a quick check that it runs
    python benchmarks/reward_throughput.py --workers 1 2 4 8 --hostile 0.01

The responses are geo3k-style: a few sentences of reasoning about one of the built-in geometry problems (angles,
hypotenuses, legs, areas; relax_pl.data.tasks) ending in a final ``\\boxed{}``, as a policy writes them: right
answers in the forms graders must accept (``60^\\circ``, ``\\frac{21}{2}``, ``\\sqrt{225}``, ``15 \\text{ cm}``),
wrong answers, answers without a box, ``<think>`` blocks; a fraction ``--hostile`` of them is the hostile kind
that hangs a symbolic grader (a power tower, deeply nested braces, a megabyte of text). They are scored with
``recipes/geo3k.yaml``'s reward (``Geo3kReward``, 0.9 accuracy + 0.1 format, ``timeout_s`` 2 s). Each worker
count gets its own pool, started (and timed) before the batch; the batch time is what a training step waits for,
the pool persisting across steps. The rewards must be the same for every worker count.

Run it on a quiet machine: other processes on the same cores change the numbers.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from relax_pl.data.tasks import geometry_answer, geometry_problems
from relax_pl.rewards import BoundedScorer, Geo3kReward

QUESTIONS = {
    "angle": "Two angles of the triangle are {0} and {1} degrees. Find the third angle x.",
    "hypotenuse": "The legs of a right triangle are {0} and {1}. Find the hypotenuse x.",
    "leg": "A right triangle has hypotenuse {2} and one leg {0}. Find the other leg x.",
    "rectangle_area": "Find the area of a {0} by {1} rectangle.",
    "triangle_area": "Find the area of a triangle with base {0} and height {1}.",
}
REASONING = {
    "angle": "The angles of a triangle add up to 180 degrees. So x = 180 - {0} - {1}.",
    "hypotenuse": "By the Pythagorean theorem, x^2 = {0}^2 + {1}^2 = {0}*{0} + {1}*{1}, so x is the square root.",
    "leg": "By the Pythagorean theorem, x^2 = {2}^2 - {0}^2, so x = \\sqrt{{{2}^2 - {0}^2}}.",
    "rectangle_area": "The area of a rectangle is its length times its width: {0} \\times {1}.",
    "triangle_area": "The area of a triangle is half the base times the height: \\frac{{1}}{{2}} \\cdot {0} \\cdot {1}.",
}
FILLER = [
    "Let me read the figure carefully.",
    "First, I identify what is given and what is asked.",
    "I will check the arithmetic once more.",
    "Double-checking: the units are consistent.",
    "This matches the figure, where the marked values are shown.",
]
HOSTILE = [
    r"so the answer is \boxed{9^{9^{9^{9}}}}",
    r"\boxed{" + "{" * 40 + "5" + "}" * 40 + "}",
    "x" * 1_000_000,
]


def equivalent_forms(answer: str, kind: str) -> list[str]:
    """Ways a policy writes a right answer that a grader must accept."""
    value = float(answer)
    forms = [answer, f"x = {answer}"]
    if kind == "angle":
        forms += [f"{answer}^\\circ", f"{answer}^{{\\circ}}", f"{answer} degrees"]
    if kind in ("hypotenuse", "leg"):
        forms += [f"\\sqrt{{{int(value * value)}}}", f"{answer} \\text{{ cm}}"]
    if kind.endswith("area"):
        forms += [f"{answer} \\text{{ square units}}", f"\\frac{{{int(value * 2)}}}{{2}}"]
    return forms


def response(rng: random.Random, kind: str, params: tuple[int, ...], hostile: float) -> str:
    if rng.random() < hostile:
        return rng.choice(HOSTILE)
    answer = geometry_answer(kind, params)
    steps = [rng.choice(FILLER), REASONING[kind].format(*params), rng.choice(FILLER)]
    roll = rng.random()
    if roll < 0.45:
        final = rng.choice(equivalent_forms(answer, kind))
    elif roll < 0.85:  # a wrong answer: off by a little, or a wrong step
        final = f"{float(answer) + rng.choice([-10, -2, -1, 1, 2, 5]):g}"
    else:
        final = None
    text = " ".join(steps)
    if final is None:
        text += f" So x is about {answer}."
    else:
        text += f" Therefore, the answer is \\boxed{{{final}}}."
    if rng.random() < 0.2:
        text = f"<think>{' '.join(steps[:2])}</think> {text}"
    return text


def make_batch(n: int, hostile: float, seed: int = 0) -> tuple[list[str], list[dict]]:
    rng = random.Random(seed)
    problems = [(kind, params) for kind in QUESTIONS for params in geometry_problems(kind)]
    completions, samples = [], []
    for _ in range(n):
        kind, params = rng.choice(problems)
        completions.append(response(rng, kind, params, hostile))
        samples.append({"prompt": QUESTIONS[kind].format(*params), "answer": geometry_answer(kind, params)})
    return completions, samples


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=2048)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hostile", type=float, default=0.005, help="fraction of hostile responses")
    parser.add_argument("--timeout_s", type=float, default=2.0)
    args = parser.parse_args()

    completions, samples = make_batch(args.responses, args.hostile)
    reward = Geo3kReward(format_template="boxed", accuracy_weight=0.9, format_weight=0.1, timeout_s=args.timeout_s)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    hostile = sum(c in HOSTILE for c in completions)
    print(f"{args.responses} geo3k-style responses ({hostile} hostile), Geo3kReward timeout_s {args.timeout_s:g}; "
          f"{cores} usable cores, load average {load:.2f} at start\n")

    rows, reference = [], None
    for workers in args.workers:
        with BoundedScorer(reward, workers=workers) as scorer:
            start = time.perf_counter()
            scorer(completions[:workers], samples[:workers])  # starts the pool
            startup = time.perf_counter() - start
            start = time.perf_counter()
            batch = scorer(completions, samples)
            seconds = time.perf_counter() - start
        if reference is None:
            reference = batch
        rows.append((workers, startup, seconds, batch, batch == reference))

    print("| workers | pool start (s) | batch (s) | responses/s | vs 1 worker | timeouts | errors | mean reward | same rewards as 1 worker |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = rows[0][2]
    for workers, startup, seconds, batch, same in rows:
        mean = sum(batch.components["overall"]) / len(completions)
        print(f"| {workers} | {startup:.1f} | {seconds:.1f} | {len(completions) / seconds:.0f} | {base / seconds:.2f}x "
              f"| {batch.timeouts} | {batch.errors} | {mean:.3f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    run()
