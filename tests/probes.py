"""Helpers for the tests: classes that test recipes name (importable with tests/ on PYTHONPATH), readers of what a
run wrote (TensorBoard scalars, a checkpoint's policy weights) and fault injectors.

``ShardProbe`` writes what each rank saw to ``<out>/rank<k>.json``: the rank-local and global shapes of the
sharded parameters, which modules FSDP wraps, and per step the responses' lengths, the prompt row of every
response and whether the advantages are the per-group ones of that rank's own rewards. ``KillAt`` SIGKILLs a run
inside a phase of a step; ``NonFiniteLossAt`` makes one step's loss NaN. The rewards are in probe_rewards.py.
"""

from __future__ import annotations

import io as io_module
import json
import os
import signal
from pathlib import Path

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.tensor import DTensor

from relax_pl.checkpointing import load_checkpoint_file
from relax_pl.extension import LossTerms, RLVRCallback
from relax_pl.models import load_causal_lm
from relax_pl.objectives import group_advantages
from relax_pl.rollout import HFGenerate

# the rewards live in a light module of their own (scoring workers import it); recipes may name them here
from probe_rewards import (  # noqa: F401
    BrokenReward,
    EvenRowsParityReward,
    FlakyReward,
    LengthParityReward,
    ParityAccuracyReward,
)


def fsdp_units(model: torch.nn.Module) -> list[str]:
    """The names of the modules ``fully_shard`` was applied to ("" is the root)."""
    from torch.distributed.fsdp import FSDPModule

    return [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]


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
        self.record["fsdp_units"] = {
            "policy": fsdp_units(module.policy), "reference": fsdp_units(reference) if reference is not None else None
        }

    def on_rollout_end(self, trainer, module, rollout) -> None:
        size = rollout.group_size
        rows = [sample["row"] for sample in rollout.samples]
        expected = group_advantages(rollout.rewards, size, scale=module.objective.advantages_scaled)
        self.record["steps"].append(
            {
                "width": rollout.response_mask.shape[1],
                "lengths": rollout.response_mask.sum(-1).tolist(),
                "rows": rows,
                "group_size": size,
                "rewards": rollout.rewards.tolist(),
                "advantages_match": bool(torch.equal(expected, rollout.advantages)),
                "advantages": rollout.advantages.tolist(),
            }
        )

    def on_fit_end(self, trainer, module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


class LatentStateProbe(RLVRCallback):
    """Per rank and step: EffectiveRankShaping's moving averages and what LatentExploration measured (valid rows,
    the largest gap between a DSD measured ahead and in the update), written at the end of the fit."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        from relax_pl.callbacks import EffectiveRankShaping, LatentExploration

        [shaping] = [cb for cb in trainer.callbacks if isinstance(cb, EffectiveRankShaping)]
        [explore] = [cb for cb in trainer.callbacks if isinstance(cb, LatentExploration)]
        self.steps.append({"er_reference": shaping.reference.tolist(), "valid": explore._step.valid,
                           "lookahead_gap": explore._step.lookahead_gap, "forward_ahead": explore._step.forward_ahead})

    def on_fit_end(self, trainer, module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"latent{trainer.global_rank}.json").write_text(json.dumps(self.steps))


# ------------------------------------------------------------------------------------------------ faults
class KillAt(RLVRCallback):
    """SIGKILLs its own process in the middle of one phase of training batch ``step`` (0-based) and writes
    ``marker`` (JSON: what it interrupted) just before, so a test can tell the kill landed where it meant:

    - ``generation``: at the third forward of the policy during that batch's ``generate`` (tokens decoded);
    - ``update``: before the second optimiser step of that batch (the first one applied, the rest not);
    - ``checkpoint_write``: halfway through the bytes of the first checkpoint file written after that batch
      (flushed and fsynced, so the partial temporary file is on disk);
    - ``last_checkpoint_write``: the same, in the first ``last.ckpt`` written after that batch;
    - ``after_last_checkpoint``: right after the first ``last.ckpt`` written after that batch is renamed into place;
    - ``validation``: at the start of the second validation batch after that batch.
    """

    PHASES = (
        "generation", "update", "checkpoint_write", "last_checkpoint_write", "after_last_checkpoint", "validation"
    )

    def __init__(self, phase: str, step: int, marker: str) -> None:
        if phase not in self.PHASES:
            raise ValueError(f"phase must be one of {self.PHASES}, got {phase!r}")
        self.phase, self.step, self.marker = phase, step, Path(marker)
        self.batch = -1
        self.optimizer_steps = 0

    def die(self, trainer, **details) -> None:
        record = {"phase": self.phase, "batch": self.batch, "global_step": trainer.global_step, **details}
        self.marker.write_text(json.dumps(record))
        os.kill(os.getpid(), signal.SIGKILL)

    def setup(self, trainer, module, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if self.phase in ("checkpoint_write", "last_checkpoint_write"):
            write = io.write

            def write_half_then_die(checkpoint, file) -> None:
                if self.batch < self.step or self.phase == "last_checkpoint_write" and ".last.ckpt." not in file.name:
                    return write(checkpoint, file)
                buffer = io_module.BytesIO()
                torch.save(checkpoint, buffer)
                data = buffer.getvalue()
                file.write(data[: len(data) // 2])
                file.flush()
                os.fsync(file.fileno())
                self.die(trainer, file=file.name, written=len(data) // 2, size=len(data))

            io.write = write_half_then_die
        if self.phase == "after_last_checkpoint":
            save = io.save_checkpoint

            def save_then_die(checkpoint, path, storage_options=None) -> None:
                save(checkpoint, path, storage_options)
                if self.batch >= self.step and Path(path).name == "last.ckpt":
                    self.die(trainer, file=str(path))

            io.save_checkpoint = save_then_die

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        self.batch, self.optimizer_steps = batch_idx, 0
        if self.phase == "generation" and batch_idx == self.step:
            generate, forwards = module.generate, []

            def count_forwards(*_args) -> None:
                forwards.append(1)
                if len(forwards) == 3:
                    self.die(trainer, forwards=3)

            def generate_then_stop(*args, **kwargs):
                handle = module.policy.register_forward_hook(count_forwards)
                try:
                    return generate(*args, **kwargs)
                finally:
                    handle.remove()

            module.generate = generate_then_stop

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.optimizer_steps += 1
        if self.phase == "update" and self.batch == self.step and self.optimizer_steps == 2:
            self.die(trainer, optimizer_steps_applied=1)

    def on_validation_batch_start(self, trainer, module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.phase == "validation" and self.batch >= self.step and batch_idx == 1:
            self.die(trainer, validation_batch=1)


class NonFiniteLossAt(RLVRCallback):
    """Adds a NaN loss term during training batch ``step`` and records whether the policy's weights came out of
    that batch unchanged (``unchanged``) and that they changed in the other batches (``changed``)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.batch = -1
        self.unchanged: bool | None = None
        self.changed: list[bool] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        self.batch = batch_idx
        self.before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}

    def policy_loss_terms(self, trainer, module, forward):
        if self.batch != self.step:
            return None
        return LossTerms(losses={"probe/nan": forward.logp.sum() * float("nan")})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        same = all(torch.equal(p, self.before[n]) for n, p in module.policy.named_parameters())
        if batch_idx == self.step:
            self.unchanged = same
        else:
            self.changed.append(not same)


