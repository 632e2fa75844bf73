"""How long a direct ``MathReward().score(...)`` call takes on the hostile completions of the tests.

    python benchmarks/direct_call_bound.py                 # timeout_s = 1.0, each call capped at 60 s
    python benchmarks/direct_call_bound.py --cap 300

Each completion is scored in a fresh Python process (so a call that never returns can be stopped from outside and
reported as "> cap"); the time is the ``score`` call alone, measured inside that process, imports excluded. The
table is what a user's own evaluation script or notebook sees.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

HOSTILE = {  # the hostile completions of tests/test_rewards.py
    "9^(9^(9^9))": r"\boxed{9^{9^{9^{9}}}}",
    "1e6 plain chars": "x" * 1_000_000,
    "10k nested braces": r"\boxed{" + "{" * 10_000 + "5" + "}" * 10_000 + "}",
    "40 nested braces": r"\boxed{" + "{" * 40 + "5" + "}" * 40 + "}",
    "1e6-digit box": r"\boxed{" + "5" * 1_000_000 + "}",
}

CHILD = """
import json, sys, time
from relax_pl.rewards import MathReward
reward = MathReward(timeout_s=float(sys.argv[2]))
completion = json.loads(sys.stdin.read())
start = time.perf_counter()
scores = reward.score(completion, {"prompt": "p", "answer": "5"})
print(json.dumps({"seconds": time.perf_counter() - start, "scores": scores}))
"""


def time_one(completion: str, timeout_s: float, cap: float) -> tuple[float | None, dict | None]:
    """Seconds of the score call and its result; ``(None, None)`` when it was still running after ``cap``."""
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, "_", str(timeout_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        out, _ = process.communicate(json.dumps(completion), timeout=cap + 30)  # + imports
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None, None
    result = json.loads(out.strip().splitlines()[-1])
    return result["seconds"], result["scores"]


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout_s", type=float, default=1.0)
    parser.add_argument("--cap", type=float, default=60.0, help="stop a call that is still running after this long")
    args = parser.parse_args()
    print(f"MathReward(timeout_s={args.timeout_s}).score, one fresh process per completion, cap {args.cap:.0f} s\n")
    print("| completion | seconds | scores |")
    print("|---|---|---|")
    worst = 0.0
    for name, completion in HOSTILE.items():
        seconds, scores = time_one(completion, args.timeout_s, args.cap)
        if seconds is None:
            worst = float("inf")
            print(f"| {name} | > {args.cap:.0f} (killed) | none: had not returned |")
        else:
            worst = max(worst, seconds)
            print(f"| {name} | {seconds:.2f} | {scores} |")
    print(f"\nworst: {'never returned' if worst == float('inf') else f'{worst:.2f} s'}")


if __name__ == "__main__":
    run()
