"""``python -m relax_pl <fit|validate|test> --config recipe.yaml``, built on LightningCLI.

The recipe's ``model:`` section is RLVRModule's arguments and ``data:`` PromptDataModule's; jsonargparse
checks every key and type before anything is instantiated, so a typo fails before a model is loaded.
"""

from __future__ import annotations

import re
import time
import warnings
from argparse import RawDescriptionHelpFormatter
from contextlib import suppress
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from relax_pl.checkpointing import AtomicCheckpointIO, load_checkpoint_file, newest_intact_checkpoint
from relax_pl.config import MOVED_OBJECTIVE_KEYS, RENAMED_POLICY_LOSSES
from relax_pl.console import RunSummary, StepProgressBar, quiet_libraries
from relax_pl.data import PromptDataModule
from relax_pl.errors import debugging, did_you_mean, exit_with, parser_keys
from relax_pl.extension import import_modules
from relax_pl.module import RLVRModule


class LoggerRun(L.Callback):
    """Keeps in each checkpoint which run folder (logger version) the run writes and the step it logged last,
    so that ``--ckpt_path`` continues the same TensorBoard curves instead of opening a new version.

    A checkpoint written at a batch end holds that batch, so the batch's metrics reach the loggers (flushed) before
    the checkpoint is written: Lightning would log them only after every ``on_train_batch_end`` hook, and a run
    killed in between would resume after that batch with its points lost for good."""

    def __init__(self) -> None:
        self._batch_metrics: str | None = None  # "unlogged" from the batch end until they are logged, then "logged"

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        connector = trainer._logger_connector
        if stage != "fit" or getattr(connector, "_log_train_step", None) is not None:
            return
        connector._log_train_step = connector.update_train_step_metrics

        def log_train_step_once() -> None:
            if self._batch_metrics != "logged":  # not already logged ahead of a checkpoint
                connector._log_train_step()
            self._batch_metrics = None

        connector.update_train_step_metrics = log_train_step_once

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        connector = trainer._logger_connector
        if getattr(connector, "_log_train_step", None) is not None:
            connector.update_train_step_metrics = connector._log_train_step
            connector._log_train_step = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self._batch_metrics = "unlogged"  # runs before ModelCheckpoint's (Lightning orders checkpoint callbacks last)

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._batch_metrics == "unlogged" and getattr(trainer._logger_connector, "_log_train_step", None):
            trainer._logger_connector._log_train_step()  # then each logger's save(): TensorBoard flushes its file
            self._batch_metrics = "logged"
        checkpoint["logger_run"] = {
            "versions": [str(logger.version) for logger in trainer.loggers],
            # the step Lightning logs the current batch at (the resumed run logs from the next one)
            "step": trainer.fit_loop.epoch_loop._batches_that_stepped,
        }


def resolve_checkpoint(ckpt_path: str | Path | None, trainer: L.Trainer) -> Path | None:
    """The checkpoint ``--ckpt_path`` names; ``last`` as Lightning resolves it (the newest ``last*.ckpt`` of the
    ModelCheckpoint folders). ``None`` when there is none."""
    if ckpt_path in (None, "best", "hpc", "registry"):
        return None
    if ckpt_path != "last":
        return Path(ckpt_path)
    candidates = [
        path
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.dirpath
        for path in Path(callback.dirpath).glob(f"{callback.CHECKPOINT_NAME_LAST}*{callback.FILE_EXTENSION}")
    ]
    return max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None


def resume_path(ckpt_path: str | Path | None, trainer: L.Trainer) -> str | Path | None:
    """``--ckpt_path last`` before the first ``last.ckpt`` was complete (a run killed between writing
    ``epoch=0-step=4.ckpt`` and its ``last.ckpt``): the newest intact checkpoint of the ModelCheckpoint folders, said
    in a warning, instead of Lightning's start from scratch. Any other value as it is."""
    if ckpt_path != "last" or resolve_checkpoint(ckpt_path, trainer) is not None:
        return ckpt_path
    folders = {
        Path(callback.dirpath)
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and Path(callback.dirpath).is_dir()
    }
    intact = [path for path in map(newest_intact_checkpoint, folders) if path is not None]
    if not intact:
        return ckpt_path
    newest = max(intact, key=lambda path: path.stat().st_mtime)
    rank_zero_warn(
        f"--ckpt_path last: {str(newest.parent)!r} holds no last.ckpt (the run stopped before writing one); resuming "
        f"from the newest intact checkpoint there, {newest.name}"
    )
    return str(newest)


