"""SpectrumMonitor: the Koopman spectrum and the DSD distribution of the rollouts, as TensorBoard images."""

from __future__ import annotations

import math
from typing import Literal, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor
from typing_extensions import override

from relax_pl.callbacks.koopman_fit import find_koopman_fit, log_metrics
from relax_pl.extension import RLVRCallback
from relax_pl.koopman import dsd, koopman_eigenvalues
from relax_pl.rollout import RolloutBatch


class SpectrumMonitor(RLVRCallback):
    """Every ``every_n_steps`` RL steps, computes the Koopman eigenvalues and DSD of up to ``max_responses``
    responses of the rollout (their hidden states before the update, under KoopmanFit's frozen dictionary);
    writes ``koopman/dsd_mean``, ``koopman/dsd_median`` and ``koopman/valid_frac`` to the loggers (and to
    ``last_metrics``), and, with a TensorBoard logger, the images ``koopman/eigenvalues`` (complex plane with the unit circle) and ``koopman/dsd_histogram``.

    It changes nothing in training, so it also measures DSD in a vanilla GRPO run (with KoopmanFit alone).
    Costs one no-grad forward of ``max_responses`` responses per logged step.

    Args:
        every_n_steps: log on RL steps (rollouts) divisible by this.
        max_responses: how many of the rollout's responses are measured (the first ones: whole groups).
        n_min: fewest own transitions for a defined DSD (default 2m); match LatentExploration's.
        spectrum: DSD's spectrum, "eig" or "sv_compat"; match LatentExploration's.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        max_responses: int = 32,
        n_min: Optional[int] = None,
        spectrum: Literal["eig", "sv_compat"] = "sv_compat",
    ) -> None:
        if every_n_steps < 1 or max_responses < 1:
            raise ValueError(f"SpectrumMonitor needs every_n_steps >= 1 and max_responses >= 1, got {every_n_steps}, {max_responses}")
        self.every_n_steps, self.max_responses, self.n_min, self.spectrum = every_n_steps, max_responses, n_min, spectrum
        self.last_metrics: dict[str, float] = {}  # the latest measurement, for scripts without a logger

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            find_koopman_fit(trainer, "SpectrumMonitor")

    @override
    def on_rollout_end(self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch) -> None:
        if trainer.fit_loop.epoch_loop.total_batch_idx % self.every_n_steps or not len(rollout):
            return
        fit = find_koopman_fit(trainer, "SpectrumMonitor")
        fit.ensure_fitted(trainer, module, rollout)
        rows = torch.arange(min(len(rollout), self.max_responses), device=rollout.input_ids.device)
        eigenvalues, values, valid = [], [], []
        for hidden, mask in module.response_hidden_states(rollout.select(rows)):
            dictionary = fit.dictionary_on(hidden.device)
            eigenvalues.append(koopman_eigenvalues(hidden, mask, dictionary, fit.eps, n_min=self.n_min).cpu())
            d, v = dsd(
                hidden, mask, dictionary, eps=fit.eps, n_min=self.n_min, spectrum=self.spectrum,
                padded_length=module.sampling.max_new_tokens,
            )
            values.append(d.cpu())
            valid.append(v.cpu())
        eig, kept, valid_all = torch.cat(eigenvalues), torch.cat(values)[torch.cat(valid)], torch.cat(valid)
        self.last_metrics = {
            "koopman/dsd_mean": float(kept.mean()) if kept.numel() else math.nan,
            "koopman/dsd_median": float(kept.median()) if kept.numel() else math.nan,
            "koopman/valid_frac": float(valid_all.float().mean()),
        }
        log_metrics(trainer, self.last_metrics)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if loggers and trainer.is_global_zero:
            writer, step = loggers[0].experiment, trainer.fit_loop.epoch_loop._batches_that_stepped
            writer.add_figure("koopman/eigenvalues", eigenvalue_figure(eig[valid_all], step), global_step=step)
            writer.add_figure("koopman/dsd_histogram", dsd_figure(kept, len(valid_all), step), global_step=step)


def eigenvalue_figure(eigenvalues: Tensor, step: int) -> Figure:
    """Eigenvalues of each response's K (one colour per response) on the complex plane, with the unit circle."""
    figure = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = figure.subplots()
    theta = np.linspace(0, 2 * np.pi, 256)
    ax.plot(np.cos(theta), np.sin(theta), color="0.5", linestyle="--", linewidth=0.8)
    for row in eigenvalues.numpy():
        ax.scatter(row.real, row.imag, s=8, alpha=0.6)
    ax.axhline(0, color="0.85", linewidth=0.5)
    ax.axvline(0, color="0.85", linewidth=0.5)
    ax.set_aspect("equal")
    limit = max(1.2, 1.1 * float(np.abs(eigenvalues.numpy()).max(initial=0.0)))
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_xlabel("Re(lambda)")
    ax.set_ylabel("Im(lambda)")
    ax.set_title(f"Koopman spectrum, step {step} ({eigenvalues.shape[0]} responses)")
    figure.tight_layout()
    return figure


def dsd_figure(values: Tensor, total: int, step: int) -> Figure:
    """Histogram of the valid responses' DSD."""
    figure = Figure(figsize=(4.5, 3.5), dpi=100)
    ax = figure.subplots()
    if values.numel():
        ax.hist(values.numpy(), bins=20, color="tab:blue")
    ax.set_xlabel("DSD")
    ax.set_ylabel("responses")
    ax.set_title(f"DSD, step {step} ({values.numel()} of {total} responses valid)")
    figure.tight_layout()
    return figure
