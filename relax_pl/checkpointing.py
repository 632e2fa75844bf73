"""Checkpoints that a crash, a full disk or a hostile file cannot turn into a lost run.

Writes: each checkpoint goes to a temporary file in the same folder, is fsynced and renamed over the target, so a
process killed mid-write leaves the previous file intact; a write that fails (disk full) removes its partial
file and says which checkpoint failed and why; each good write removes what earlier killed writes left behind.

Reads: only tensors and plain data (``torch.load(weights_only=True)``): a checkpoint whose pickle carries code
is refused, naming the file, and a truncated or corrupt one fails naming the file and the newest intact
checkpoint beside it to resume from.
"""

from __future__ import annotations

import errno
import os
import pickle
import pickletools
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

# A temporary file of another machine (a shared filesystem) is left alone unless it is older than this: its
# writer may still be running, and only processes of this machine can be checked.
STALE_FOREIGN_TEMPORARY_S = 24 * 3600


# torch's zip writer does not say why a write failed; one that failed while its folder had less free space than
# this (its partial file still there) ran out of disk: a filled disk keeps at most a few blocks free.
DISK_FULL_BELOW_BYTES = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the file, why, and what to do instead."""


class CheckpointWriteError(OSError):
    """A checkpoint write that failed (``errno`` kept, e.g. ``ENOSPC``); the previous file at the target is
    intact and the partial temporary file was removed."""


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before the rename: hidden (``.last.ckpt.<pid>@<host>.tmp``, never matched by
    Lightning's ``last*.ckpt``), named after its writer so that a stale one can be told from a live one."""
    return path.with_name(f".{path.name}.{os.getpid()}@{socket.gethostname()}.tmp")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def stale_temporaries(path: Path) -> list[Path]:
    """Temporary files of ``path`` whose writer is gone: a dead process of this machine, or another machine's
    older than :data:`STALE_FOREIGN_TEMPORARY_S`."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)@(.+)\.tmp$")
    host, stale = socket.gethostname(), []
    for candidate in path.parent.glob(f".{path.name}.*.tmp"):
        match = pattern.match(candidate.name)
        if match is None or int(match[1]) == os.getpid() and match[2] == host:
            continue
        if match[2] == host:
            gone = not _process_alive(int(match[1]))
        else:
            gone = time.time() - candidate.stat().st_mtime > STALE_FOREIGN_TEMPORARY_S
        if gone:
            stale.append(candidate)
    return stale


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint file's contents, tensors and plain data only (``weights_only=True``).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CheckpointError: the pickle carries code or objects (refused), or the file is truncated or corrupt (the
            message names the newest intact checkpoint in the same folder).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as error:
        carried = carried_code(str(error))
        if carried is not None:
            raise CheckpointError(
                f"refused to load checkpoint {str(path)!r}: its pickle {carried}: it carries code or objects, and "
                "relax_pl loads only tensors and plain data (torch.load(weights_only=True)), so a checkpoint "
                "someone shared cannot run code on this machine. Do not load it with weights_only=False: that "
                "would run what it carries. relax_pl's own checkpoints never hold code."
            ) from None
        raise CheckpointError(_unreadable(path, error)) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(_unreadable(path, error)) from error


def carried_code(message: str) -> str | None:
    """What torch's weights-only unpickler refused (``calls posix.system``, or ``uses the opcode STACK_GLOBAL``, which
    imports by name), from its error message; None when it refused nothing (a damaged file)."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"calls {found[1]}"
    operand = re.search(r"Unsupported operand (\d+)", message)
    if operand:
        opcode = pickletools.code2op.get(chr(int(operand[1])))
        return f"uses the opcode {opcode.name if opcode else operand[1]}, which torch.load(weights_only=True) refuses"
    return None


def _unreadable(path: Path, error: BaseException) -> str:
    reason = str(error).split(". This is an internal miniz error")[0] or type(error).__name__
    intact = newest_intact_checkpoint(path.parent, exclude=path)
    if intact is None:
        advice = f"no other checkpoint in {str(path.parent)!r} loads: start again without --ckpt_path"
    else:
        advice = (
            f"the newest intact checkpoint there is {str(intact)!r}: resume with --ckpt_path {intact}"
        )
    return f"checkpoint {str(path)!r} is truncated or corrupt ({type(error).__name__}: {reason}); {advice}"


def newest_intact_checkpoint(folder: Path, exclude: Path | None = None) -> Path | None:
    """The most recently written ``*.ckpt`` file in ``folder`` that loads (``exclude`` left out), or ``None``.
    Memory-mapped: only the file's index and pickle are read, not its tensors."""
    candidates = [p for p in folder.glob("*.ckpt") if p.is_file() and p != exclude]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            checkpoint = torch.load(candidate, map_location="cpu", mmap=True, weights_only=True)
        except Exception:
            continue
        if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
            return candidate
    return None


