"""``python -m relax_pl <fit|validate|test> --config recipe.yaml``, built on LightningCLI.

The recipe's ``model:`` section is RLVRModule's arguments and ``data:`` PromptDataModule's; jsonargparse
checks every key and type before anything is instantiated, so a typo fails before a model is loaded.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

from relax_pl.checkpointing import AtomicCheckpointIO
from relax_pl.data import PromptDataModule
from relax_pl.module import RLVRModule


class RelaxCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs: Any):
        """The model's setup decides the strategy; a recipe that also sets one differently is an error."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        for key, value in self.model.model_setup.trainer_overrides().items():
            given = trainer_config.get(key)
            if given not in (None, "auto", value) and not (key == "devices" and given == 1):
                raise ValueError(
                    f"trainer.{key}={given!r} conflicts with model.setup ({type(self.model.model_setup).__name__} "
                    f"uses {value!r}); remove trainer.{key} from the recipe: the setup decides it"
                )
            kwargs[key] = value
        return super().instantiate_trainer(**kwargs)


def main(
    args: list[str] | None = None, run: bool = True, model_class: type[RLVRModule] = RLVRModule
) -> RelaxCLI:
    """Parse ``args`` (default: the command line) and run the subcommand; with ``run=False`` only build
    the trainer, model and datamodule (for scripts that add callbacks first; ``args`` then has no
    subcommand). ``model_class`` runs a subclass of RLVRModule with the same recipes."""
    return RelaxCLI(
        model_class,
        PromptDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"plugins": [AtomicCheckpointIO()]},
    )
