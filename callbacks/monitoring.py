"""Monitoring callbacks that need no ReLaX machinery."""

from __future__ import annotations

import textwrap

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw, ImageFont
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


class ImageSampleLogger(SampleLogger):
    """SampleLogger for vision-language runs: besides the text, an image grid in TensorBoard's images tab
    (tag ``samples/images``), one row per prompt: its first figure, then the question, the answer and the best
    and worst response with their rewards. Prompts without an image are left out of the grid.

    Args:
        every_n_steps: log on steps divisible by this.
        num_prompts: prompts shown per logged step.
        max_chars: long responses are cut to this many characters in the text tab.
        panel_size: height in pixels of one row of the grid (the figure is fitted into a square of this side).
    """

    def __init__(
        self, every_n_steps: int = 5, num_prompts: int = 4, max_chars: int = 2000, panel_size: int = 256
    ) -> None:
        super().__init__(every_n_steps, num_prompts, max_chars)
        if panel_size < 64:
            raise ValueError(f"panel_size must be >= 64 pixels, got {panel_size}")
        self.panel_size = panel_size

    @override
    def on_rollout_end(self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch) -> None:
        super().on_rollout_end(trainer, module, rollout)
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        grid = self.render_grid(rollout) if loggers else None
        if grid is not None:
            loggers[0].experiment.add_image("samples/images", grid, global_step=step, dataformats="HWC")

    def render_grid(self, rollout: RolloutBatch) -> np.ndarray | None:
        """``(H, W, 3)`` uint8: one row per shown prompt that has an image; None when none has."""
        rewards = rollout.rewards.tolist()
        rows = []
        for group in range(min(self.num_prompts, len(rollout) // rollout.group_size)):
            members = range(group * rollout.group_size, (group + 1) * rollout.group_size)
            # on ties the first best and the last worst: two different responses whenever the group has two
            best, worst = max(members, key=rewards.__getitem__), min(reversed(members), key=rewards.__getitem__)
            sample = rollout.samples[best]
            if not sample.get("images"):
                continue
            lines = [
                ("question", str(sample.get("prompt", "")), 4),
                ("answer", str(sample.get("answer", "")), 1),
                (f"best, reward {rewards[best]:.2f}", rollout.completions[best], 5),
                (f"worst, reward {rewards[worst]:.2f}", rollout.completions[worst], 5),
            ]
            rows.append(self.panel(sample["images"][0], lines))
        return np.concatenate(rows, axis=0) if rows else None

    def panel(self, image: Image.Image, lines: list[tuple[str, str, int]]) -> np.ndarray:
        """One grid row: ``image`` fitted into a square, then each ``(title, text, max_lines)`` wrapped beside it."""
        size = self.panel_size
        canvas = Image.new("RGB", (3 * size, size), "white")
        figure = image.convert("RGB")
        figure.thumbnail((size - 8, size - 8))
        canvas.paste(figure, (4 + (size - 8 - figure.width) // 2, 4 + (size - 8 - figure.height) // 2))
        draw = ImageDraw.Draw(canvas)
        font_size = max(8, size // 20)
        font = ImageFont.load_default(size=font_size)
        width = max(10, int(2 * size / (0.6 * font_size)))  # characters per line at about 0.6 em per character
        y = 4
        for title, text, max_lines in lines:
            wrapped = textwrap.wrap(f"{title}: {' '.join(text.split())}", width) or [f"{title}:"]
            if len(wrapped) > max_lines:
                wrapped = wrapped[: max_lines - 1] + [wrapped[max_lines - 1][: width - 4] + " ..."]
            for line in wrapped:
                draw.text((size + 8, y), line, fill="black", font=font)
                y += int(font_size * 1.25)
            y += font_size // 2
        draw.line([(0, size - 1), (3 * size, size - 1)], fill="gray")
        return np.asarray(canvas)
