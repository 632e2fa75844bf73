"""Monitoring callbacks that need no ReLaX machinery."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from relax_pl.extension import RLVRCallback
from relax_pl.rollout import RolloutBatch


class SampleLogger(RLVRCallback):
    """Writes a few prompts with their best and worst response and reward to TensorBoard's text tab.

    Args:
        every_n_steps: log on steps divisible by this.
        num_prompts: prompts shown per logged step.
        max_chars: long responses are cut to this many characters.
    """

    def __init__(self, every_n_steps: int = 5, num_prompts: int = 2, max_chars: int = 2000) -> None:
        self.every_n_steps = every_n_steps
        self.num_prompts = num_prompts
        self.max_chars = max_chars

    @override
    def on_rollout_end(self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        loggers[0].experiment.add_text("samples", self.render(rollout), global_step=step)

    def render(self, rollout: RolloutBatch) -> str:
        """Markdown: per prompt, the question, the answer, and the best and worst response."""
        blocks = []
        rewards = rollout.rewards.tolist()
        for group in range(min(self.num_prompts, len(rollout) // rollout.group_size)):
            rows = range(group * rollout.group_size, (group + 1) * rollout.group_size)
            best, worst = max(rows, key=rewards.__getitem__), min(rows, key=rewards.__getitem__)
            sample = rollout.samples[best]
            blocks.append(
                f"**prompt** (row {sample.get('row')}): {sample.get('prompt', '')}  \n"
                f"**answer**: {sample.get('answer', '')}  \n"
                f"**best** (reward {rewards[best]:.2f}):\n\n    {self._clip(rollout.completions[best])}\n\n"
                f"**worst** (reward {rewards[worst]:.2f}):\n\n    {self._clip(rollout.completions[worst])}\n"
            )
        return "\n---\n".join(blocks)

    def _clip(self, text: str) -> str:
        text = text if len(text) <= self.max_chars else text[: self.max_chars] + " ..."
        return text.replace("\n", "\n    ")
