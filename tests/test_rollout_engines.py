"""The rollout seam (``model.rollout``): the module talks to its engine only through the seam's hooks."""

from __future__ import annotations

from relax_pl.cli import main
from relax_pl.rollout import HFGenerate

from probes import tiny_recipe


class RecordingEngine(HFGenerate):
    """HFGenerate that counts the module's calls through the seam."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"setup": 0, "generate": 0, "policy_updated": 0}

    def setup(self, module) -> None:
        self.calls["setup"] += 1

    def generate(self, module, prompts, samples, sampling, greedy=False):
        self.calls["generate"] += 1
        return super().generate(module, prompts, samples, sampling, greedy)

    def policy_updated(self, module) -> None:
        self.calls["policy_updated"] += 1


def test_the_module_reaches_its_engine_only_through_the_seam(tmp_path, tiny_model):
    """Two RL steps of two PPO epochs over two mini-batches: 2 rollouts and 8 optimiser steps, each announced."""
    recipe = tiny_recipe(
        tmp_path, tiny_model, logger=False,
        model={
            "rollout": {"class_path": "test_rollout_engines.RecordingEngine"},
            "update": {"micro_batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 2},
        },
        trainer={"max_steps": 8},
    )
    cli = main(["fit", "--config", str(recipe)])
    assert cli.model.rollout_engine.calls == {"setup": 1, "generate": 2, "policy_updated": 8}
