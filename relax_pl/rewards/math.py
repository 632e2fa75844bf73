"""Math answer grading: the last ``\\boxed{}`` of a response against the reference answer."""

from __future__ import annotations

import logging
import re
from typing import Literal

from math_verify import parse, verify

from relax_pl.rewards.base import VerifiableReward
from relax_pl.rewards.direct import TimedOut, call_in_child, can_fork
from relax_pl.rewards.process import in_scoring_process

# A real final answer is short; longer boxed content is graded 0 without being handed to sympy.
MAX_BOXED_CHARS = 1000

_BOX_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|\{|\}")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|~")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°")
_UNIT = re.compile(
    r"(?<=[\d}).])\s*(?:square\s+|sq\.?\s*)?"
    r"(?:units?|cm|mm|km|m|in|inch(?:es)?|ft|feet|foot|yd|yards?|meters?|centimeters?|degrees?|deg)"
    r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?\s*$"
)
_LEFT_HAND_SIDE = re.compile(r"^[^=<>!]{1,30}=")
_CHOICE_LETTER = re.compile(r"^\(([A-Za-z])\)$")


class _DropTimeoutWarning(logging.Filter):
    # math-verify warns once per process that its signal timeouts are off; relax_pl bounds the time itself.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutWarning())


def last_boxed(text: str) -> tuple[int, str] | None:
    """Position and content of the last brace-matched ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    "Last" is the box that opens last, so ``\\boxed{\\boxed{3}}`` gives ``3``. A box whose braces never close
    does not count. One pass over the text: linear time however deeply the braces nest.
    """
    open_braces: list[tuple[int, int]] = []  # (start of the token, start of a box's content or -1)
    found: tuple[int, int, int] | None = None
    for token in _BOX_TOKEN.finditer(text):
        if token.group() != "}":
            is_box = token.group() != "{"
            open_braces.append((token.start(), token.end() if is_box else -1))
        elif open_braces:
            start, content_start = open_braces.pop()
            if content_start >= 0 and (found is None or start > found[0]):
                found = (start, content_start, token.start())
    if found is None:
        return None
    start, content_start, content_end = found
    return start, text[content_start:content_end]