# ------------------------------------------------------------------------------------------ sharded checkpoints
# A sharded (torch.distributed.checkpoint) folder keeps its index in a plain pickle, ``.metadata``, which torch
# reads with pickle.load, and its non-tensor entries (optimizer hyperparameters) as torch.save bytes, which torch
# reads with weights_only=False. Both are read here the safe way: the index through an allowlist of DCP's own
# data classes, the entries with weights_only=True.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_PLAIN_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
}


def allowed_index_global(module: str, name: str) -> bool:
    """Whether a sharded checkpoint's index may name ``module.name``: DCP's data classes, torch sizes, dtypes,
    layouts and memory formats, paths and plain containers; nothing that runs code."""
    if module in _DCP_MODULES:
        return not name.startswith("__") and isinstance(getattr(__import__(module, fromlist=[name]), name, None), type)
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
        return True
    return (module, name) in _PLAIN_GLOBALS


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not allowed_index_global(module, name):
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def sharded_reader(folder: str | Path):
    """A ``FileSystemReader`` for ``folder`` whose index is unpickled through :func:`allowed_index_global`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                try:
                    metadata = _IndexUnpickler(stream).load()
                except pickle.UnpicklingError as error:
                    raise CheckpointError(
                        f"refused to load sharded checkpoint {str(path)!r}: its index calls {error}, and relax_pl "
                        "loads only DCP's own index classes, tensors and plain data, so that a checkpoint someone "
                        "shared cannot run code on this machine"
                    ) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(folder))


def weights_only_planner():
    """DCP's default load planner, reading non-tensor entries with ``weights_only=True``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: IO[bytes]) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyLoadPlanner()


def load_sharded(state: dict[str, Any], folder: str | Path) -> None:
    """``torch.distributed.checkpoint.load`` into ``state`` (in place), the safe way."""
    from torch.distributed.checkpoint import load

    reader = sharded_reader(folder)
    reader.read_metadata()  # refused here with a plain message: inside load(), torch wraps it in rank reports
    load(state, storage_reader=reader, planner=weights_only_planner())


def load_sharded_keys(keys: set[str], folder: str | Path) -> dict[str, Any]:
    """The entries ``keys`` of a sharded checkpoint, whole, in this one process (no process group needed)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    reader = sharded_reader(folder)
    reader.read_metadata()  # as in load_sharded
    return _load_state_dict_from_keys(keys, checkpoint_id=str(folder), storage_reader=reader)


@contextmanager
def safe_sharded_loading() -> Iterator[None]:
    """Lightning's ``ModelParallelStrategy`` loads sharded checkpoints with torch's defaults (the pickled
    index, weights_only=False entries): within this block it uses :func:`load_sharded` instead."""
    import lightning.fabric.strategies.model_parallel as model_parallel

    original = model_parallel._distributed_checkpoint_load
    model_parallel._distributed_checkpoint_load = load_sharded
    try:
        yield
    finally:
        model_parallel._distributed_checkpoint_load = original


def write_failure(error: BaseException, folder: Path) -> OSError | None:
    """The OS error behind a failed checkpoint write, or None for an error that is not the file system's.

    torch's zip writer does not raise ``OSError(ENOSPC)`` on a full disk: it raises ``RuntimeError("[enforce fail at
    inline_container.cc:...] unexpected pos ...")`` (or ``... file write failed``); a full disk is then told by the
    folder's free space, read before the partial file is removed."""
    if isinstance(error, OSError):
        return error
    if not (isinstance(error, RuntimeError) and "inline_container" in str(error)):
        return None
    space = os.statvfs(folder)
    if space.f_bavail * space.f_frsize < DISK_FULL_BELOW_BYTES:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.EIO, f"torch's writer: {str(error).splitlines()[0]}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, atomic on write and safe on read (see the module docstring).

    Remote paths (s3://...) fall back to Lightning's writer; they are read with ``weights_only=True`` too."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        protocol = get_filesystem(path).protocol
        if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        try:
            with open(tmp, "wb") as f:
                self.write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as error:
            failure = write_failure(error, path.parent)
            tmp.unlink(missing_ok=True)
            if failure is None:
                raise
            previous = f"the previous {path.name} is intact" if path.exists() else f"there was no {path.name} yet"
            cause = "the disk is full" if failure.errno == errno.ENOSPC else "the write failed"
            raise CheckpointWriteError(
                failure.errno,
                f"could not write checkpoint {str(path)!r}: {cause} ({failure.strerror or failure}); {previous} and "
                f"the partial file was removed. Fix the cause (free disk space) and resume with --ckpt_path last",
            ) from error
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        for stale in stale_temporaries(path):
            stale.unlink(missing_ok=True)

    def write(self, checkpoint: dict[str, Any], file: IO[bytes]) -> None:
        """The bytes of one checkpoint into an open file (the fault tests wrap this to fail or die mid-write)."""
        torch.save(checkpoint, file)

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(
                f"refusing to load {str(path)!r} with weights_only=False: relax_pl loads checkpoints as tensors and "
                "plain data only"
            )
        protocol = get_filesystem(path).protocol
        if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(path, map_location=map_location or "cpu")
