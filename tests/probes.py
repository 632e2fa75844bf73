"""Helpers for the tests: classes that test recipes name (importable with tests/ on PYTHONPATH) and a reader of
what a run logged to TensorBoard.

``ShardProbe`` writes what each rank saw to ``<out>/rank<k>.json``: the rank-local and global shapes of the
sharded parameters, and per step the responses' lengths, the prompt row of every response and whether the
advantages are the per-group ones of that rank's own rewards.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.tensor import DTensor

from relax_pl.extension import RLVRCallback
from relax_pl.objectives import group_advantages
from relax_pl.rewards import VerifiableReward


class LengthParityReward(VerifiableReward):
    """1 for a response of an even number of characters: rewards that differ within a group, so advantages do."""

    def score(self, completion: str, sample: dict) -> dict[str, float]:
        return {"overall": float(len(completion) % 2 == 0)}


def shard_shapes(model: torch.nn.Module) -> dict[str, dict[str, list[int]]]:
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            out[name] = {"local": list(p.to_local().shape), "global": list(p.shape)}
        else:
            out[name] = {"plain": list(p.shape)}
    return out


class ShardProbe(RLVRCallback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.record: dict = {"steps": []}

    def on_fit_start(self, trainer, module) -> None:
        self.record["rank"] = trainer.global_rank
        self.record["world_size"] = trainer.world_size
        self.record["policy"] = shard_shapes(module.policy)
        reference = module._reference[0]
        self.record["reference"] = shard_shapes(reference) if reference is not None else None

    def on_rollout_end(self, trainer, module, rollout) -> None:
        size = rollout.group_size
        rows = [sample["row"] for sample in rollout.samples]
        expected = group_advantages(rollout.rewards, size, scale=module.objective.scale_advantages)
        self.record["steps"].append(
            {
                "width": rollout.response_mask.shape[1],
                "lengths": rollout.response_mask.sum(-1).tolist(),
                "rows": rows,
                "group_size": size,
                "rewards": rollout.rewards.tolist(),
                "advantages_match": bool(torch.equal(expected, rollout.advantages)),
            }
        )

    def on_fit_end(self, trainer, module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def tensorboard_logs(folder: Path) -> tuple[dict[str, list[float]], set[str]]:
    """The scalars (tag -> values, in order) and the image tags of the TensorBoard event files under ``folder``."""
    scalars: dict[str, list[float]] = {}
    images: set[str] = set()
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
        images.update(acc.Tags()["images"])
    return scalars, images


def tiny_recipe(
    folder: Path,
    pretrained: Path,
    callbacks: list[dict] = (),
    seed: int = 7,
    checkpoint_every: int = 1,
    logger: bool = True,
    **sections: dict,
) -> Path:
    """Write ``folder/recipe.yaml`` and return its path: a CPU fit of ``pretrained`` for 2 optimiser steps on
    single-digit additions (2 prompts x 4 responses of at most 12 tokens a step), a checkpoint every
    ``checkpoint_every`` steps then ``callbacks``, TensorBoard under ``folder/tb`` unless ``logger`` is False, no
    validation. Each of ``sections`` (``trainer=``, ``model=``, ``data=``) updates that section key by key."""
    tensorboard = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(folder), "name": "tb"},
    }
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "dirpath": str(folder / "checkpoints"),
            "every_n_train_steps": checkpoint_every,
            "save_last": True,
            "save_top_k": -1,
        },
    }
    recipe = {
        "seed_everything": seed,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "default_root_dir": str(folder),
            "logger": tensorboard if logger else False,
            "callbacks": [checkpoint, *callbacks],
        },
        "model": {
            "pretrained": str(pretrained),
            "sampling": {"num_responses": 4, "max_new_tokens": 12, "temperature": 1.0},
            "update": {"micro_batch_size": 4},
            "optimizer": {"lr": 1e-3},
        },
        "data": {
            "train_source": "builtin:arithmetic",
            "task_options": {"digits": 1, "operations": "+", "num_samples": 12},
            "batch_size": 2,
        },
    }
    for section, values in sections.items():
        recipe[section].update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
