"""What a run prints: what runs where, one progress bar of optimiser steps, each validation's results, and where the
logs and checkpoints are; the libraries' notices that say nothing about this run are left out.

Left out (:func:`quiet_libraries`): Lightning's GPU/TPU availability lines, its litlogger tip and its "limit_*_batches
was configured" notes (:class:`RunSummary` says what runs where instead), its warning that ModelCheckpoint saves
the state after a manual optimiser step (relax_pl checkpoints at the end of a step, so the state after it is the one
a resume needs: README, "Checkpoints"), torch's deprecation of ``LeafSpec`` inside Lightning, and transformers'
"Loading weights" and GGUF conversion bars. Downloads keep their bars; every other warning stays.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

# Lightning's rank-zero notices that describe the machine or advertise, not the run
_LIGHTNING_NOTICES = re.compile(
    r"^(GPU available|TPU available|HPU available|💡 Tip|`Trainer\(limit_\w+=.*\)` was configured"
    r"|`Trainer.fit` stopped: `max_steps=\d+` reached)"
)
_LIBRARY_WARNINGS = (
    r"Using ModelCheckpoint with manual optimization",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
_QUIET_BARS = ("Loading weights", "Converting and de-quantizing GGUF tensors...")


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _LIGHTNING_NOTICES.match(str(record.getMessage()))


def quiet_libraries() -> None:
    """Leave out the library output listed in the module docstring (idempotent)."""
    from transformers.utils import logging as hf_logging

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices())
    for message in _LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)

    def hook(factory, args, kwargs):
        quiet = kwargs.get("desc") in _QUIET_BARS
        return hf_logging.EmptyTqdm(*args, **kwargs) if quiet else factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(hook)


def parameter_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


class RunSummary(L.Callback):
    """Says, once, what runs where (model, parameters, device, setup, steps) and where the logs and checkpoints go;
    at the end of a fit, the step reached and the last checkpoint."""

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        steps = trainer.max_steps
        self._describe(trainer, module, f"{steps} optimiser step{'s' * (steps != 1)}" if steps > 0 else "")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                print(f"logs: {logger.log_dir or logger.save_dir}", flush=True)
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                    print(f"checkpoints: {callback.dirpath} (resume: --ckpt_path last)", flush=True)

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.state.fn != "fit":
            self._describe(trainer, module, "")

    def on_test_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._describe(trainer, module, "")

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        lasts = [cb.last_model_path for cb in trainer.checkpoint_callbacks if getattr(cb, "last_model_path", "")]
        print(f"done at step {trainer.global_step}" + (f"; last checkpoint: {lasts[0]}" if lasts else ""), flush=True)

    @staticmethod
    def _describe(trainer: L.Trainer, module: L.LightningModule, steps: str) -> None:
        if not trainer.is_global_zero:
            return
        parameters = list(module.parameters())
        total = sum(p.numel() for p in parameters)
        trained = sum(p.numel() for p in parameters if p.requires_grad)
        policy = getattr(module, "policy", None)
        setup = getattr(module, "model_setup", None)
        devices = f"{trainer.num_devices} {trainer.strategy.root_device.type}"
        what = [
            f"{trainer.state.fn.value}: {getattr(module, 'pretrained', type(module).__name__)}",
            f"({type(policy).__name__ if policy is not None else type(module).__name__}, {parameter_count(total)}"
            f" parameters, {parameter_count(trained)} trained)",
            f"on {devices} device(s) x {trainer.num_nodes} node(s)" if trainer.num_nodes > 1 else f"on {devices}",
        ]
        if setup is not None:
            what.append(f"with {type(setup).__name__}")
        print(" ".join(what) + (f"; {steps}" if steps else ""), flush=True)


class StepProgressBar(TQDMProgressBar):
    """One bar of optimiser steps: ``global_step`` of ``trainer.max_steps`` (an RL step may make several), with the
    progress-bar metrics (``reward``, ``accuracy``, ``val/accuracy``), seconds per step and the time left. A resumed
    run's bar starts at the checkpoint's step. Each validation during a fit prints one line of its results."""

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, int | str | float]:
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)  # the logger's version is in the "logs:" line
        return metrics

    # always seconds per step: tqdm's rate_fmt switches to steps per second when a step takes under a second
    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_inv_fmt}{postfix}]"

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.train_progress_bar = Tqdm(
            desc="step",
            total=trainer.max_steps if trainer.max_steps > 0 else None,
            initial=trainer.global_step,  # a resumed run: the rate and the time left count this run's steps only
            unit="step",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """The bar counts optimiser steps over the whole run, not batches of one epoch."""

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, module))  # refreshes

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Nothing ends with a data epoch here: the bar goes on."""

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_validation_end(trainer, module)
        if trainer.state.fn != "fit" or trainer.sanity_checking or self.is_disabled:
            return
        results = {
            name: float(value)
            for name, value in sorted(trainer.callback_metrics.items())
            if name.startswith("val/") and "/source/" not in name
        }
        if results:
            line = ", ".join(f"{name} {value:.4g}" for name, value in results.items())
            Tqdm.write(f"validation at step {trainer.global_step}: {line}", file=sys.stdout)
