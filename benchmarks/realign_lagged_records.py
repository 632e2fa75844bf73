"""Realign the experiment's step records written before commit d524c51 (``StepLog`` fix).

Until then a record of step t held step t - 1's trainer metrics (reward, entropy, length, DSD, alpha, timings: what
the module and callbacks log through Lightning) beside step t's own probes, bonuses and per-response DSDs (written
straight to the loggers or read from the callback). The lag restarted at every resume: a run's first record after
starting or resuming is right and the next one repeats its trainer metrics. This script moves each trainer metric
back to the step it belongs to (a metric its step did not log, such as ``grad_share`` before the first update, may
take the next step's value; the report's metrics are logged on every step). The last step before each resume (and a
finished run's last step) then has no trainer metrics: they were never written, and the report leaves them out.

It was run once, on files written wholly before the fix (commit 0a4f782). A file without the repeat (written after
the fix, or realigned already) is left as it is, so running it twice is harmless; a file whose run was resumed under
the fixed runner before being realigned is not handled (its new records would join the old segment)::

    python benchmarks/realign_lagged_records.py docs/relax_vs_grpo/*.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# what the old StepLog did not overwrite: straight-to-logger metrics and the callback's per-response values
CURRENT_PREFIXES = ("probe_", "repexp_", "er_", "dsd_values", "adv_values")


def lagged(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and not k.startswith(CURRENT_PREFIXES)}


def repeats(first: dict, second: dict) -> bool:
    """Whether ``second`` repeats ``first``'s trainer metrics (the step's timing included, never equal by chance);
    ``second`` may hold a metric more, one that its own step logged and the step before did not."""
    a, b = lagged(first), lagged(second)
    return "step_s" in a and all(b.get(key) == value for key, value in a.items())


def segment_starts(steps: list[dict]) -> list[int]:
    """Indices of the records a process wrote first: the next record repeats its trainer metrics."""
    return [
        i for i in range(len(steps) - 1)
        if steps[i + 1]["step"] == steps[i]["step"] + 1 and repeats(steps[i], steps[i + 1])
    ]


def realign(steps: list[dict]) -> list[dict]:
    starts = segment_starts(steps)
    if not starts:
        return steps
    fixed = [dict(record) for record in steps]
    for begin, end in zip(starts, starts[1:] + [len(steps)]):
        # the first record is right as it stands; the next one also holds the values of any key its own step logged
        # and the step before did not, so it must not stand in for the first
        for i in range(begin + 1, end):
            for key in lagged(fixed[i]):
                del fixed[i][key]
            if i + 1 < end:
                fixed[i].update(lagged(steps[i + 1]))
    return fixed


def realign_file(path: Path) -> bool:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    fixed = realign(steps)
    if fixed is steps:
        return False
    by_step = iter(fixed)
    path.write_text("".join(json.dumps(next(by_step) if "step" in r else r) + "\n" for r in records))
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", type=Path)
    for path in parser.parse_args().records:
        print(f"{path}: {'realigned' if realign_file(path) else 'unchanged'}")