def saved_logger_run(path: Path) -> dict[str, Any] | None:
    """What :class:`LoggerRun` kept in a checkpoint file or sharded folder; ``None`` if it cannot be read (the
    resume itself then fails with the reason)."""
    try:
        if path.is_dir():  # Lightning keeps a sharded checkpoint's non-tensor entries in meta.pt
            return torch.load(path / "meta.pt", map_location="cpu", weights_only=True).get("logger_run")
        return load_checkpoint_file(path, mmap=True).get("logger_run")
    except Exception:
        return None


def continue_logging(trainer: L.Trainer, ckpt_path: str | Path | None) -> None:
    """Point the run's loggers at the folders the checkpoint's run wrote, before anything is logged; TensorBoard
    also hides what that run logged after the checkpoint (SummaryWriter's ``purge_step``), which the resumed run
    logs again. A logger given an explicit version keeps it."""
    path = resolve_checkpoint(ckpt_path, trainer)
    saved = saved_logger_run(path) if path is not None and path.exists() else None
    if not saved or len(saved["versions"]) != len(trainer.loggers):
        return
    for logger, version in zip(trainer.loggers, saved["versions"]):
        if not isinstance(logger, (TensorBoardLogger, CSVLogger)) or logger._version is not None:
            continue
        logger._version = int(version) if version.isdigit() else version
        if isinstance(logger, TensorBoardLogger):
            if logger._kwargs.get("purge_step") is None:
                logger._kwargs["purge_step"] = saved["step"] + 1  # the CLI passes SummaryWriter's None default
            wait_past_event_files(Path(logger.log_dir))