class OptimizerStepSpy(RLVRCallback):
    """Records, per training batch, each real step of the torch optimiser (its own ``step``, under Lightning's
    wrappers) and whether it changed the policy's weights: ``steps[batch] == [True, True, ...]``."""

    def __init__(self) -> None:
        self.steps: list[list[bool]] = []

    def on_train_start(self, trainer, module) -> None:
        optimizer = module.optimizers().optimizer
        step, params = optimizer.step, [p for p in module.policy.parameters() if p.requires_grad]

        def recorded_step(*args, **kwargs):
            before = [p.detach().clone() for p in params]
            result = step(*args, **kwargs)
            self.steps[-1].append(any(not torch.equal(b, p) for b, p in zip(before, params)))
            return result

        optimizer.step = recorded_step

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        self.steps.append([])


# ------------------------------------------------------------------------------------------------ weights
def policy_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The policy tensors of a checkpoint file, keyed as in the policy (read with weights_only=True)."""
    state = load_checkpoint_file(checkpoint)["state_dict"]
    return {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}


def moved_weights(weights: dict[str, torch.Tensor], pretrained: Path) -> list[str]:
    """The names of ``weights`` that differ from the starting model's: empty when training changed nothing."""
    start = load_causal_lm(str(pretrained)).state_dict()
    return [name for name, tensor in weights.items() if not torch.equal(tensor, start[name])]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], rtol=0, atol=0, msg=name)


def tensorboard_run(folder: Path) -> tuple[list[str], dict[str, list[tuple[int, float]]]]:
    """The run folders (logger versions) under ``folder`` and, for the only one, each tag's ``(step, value)``
    points as TensorBoard shows them (events files merged, what a ``purge_step`` hid left out)."""
    runs = sorted({str(p.parent.relative_to(folder)) for p in folder.rglob("events.out.tfevents.*")})
    if len(runs) != 1:
        return runs, {}
    acc = EventAccumulator(str(folder / runs[0]), size_guidance={"scalars": 0})
    acc.Reload()
    return runs, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


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


def hf_generate(module) -> HFGenerate:
    """An HFGenerate engine set up on ``module``'s run: the policy's own responses, beside the module's engine."""
    engine = HFGenerate()
    engine.setup(module.rollout_context())
    return engine


# ------------------------------------------------------------------------------------------------ contracts
class LoggingEngine(HFGenerate):
    """HFGenerate that logs, as the README tells an engine to, the prompts of each training rollout: counted in
    ``generate``, returned from ``verify_rollout`` at the end of the training step."""

    def generate(self, prompts, samples, sampling, greedy=False):
        self.prompts = len(prompts)  # the step's rollout is the last generate before verify_rollout
        return super().generate(prompts, samples, sampling, greedy)

    def verify_rollout(self, logp_gap):
        return {**super().verify_rollout(logp_gap), "rollout/prompts": float(self.prompts)}


class ContractProbe(RLVRCallback):
    """Returns, on every micro-batch, a loss term that is its share of 1 over the mini-batch and a metric that is the
    micro-batch's row count; records what it saw of ``forward.rows``, ``forward.group_index`` and the rollout's reward
    component names."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.components: list[list[str]] = []

    def on_rollout_end(self, trainer, module, rollout) -> None:
        self.components.append(sorted(rollout.reward_components))
        self.rollout = rollout

    def policy_loss_terms(self, trainer, module, forward):
        rows = forward.rows
        self.seen.append({"rows": rows.tolist(), "groups": forward.group_index.tolist(),
                          "expected_groups": self.rollout.group_index[rows].tolist()})
        share = forward.mean_over_responses(torch.ones(len(rows), device=rows.device))
        return LossTerms(losses={"probe/share": share}, metrics={"probe/micro_rows": float(len(rows))})
