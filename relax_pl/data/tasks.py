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

import io
import math
import random
import zlib
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

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


WORD_NAMES = ("Mia", "Tom", "Ana", "Leo", "Sara", "Ben", "Noah", "Lily", "Omar", "Zoe")
WORD_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "shells")
WORD_GAINS = ("buys {n} more {item}", "finds {n} more {item}", "gets {n} {item} from a friend")
WORD_LOSSES = ("gives {n} {item} to a friend", "loses {n} {item}", "uses {n} {item}")


HELDOUT_SIZE = 256


def word_problem(rng: random.Random, steps: int, max_value: int) -> tuple[str, int]:
    """One word problem of ``steps`` gains or losses and its answer, drawn from ``rng``."""
    name, item = rng.choice(WORD_NAMES), rng.choice(WORD_ITEMS)
    count = start = rng.randint(2, max_value)
    actions = []
    for _ in range(steps):
        if count > 1 and rng.random() < 0.5:
            n = rng.randint(1, min(max_value, count - 1))
            actions.append(rng.choice(WORD_LOSSES).format(n=n, item=item))
            count -= n
        else:
            n = rng.randint(1, max_value)
            actions.append(rng.choice(WORD_GAINS).format(n=n, item=item))
            count += n
    return f"{name} has {start} {item}. {name} {', then '.join(actions)}. How many {item} does {name} have now?", count


def word_problems(
    split: str, num_samples: int = 1000, steps: int = 2, max_value: int = 20, seed: int = 0
) -> list[dict]:
    """Short word problems that a model answers in a few sentences of reasoning, with exact integer answers:
    ``{"problem": "Mia has 7 apples. She buys 5 more apples, then gives 3 apples to a friend. How many apples
    does Mia have now?", "answer": "9"}``.

    Each problem starts from a count in ``[2, max_value]`` and applies ``steps`` gains or losses of 1 to
    ``max_value`` items (a loss never takes more than is there). Splits as in :func:`arithmetic`.

    The split ``heldout`` is a fixed evaluation set of :data:`HELDOUT_SIZE` distinct problems from the ``test``
    share (so it never holds a training problem, whatever the options): every other row has ``steps`` steps (the
    training distribution), the rows between them ``steps + 1`` (harder than training); each row's ``data_source``
    says which (``word_problems/1-step``), so validation reports both. ``num_samples`` and ``seed`` do not change it.

    Raises:
        ValueError: an option is out of range, or ``split`` is not one of ``train``, ``validation``, ``test``,
            ``heldout``.
    """
    if split not in (*SPLITS, "heldout"):
        raise ValueError(f"builtin:word_problems has no split {split!r}; choose one of {[*SPLITS, 'heldout']}")
    if num_samples < 1 or steps < 1 or max_value < 2:
        raise ValueError(
            f"builtin:word_problems needs num_samples >= 1, steps >= 1 and max_value >= 2; "
            f"got num_samples={num_samples}, steps={steps}, max_value={max_value}"
        )
    if split == "heldout":
        return heldout_word_problems(steps, max_value)
    rng = random.Random(f"word_problems/{split}/{seed}")
    rows: list[dict] = []
    for _ in range(1000 * num_samples):
        problem, answer = word_problem(rng, steps, max_value)
        if split_of(problem) != split:
            continue
        rows.append({"problem": problem, "answer": str(answer)})
        if len(rows) == num_samples:
            return rows
    raise ValueError(
        f"builtin:word_problems found too few {split!r} problems with steps={steps}, max_value={max_value}; "
        "widen the problem space"
    )


def heldout_word_problems(steps: int, max_value: int) -> list[dict]:
    """The ``heldout`` split of :func:`word_problems`: distinct ``test``-share problems, alternately of ``steps`` and
    ``steps + 1`` steps."""
    rngs = {k: random.Random(f"word_problems/heldout/{k}/{max_value}") for k in (steps, steps + 1)}
    seen: set[str] = set()
    rows: list[dict] = []
    for _ in range(10_000 * HELDOUT_SIZE):
        k = steps + len(rows) % 2
        problem, answer = word_problem(rngs[k], k, max_value)
        if split_of(problem) != "test" or problem in seen:
            continue
        seen.add(problem)
        rows.append({"problem": problem, "answer": str(answer), "data_source": f"word_problems/{k}-step"})
        if len(rows) == HELDOUT_SIZE:
            return rows
    raise ValueError(
        f"builtin:word_problems cannot find {HELDOUT_SIZE} distinct held-out problems with steps={steps}, "
        f"max_value={max_value}; widen the problem space"
    )