def wait_past_event_files(log_dir: Path) -> None:
    """Sleep into the second after the newest events file in ``log_dir`` was named. TensorBoard reads a folder's
    events files in name order, ``events.out.tfevents.<second>.<host>.<pid>``: a run resumed within the second its
    interrupted run opened its file would otherwise be ordered by process id, often before it, and its
    ``purge_step`` would hide nothing."""
    seconds = [int(m.group(1)) for p in log_dir.glob("events.out.tfevents.*")
               if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", p.name))]
    if seconds and 0 < (wait := max(seconds) + 1 - time.time()) <= 1:  # not for a file from the future
        time.sleep(wait)


class RecipeParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line that also says where a key of an older recipe went and which
    key a mistyped one may be (the full usage with ``RELAX_PL_DEBUG=1``)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        moved = moved_key_hint(message)
        message += moved
        if self.exit_on_error and not debugging():  # one line, not the usage of every option first
            parser = getattr(ex, "subcommand_parser", None) or self
            hint = "" if moved else did_you_mean(message, parser_keys(parser))
            exit_with(parser.prog.replace(" [options]", ""), message + hint, 2, debug_shows="the full usage")
        super().error(message, ex)


def moved_key_hint(message: str) -> str:
    """The new place of every moved recipe key a parser error names (:data:`relax_pl.config.MOVED_OBJECTIVE_KEYS`),
    or of a policy loss named the old way (``policy_loss: kl_cov``); empty when it names none."""
    hints = [
        f"model.objective.{key} moved to {MOVED_OBJECTIVE_KEYS[key]}"
        for key in dict.fromkeys(re.findall(r"objective\.(\w+)", message))
        if key in MOVED_OBJECTIVE_KEYS
    ]
    if "objective.policy_loss" in message:
        hints += [
            f"model.objective.policy_loss takes a class now: {old} is {new} (class_path and its init_args)"
            for old, new in RENAMED_POLICY_LOSSES.items()
            if re.search(rf"\b{old}\b", message.split("objective.policy_loss", 1)[1])
        ]
    return "".join(f"\n  {hint}" for hint in hints)


# python -m relax_pl's commands beside LightningCLI's, which __main__.py dispatches; listed by --help
OTHER_COMMANDS = {
    "evaluate": "greedy mean@1, mean@k and pass@k of checkpoints side by side, with intervals (evaluate --help)",
    "export": "write a checkpoint as Hugging Face folders, in bfloat16 unless --dtype says otherwise (export --help)",
}


def usage_description() -> str:
    commands = "".join(f"\n  {name:<9} {what}" for name, what in OTHER_COMMANDS.items())
    return (
        "Train and evaluate with a recipe: python -m relax_pl <fit|validate|test> --config recipe.yaml. "
        f"Also:{commands}"
    )


class RelaxCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's, less ``predict``: ``python -m relax_pl evaluate`` is relax_pl's prediction command (it runs
        Lightning's predict with options of its own: samples per prompt, several checkpoints)."""
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict")
        return commands

    def _parse_ckpt_path(self) -> None:
        """The recipe and the command line decide the run, never the checkpoint.

        Lightning's CLI copies a ``--ckpt_path`` file's ``hyper_parameters`` into the model's config ahead of the
        recipe, so a shared checkpoint of plain data could swap ``pretrained`` for a folder with custom code and set
        ``trust_remote_code``. relax_pl never saves the module's hyper-parameters and never applies them: the file is
        read here (weights_only, memory-mapped, so a refused or corrupt file fails with relax_pl's message naming
        it) and any hyper-parameter that differs from the recipe is reported, then ignored."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        saved = load_checkpoint_file(ckpt_path, mmap=True).get("hyper_parameters") or {}
        differing = differing_hyperparameters(saved, self.config[subcommand].get("model"))
        if differing:
            rank_zero_warn(
                f"checkpoint {ckpt_path!r} carries model hyper-parameters that differ from the recipe "
                f"({', '.join(f'model.{key}' for key in differing)}); they are ignored: the recipe and the command "
                "line decide the run"
            )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--imports", type=str, nargs="+", default=[],
            help="modules to import before the run, e.g. one that defines a model family adapter (README, 'Write a "
            "model family')",
        )
        # ObjectiveConfig's default loss is an instance, which --print_config and config.yaml cannot write; as a
        # class_path they write it as every other plug-in (a module subclass may have no objective)
        with suppress(KeyError):
            parser.set_defaults({"model.objective.policy_loss": {"class_path": "relax_pl.losses.PPOClip"}})

    def before_instantiate_classes(self) -> None:
        import_modules(self._get(self.config, "imports") or [])

    def instantiate_trainer(self, **kwargs: Any):
        """The model's setup decides the strategy; a recipe that also sets one differently is an error. The atomic,
        weights-only checkpoint IO is added here, not as a parser default: an instance there has no class_path, so
        ``--print_config`` and the saved config.yaml could not be read back as recipes."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        kwargs["plugins"] = with_atomic_checkpoint_io(trainer_config.get("plugins"))
        callbacks = trainer_config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(callback, ProgressBar) for callback in callbacks
        ):
            kwargs["callbacks"] = [*callbacks, StepProgressBar()]
        for key, value in self.model.model_setup.trainer_overrides().items():
            given = trainer_config.get(key)
            if given not in (None, "auto", value) and not (key == "devices" and given == 1):
                raise ValueError(
                    f"trainer.{key}={given!r} conflicts with model.setup ({type(self.model.model_setup).__name__} "
                    f"uses {value!r}); remove trainer.{key} from the recipe: the setup decides it"
                )
            kwargs[key] = value
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        ckpt_path = self.config_init[self.subcommand]["ckpt_path"] = resume_path(
            self._get(self.config, "ckpt_path"), self.trainer
        )
        continue_logging(self.trainer, ckpt_path)

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``; a resumed run writes into the checkpoint folder it resumes from, so ModelCheckpoint's
        warning that the folder is not empty is left out then (a new run still gets it)."""
        with warnings.catch_warnings():
            if kwargs.get("ckpt_path"):
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            self.trainer.fit(**kwargs)


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """The recipe's ``trainer.plugins`` plus :class:`AtomicCheckpointIO`, unless the recipe names a checkpoint IO of
    its own (a remote store's)."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def differing_hyperparameters(saved: dict[str, Any], recipe_model: Any) -> list[str]:
    """The keys of a checkpoint's ``hyper_parameters`` whose values are not the recipe's ``model:`` values (a key the
    recipe does not have counts as differing)."""
    recipe = recipe_model.as_dict() if hasattr(recipe_model, "as_dict") else dict(recipe_model or {})
    recipe = recipe.get("init_args", recipe) if "class_path" in recipe else recipe
    keys = [key for key in saved if key not in ("_instantiator", "_class_path")]
    return sorted(key for key in keys if key not in recipe or saved[key] != recipe[key])


def main(
    args: list[str] | None = None, run: bool = True, model_class: type[RLVRModule] = RLVRModule
) -> RelaxCLI:
    """Parse ``args`` (default: the command line) and run the subcommand; with ``run=False`` only build
    the trainer, model and datamodule (for scripts that add callbacks first; ``args`` then has no
    subcommand). ``model_class`` runs a subclass of RLVRModule with the same recipes."""
    quiet_libraries()
    return RelaxCLI(
        model_class,
        PromptDataModule,
        parser_class=RecipeParser,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "prog": "python -m relax_pl",
            "description": usage_description(),
            "formatter_class": RawDescriptionHelpFormatter,
        },
        trainer_defaults={"callbacks": [LoggerRun(), RunSummary()], "enable_model_summary": False},
    )
