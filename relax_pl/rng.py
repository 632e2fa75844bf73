"""The random generators a run draws its samples from, kept in checkpoints so that a resumed run draws the same
responses, and set aside around validation so that training draws the same numbers whether a validation ran or not.

Checkpoints hold them in types ``torch.load(weights_only=True)`` accepts (:func:`numpy_state_to_tensors`).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor


def capture() -> dict[str, Any]:
    """Torch's (CPU and every CUDA device's), NumPy's and Python's global generator states."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": numpy_state_to_tensors(np.random.get_state()),
        "python": random.getstate(),
    }


def restore(states: dict[str, Any]) -> None:
    """Set the global generators to what :func:`capture` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(numpy_state_from_tensors(states["numpy"]))
    random.setstate(states["python"])


def gather_per_rank(states: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's states (a collective), or None in a single process: rank 0 writes the checkpoint file, and each
    rank resumes its own generators from it."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return None
    per_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(per_rank, states)
    return per_rank


def torch_states() -> tuple[Tensor, list[Tensor]]:
    """Torch's CPU and CUDA generator states (what sampling draws from)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def restore_torch_states(states: tuple[Tensor, list[Tensor]]) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    """NumPy's RNG state in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def numpy_state_from_tensors(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]


def checkpoint_entries() -> dict[str, Any]:
    """What a checkpoint keeps of the generators: this rank's (``rng_states``) and, over several ranks, every rank's
    (``rng_states_per_rank``; a collective: every rank must call it)."""
    entries = {"rng_states": capture()}
    per_rank = gather_per_rank(entries["rng_states"])
    if per_rank is not None:
        entries["rng_states_per_rank"] = per_rank
    return entries


def saved_states(checkpoint: dict[str, Any], world_size: int, rank: int) -> dict[str, Any] | None:
    """This rank's generator states in a checkpoint (its own when the checkpoint has every rank's and the run has as
    many ranks), or None when it holds none."""
    states = checkpoint.get("rng_states")
    per_rank = checkpoint.get("rng_states_per_rank")
    if per_rank is not None and len(per_rank) == world_size:
        states = per_rank[rank]
    return states or None