GEOMETRY_PROBLEMS = ("angle", "hypotenuse", "leg", "rectangle_area", "triangle_area")
PYTHAGOREAN_TRIPLES = ((3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29), (9, 40, 41))
GEOMETRY_QUESTIONS = {
    "angle": "<image>Two angles of the triangle are marked in degrees. Find x.",
    "hypotenuse": "<image>The triangle has a right angle. Find x, the length of its hypotenuse.",
    "leg": "<image>The triangle has a right angle. Find x.",
    "rectangle_area": "<image>Find the area of the rectangle.",
    "triangle_area": "<image>Find the area of the triangle; the dashed segment is its height.",
}


def geometry_problems(kind: str) -> list[tuple[int, ...]]:
    """Every parameter tuple of one kind of figure (the whole problem space, before splitting)."""
    if kind == "angle":  # two angles a, b of a triangle; x = 180 - a - b >= 30
        return [(a, b) for a in range(30, 100, 5) for b in range(30, 100, 5) if a + b <= 150]
    if kind in ("hypotenuse", "leg"):  # legs p, q and hypotenuse r of a right triangle, scaled by k
        return [(k * p, k * q, k * r) for p, q, r in PYTHAGOREAN_TRIPLES for k in range(1, 5) if k * r <= 100]
    if kind in ("rectangle_area", "triangle_area"):  # width (base) and height
        return [(w, h) for w in range(2, 21) for h in range(2, 21)]
    raise ValueError(f"builtin:geometry has no problem kind {kind!r}; choose from {list(GEOMETRY_PROBLEMS)}")


def geometry_answer(kind: str, params: tuple[int, ...]) -> str:
    """The exact answer of a figure, as a string (a triangle's area may end in .5)."""
    if kind == "angle":
        return str(180 - params[0] - params[1])
    if kind == "hypotenuse":
        return str(params[2])
    if kind == "leg":
        return str(params[1])
    if kind == "rectangle_area":
        return str(params[0] * params[1])
    area = params[0] * params[1] / 2
    return str(int(area)) if area.is_integer() else str(area)


