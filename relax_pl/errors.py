"""User errors: a recipe value, a file or a reward that cannot work is reported as one line (what, the value, the fix)
instead of a traceback; ``RELAX_PL_DEBUG=1`` in the environment shows the traceback (and a parser's full usage)."""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

DEBUG_ENV = "RELAX_PL_DEBUG"


class RecipeError(ValueError):
    """A recipe value that cannot work: the message names the key, the value and the fix."""

    def __init__(self, key: str, value: Any, fix: str) -> None:
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")


class RewardFailedError(RuntimeError):
    """The reward failed (raised or timed out) on every response of several training steps in a row: the run would
    train on nothing."""


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions whose message is the whole story (they name the key, file or reward and the fix)."""
    from relax_pl.checkpointing import CheckpointError, CheckpointWriteError
    from relax_pl.data.sources import DataError

    return RecipeError, DataError, CheckpointError, CheckpointWriteError, RewardFailedError, FileNotFoundError


@contextmanager
def reported_as_one_line(prog: str = "python -m relax_pl") -> Iterator[None]:
    """Run the block; a user error ends the process with its message on one line (exit code 1)."""
    try:
        yield
    except user_errors() as error:
        if debugging():
            raise
        exit_with(prog, str(error))


def exit_with(prog: str, message: str, code: int = 1, debug_shows: str = "the traceback") -> NoReturn:
    prog = prog.replace("__main__.py", "python -m relax_pl")
    sys.stderr.write(f"{prog}: error: {one_line(message)}  ({DEBUG_ENV}=1 shows {debug_shows})\n")
    raise SystemExit(code)


def one_line(message: str) -> str:
    """A message's lines joined: after a line that ends in ":" by a space, else by "; "."""
    lines = [" ".join(line.split()) for line in message.splitlines() if line.strip()]
    joined = lines[0] if lines else ""
    for line in lines[1:]:
        joined += (" " if joined.endswith(":") else "; ") + line
    return joined


def unknown_keys(message: str) -> list[str]:
    """The recipe keys or options a jsonargparse error says are not accepted."""
    quoted = re.findall(r"does not accept options? '([^']+)'", message) + re.findall(r'Key "([^"]+)" is not', message)
    _, _, unrecognized = message.partition("unrecognized arguments:")
    return list(dict.fromkeys(quoted + re.findall(r"--([\w.]+)", unrecognized)))


def did_you_mean(message: str, known: Iterable[str]) -> str:
    """`` (did you mean model.optimizer.lr?)`` for each unknown key the message names that is close to a known one."""
    known = list(known)
    hints = []
    for key in unknown_keys(message):
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        if close:
            hints.append(f"{key}: did you mean {close[0]}?")
    return f" ({'; '.join(hints)})" if hints else ""


def parser_keys(parser: Any) -> list[str]:
    """Every option ``dest`` of a jsonargparse parser (nested dataclass keys are dotted: ``model.optimizer.lr``)."""
    return [action.dest for action in parser._actions if isinstance(getattr(action, "dest", None), str)]
