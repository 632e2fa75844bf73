"""Built-in tasks: prompt/answer rows generated in code, named ``builtin:<task>`` in a recipe.

A task is a function ``task(split: str, **options) -> list[dict]`` registered in :data:`TASKS`. Each row
holds at least ``problem`` (the question) and ``answer`` (the exact answer as a string), the default
``prompt_key`` / ``answer_key`` of :class:`~relax_pl.data.PromptDataModule`. The recipe's ``data.task_options``
become the keyword options. A task must be deterministic given its options and must keep its splits
disjoint, so that validation never scores a training prompt.

Adding a task::

    from relax_pl.data.tasks import TASKS

    def capitals(split: str, num_samples: int = 100, seed: int = 0) -> list[dict]:
        ...
        return [{"problem": "What is the capital of France?", "answer": "Paris"}, ...]

    TASKS["capitals"] = capitals  # now `train_source: builtin:capitals` works
"""

from __future__ import annotations

import random
import zlib
from typing import Callable

SPLITS = ("train", "validation", "test")
OPERATIONS = "+-*"


def split_of(problem: str) -> str:
    """The split a generated problem belongs to: a stable hash of its text puts 80% in ``train``, 10% in
    ``validation`` and 10% in ``test``, so the splits never share a problem whatever the seeds."""
    bucket = zlib.crc32(problem.encode()) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def evaluate(operands: list[int], operators: list[str]) -> int:
    """Value of ``operands[0] operators[0] operands[1] ...`` with ``*`` binding tighter than ``+`` and ``-``."""
    terms, signs = [operands[0]], [1]
    for op, value in zip(operators, operands[1:]):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return sum(sign * term for sign, term in zip(signs, terms))


def arithmetic(
    split: str,
    num_samples: int = 1000,
    digits: int = 1,
    operations: str = "+",
    num_operands: int = 2,
    seed: int = 0,
) -> list[dict]:
    """Integer arithmetic problems with exact answers: ``{"problem": "What is 3 + 5?", "answer": "8"}``.

    Difficulty grows with ``digits`` (each operand has exactly that many digits; 1 means 0-9), with
    ``num_operands`` and with the operators allowed in ``operations`` (any of ``+-*``; ``*`` binds tighter).
    Problems are drawn with replacement from the split's share of all problems (see :func:`split_of`).

    Raises:
        ValueError: an option is out of range, or ``split`` is not one of ``train``, ``validation``, ``test``.
    """
    if split not in SPLITS:
        raise ValueError(f"builtin:arithmetic has no split {split!r}; choose one of {list(SPLITS)}")
    if num_samples < 1:
        raise ValueError(f"builtin:arithmetic option num_samples must be >= 1, got {num_samples}")
    if digits < 1:
        raise ValueError(f"builtin:arithmetic option digits must be >= 1, got {digits}")
    if num_operands < 2:
        raise ValueError(f"builtin:arithmetic option num_operands must be >= 2, got {num_operands}")
    if not operations or set(operations) - set(OPERATIONS):
        raise ValueError(f"builtin:arithmetic option operations must be made of {OPERATIONS!r}, got {operations!r}")

    low = 0 if digits == 1 else 10 ** (digits - 1)
    high = 10**digits - 1
    ops = sorted(set(operations))
    rng = random.Random(f"arithmetic/{split}/{seed}")
    rows: list[dict] = []
    # each draw lands in the wanted split with probability 0.1 to 0.8: the cap only trips on a problem space
    # too small to hold this split at all (e.g. 1-digit "+" has 100 problems)
    for _ in range(1000 * num_samples):
        operands = [rng.randint(low, high) for _ in range(num_operands)]
        operators = [rng.choice(ops) for _ in range(num_operands - 1)]
        expression = " ".join(f"{x} {op}" for x, op in zip(operands, operators)) + f" {operands[-1]}"
        problem = f"What is {expression}?"
        if split_of(problem) != split:
            continue
        rows.append({"problem": problem, "answer": str(evaluate(operands, operators))})
        if len(rows) == num_samples:
            return rows
    raise ValueError(
        f"builtin:arithmetic found too few {split!r} problems with digits={digits}, operations={operations!r},"
        f" num_operands={num_operands}; widen the problem space"
    )


TASKS: dict[str, Callable[..., list[dict]]] = {"arithmetic": arithmetic}