def draw_geometry(kind: str, params: tuple[int, ...], size: int = 224) -> Image.Image:
    """The figure of one problem: the shape drawn to scale, its given values written next to their parts and
    the unknown marked ``x`` (nothing else; the question text does not repeat the numbers)."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, size // 14))
    if kind == "angle":
        a, b = math.radians(params[0]), math.radians(params[1])
        apex = (math.cos(a) * math.sin(b) / math.sin(a + b), math.sin(a) * math.sin(b) / math.sin(a + b))
        corners = [(0.0, 0.0), (1.0, 0.0), apex]
        labels = [(0, f"{params[0]}°"), (1, f"{params[1]}°"), (2, "x°")]
        _polygon(draw, font, corners, size, corner_labels=labels)
    elif kind in ("hypotenuse", "leg"):
        p, q, r = params
        corners = [(0.0, 0.0), (float(q), 0.0), (0.0, float(p))]  # right angle at the first corner
        hyp = "x" if kind == "hypotenuse" else str(r)
        _polygon(draw, font, corners, size, side_labels=[str(q) if kind == "hypotenuse" else "x", hyp, str(p)],
                 right_angle=True)
    elif kind == "rectangle_area":
        w, h = params
        corners = [(0.0, 0.0), (float(w), 0.0), (float(w), float(h)), (0.0, float(h))]
        _polygon(draw, font, corners, size, side_labels=[str(w), str(h), None, None])
    else:
        base, height = params
        apex_x = base * (0.3 if (base + height) % 2 else 0.7)
        corners = [(0.0, 0.0), (float(base), 0.0), (apex_x, float(height))]
        _polygon(draw, font, corners, size, side_labels=[str(base), None, None], altitude=(apex_x, height, str(height)))
    return image


def _polygon(draw, font, corners, size, side_labels=None, corner_labels=None, right_angle=False, altitude=None):
    """Draw a polygon scaled into the image (y up), with labels at side midpoints or inside corners."""
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    margin = size * 0.18
    scale = (size - 2 * margin) / max(max(xs) - min(xs), max(ys) - min(ys))
    center = ((max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2)

    def to_pixels(x: float, y: float) -> tuple[float, float]:
        return size / 2 + (x - center[0]) * scale, size / 2 - (y - center[1]) * scale

    points = [to_pixels(*c) for c in corners]
    draw.polygon(points, outline="black", width=2)
    middle = (sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points))
    for i, label in enumerate(side_labels or []):
        if label is None:
            continue
        (x0, y0), (x1, y1) = points[i], points[(i + 1) % len(points)]
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        # outwards from the shape's centre, so the label sits outside the side it names
        dx, dy = mx - middle[0], my - middle[1]
        norm = math.hypot(dx, dy) or 1.0
        _label(draw, font, (mx + dx / norm * size * 0.07, my + dy / norm * size * 0.07), label)
    for i, label in corner_labels or []:
        x, y = points[i]
        _label(draw, font, (x + (middle[0] - x) * 0.4, y + (middle[1] - y) * 0.4), label)
    if right_angle:
        x, y = points[0]
        mark = size * 0.05
        draw.line([(x + mark, y), (x + mark, y - mark), (x, y - mark)], fill="black", width=1)
    if altitude is not None:
        apex_x, height, label = altitude
        top, foot = to_pixels(apex_x, height), to_pixels(apex_x, 0.0)
        steps = 12
        for k in range(0, steps, 2):  # dashed
            t0, t1 = k / steps, (k + 1) / steps
            draw.line([(top[0], top[1] + (foot[1] - top[1]) * t0), (top[0], top[1] + (foot[1] - top[1]) * t1)],
                      fill="gray", width=2)
        _label(draw, font, (top[0] - size * 0.07, (top[1] + foot[1]) / 2), label)


def _label(draw, font, center: tuple[float, float], text: str) -> None:
    draw.text(center, text, fill="blue", font=font, anchor="mm")


def geometry(
    split: str,
    num_samples: int = 1000,
    problems: list[str] = list(GEOMETRY_PROBLEMS),  # noqa: B006 (jsonargparse shows the default)
    image_size: int = 224,
    seed: int = 0,
) -> list[dict]:
    """Figures with exact answers, in the Geometry3K schema: ``{"problem": "<image>Find x.", "answer": "70",
    "images": [PNG bytes], "kind": "angle"}``. The numbers are only in the figure, so the task needs the image.

    Kinds (``problems``): ``angle`` (the third angle of a triangle), ``hypotenuse`` and ``leg`` (Pythagorean
    triples), ``rectangle_area``, ``triangle_area`` (base and dashed height). 924 distinct figures; each is
    assigned to a split by :func:`split_of` of its parameters. A row draws a kind uniformly, then a figure of
    that kind from the split's share (with replacement). Images are kept as PNG bytes (a few kB each).

    Raises:
        ValueError: an option is out of range, an unknown kind, or ``split`` is not a split.
    """
    if split not in SPLITS:
        raise ValueError(f"builtin:geometry has no split {split!r}; choose one of {list(SPLITS)}")
    if num_samples < 1:
        raise ValueError(f"builtin:geometry option num_samples must be >= 1, got {num_samples}")
    if image_size < 64:
        raise ValueError(f"builtin:geometry option image_size must be >= 64 pixels, got {image_size}")
    if not problems:
        raise ValueError(f"builtin:geometry option problems must name at least one of {list(GEOMETRY_PROBLEMS)}")
    # kinds are drawn uniformly, then a figure of that kind: the small kinds (21 triangles) are not drowned out
    space = {k: [p for p in geometry_problems(k) if split_of(f"geometry/{k}/{p}") == split] for k in problems}
    kinds = [kind for kind in problems if space[kind]]
    rng = random.Random(f"geometry/{split}/{seed}")
    rows, figures = [], {}
    for kind in (rng.choice(kinds) for _ in range(num_samples)):
        params = rng.choice(space[kind])
        if (kind, params) not in figures:
            buffer = io.BytesIO()
            draw_geometry(kind, params, image_size).save(buffer, format="PNG")
            figures[kind, params] = buffer.getvalue()
        rows.append({"problem": GEOMETRY_QUESTIONS[kind], "answer": geometry_answer(kind, params),
                     "images": [figures[kind, params]], "kind": kind})
    return rows


TASKS: dict[str, Callable[..., list[dict]]] = {
    "arithmetic": arithmetic,
    "geometry": geometry,
    "word_problems": word_problems,
}