def clean_answer(answer: str) -> str:
    """The answer without what does not change its value: ``$``, ``\\text{}``, units, degrees, ``x =``, a final
    period; ``\\dfrac`` becomes ``\\frac`` and ``(A)`` becomes ``A``. Spaces are kept (LaTeX needs some)."""
    s = answer.strip().replace("\u2212", "-").replace("$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LEFT_RIGHT.sub("", _SPACING.sub(" ", s))
    s = _DEGREES.sub("", s)
    while (unwrapped := _TEXT_COMMAND.sub(r" \1 ", s)) != s:
        s = unwrapped
    s = _UNIT.sub("", s.strip().rstrip(".").rstrip()).replace("\\%", "").replace("%", "")
    if s.count("=") == 1:
        s = _LEFT_HAND_SIDE.sub("", s)
    s = " ".join(s.split()).rstrip(".").strip()
    return _CHOICE_LETTER.sub(r"\1", s)


def answers_match(prediction: str, gold: str, timeout_s: float = 1.0) -> bool:
    """Whether ``prediction`` equals ``gold``: equal once cleaned and without spaces, else equal for
    math-verify (symbolic, numbers rounded to 6 decimals).

    The symbolic comparison is bounded: called directly, it runs in a forked child that is given up after
    ``timeout_s`` (``TimeoutError``); inside a reward's ``score`` it runs as is, because the scoring process
    already bounds the time (:class:`~relax_pl.rewards.VerifiableReward`). math-verify's own timeouts stay off:
    they use ``signal.alarm``, which works only in a main thread, in whole seconds per parse or comparison.

    Raises:
        TimeoutError: called directly, the symbolic comparison took longer than ``timeout_s``.
    """
    if len(prediction) > MAX_BOXED_CHARS:
        return False
    prediction, gold = clean_answer(prediction), clean_answer(gold)
    if not prediction:
        return False
    if prediction.replace(" ", "") == gold.replace(" ", ""):
        return True
    if in_scoring_process() or not can_fork():
        return symbolic_match(prediction, gold)
    try:
        return call_in_child(symbolic_match, (prediction, gold), timeout_s, "answers_match")
    except TimedOut:
        raise TimeoutError(f"answers_match gave up on {prediction[:80]!r} after {timeout_s:g} s") from None


def symbolic_match(prediction: str, gold: str) -> bool:
    """math-verify's verdict on two cleaned answers, unbounded: call it where the time is bounded."""
    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    prediction_parsed = parse(f"${prediction}$", parsing_timeout=None)
    if not gold_parsed or not prediction_parsed:
        return False
    return verify(gold_parsed, prediction_parsed, timeout_seconds=None)


class MathReward(VerifiableReward):
    """Accuracy of the last ``\\boxed{}`` answer, plus a format bonus for having one.

    ``accuracy`` is 1 when the content of the last brace-matched ``\\boxed{...}`` matches ``sample["answer"]``
    (:func:`answers_match`); ``format`` is 1 when that box is non-empty;
    ``overall = accuracy_weight * accuracy + format_weight * format``.

    Args:
        accuracy_weight: weight of accuracy in ``overall``.
        format_weight: weight of format in ``overall``.
        timeout_s: wall-time bound for scoring one response.
        workers: scoring processes in training (see :class:`~relax_pl.rewards.VerifiableReward`).

    Example::

        reward = MathReward(accuracy_weight=0.9, format_weight=0.1)
        reward.score("so x = \\boxed{\\frac{1}{2}}", {"prompt": "...", "answer": "0.5"})
        # {'accuracy': 1.0, 'format': 1.0, 'overall': 1.0}
    """

    def __init__(
        self,
        accuracy_weight: float = 1.0,
        format_weight: float = 0.0,
        timeout_s: float = 1.0,
        workers: int | None = None,
    ) -> None:
        super().__init__(timeout_s=timeout_s, workers=workers)
        self.accuracy_weight = accuracy_weight
        self.format_weight = format_weight

    def has_format(self, completion: str) -> bool:
        """Whether the response ends its reasoning with a non-empty ``\\boxed{}``."""
        box = last_boxed(completion)
        return box is not None and bool(box[1].strip())

    def score(self, completion: str, sample: dict) -> dict[str, float]:
        box = last_boxed(completion)
        accuracy = float(box is not None and answers_match(box[1], str(sample["answer"])))
        format_ = float(self.has_format(completion))
        overall = self.accuracy_weight * accuracy + self.format_weight * format_
        return {"accuracy": accuracy, "format": format_, "overall": overall}


class Geo3kReward(MathReward):
    """The Geometry3K reward of EasyR1 and verl: ``overall = 0.9 * accuracy + 0.1 * format``.

    Accuracy is :class:`MathReward`'s (the dataset's ``choices`` column is ignored). The format template:

    - ``"boxed"``: the ReLaX paper's prompt ("... put your final answer within \\boxed{}."): a non-empty final
      ``\\boxed{}``.
    - ``"think_boxed"``: EasyR1's prompt: the response opens with ``<think>...</think>`` and the non-empty final
      ``\\boxed{}`` comes after ``</think>``.

    Args:
        format_template: which of the two templates earns the format bonus.
        accuracy_weight: weight of accuracy in ``overall``.
        format_weight: weight of format in ``overall``.
        timeout_s: wall-time bound for scoring one response.
        workers: scoring processes in training (see :class:`~relax_pl.rewards.VerifiableReward`).
    """

    def __init__(
        self,
        format_template: Literal["boxed", "think_boxed"] = "boxed",
        accuracy_weight: float = 0.9,
        format_weight: float = 0.1,
        timeout_s: float = 1.0,
        workers: int | None = None,
    ) -> None:
        if format_template not in ("boxed", "think_boxed"):
            raise ValueError(f"format_template must be 'boxed' or 'think_boxed', got {format_template!r}")
        super().__init__(accuracy_weight, format_weight, timeout_s, workers)
        self.format_template = format_template

    def has_format(self, completion: str) -> bool:
        if self.format_template == "boxed":
            return super().has_format(completion)
        text = completion.lstrip()
        box = last_boxed(text)
        think_end = text.find("</think>")
        return text.startswith("<think>") and box is not None and bool(box[1].strip()) and 0 <= think_end < box[0]
