"""Prompt data for RL steps: :class:`PromptDataModule`, the sources it reads and the built-in tasks."""

from relax_pl.data.datamodule import PromptDataModule, PromptDataset, ResumableSampler, build_messages
from relax_pl.data.sources import DataError, Rows, load_rows
from relax_pl.data.tasks import TASKS, arithmetic, geometry

__all__ = [
    "TASKS",
    "DataError",
    "PromptDataModule",
    "PromptDataset",
    "ResumableSampler",
    "Rows",
    "arithmetic",
    "geometry",
    "build_messages",
    "load_rows",
]
