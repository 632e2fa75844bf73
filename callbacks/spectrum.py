"""SpectrumMonitor: latent probes of every rollout (DSD in both spectra, effective rank, RepExp novelty, split by
correct and incorrect answers) and the Koopman spectrum and DSD distribution as TensorBoard images."""

from __future__ import annotations

import math
import time
from typing import Any, Literal, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor, nn
from typing_extensions import override

from relax_pl.callbacks.effective_rank import effective_rank
from relax_pl.callbacks.koopman_fit import KoopmanFit, find_koopman_fit, log_metrics
from relax_pl.callbacks.latent_exploration import dropout_sites
from relax_pl.callbacks.repexp import group_leverage, sparse_random_projection
from relax_pl.extension import DetachedForward, LossTerms, PolicyForward, RLVRCallback
from relax_pl.koopman import koopman_eigenvalues
from relax_pl.metrics import correctness_or_overall
from relax_pl.rollout import RolloutBatch


def update_reads_sampling_states(module: L.LightningModule, rows: int) -> bool:
    """Whether the update's first pass over each row sees the hidden states of the policy that sampled it: each
    epoch is one mini-batch (no optimiser step before a row's first pass) and nothing in the policy drops out."""
    mini_batch_size = module.update.mini_batch_size
    return (mini_batch_size is None or mini_batch_size >= rows) and not dropout_sites(module.policy)


class SpectrumMonitor(RLVRCallback):
    """Latent probes of the rollout before the update, in any run (GRPO included: it adds no loss term; it needs a
    KoopmanFit for the dictionary DSD is measured under).

    Every ``metrics_every_n_steps`` RL steps, on the first ``max_responses`` responses (whole prompt groups), read
    in the step's shared forward (extension.py): per response the DSD under KoopmanFit's frozen dictionary in both
    spectra (``eig`` and ``sv_compat``, docs/method.md "Spectrum and units"), the effective rank of its hidden
    states (:func:`~relax_pl.callbacks.effective_rank.effective_rank`) and its RepExp novelty against its group
    (:func:`~relax_pl.callbacks.repexp.group_leverage` of the mean-pooled states under a fixed sparse projection,
    ``lam=0.01``, 32 columns: RepExp's bonus on the policy's states). Logged as means over all, correct and
    incorrect responses (correct: :func:`relax_pl.metrics.correctness_or_overall` > 0; a split with no response is left out):
    ``probes/dsd_eig/{all,correct,incorrect}``, ``probes/dsd_sv/...``, ``probes/effective_rank/...``,
    ``probes/repexp_novelty/...``; with ``probes/correct_frac`` and ``timing_s/probes`` (this callback's own
    compute; its share of the forward is in ``timing_s/hidden``). Also ``koopman/dsd_mean``, ``koopman/dsd_median``
    and ``koopman/valid_frac`` in ``spectrum``'s units.

    Every ``every_n_steps`` RL steps, with a TensorBoard logger, the images ``koopman/eigenvalues`` (complex plane
    with the unit circle; correct responses in green, incorrect in red) and ``koopman/dsd_histogram``.

    Cost: the rows' share of the shared forward (none when RepExp, EffectiveRankShaping or a KoopmanFit fit already
    read them, or with ``read_from="update"``) and the per-response math; benchmarks/latent_overhead.py measures it
    against the step time.

    Args:
        every_n_steps: images on RL steps (rollouts) divisible by this.
        max_responses: how many of the rollout's responses are measured (the first ones, whole groups).
        n_min: fewest own transitions for a defined DSD (default 2m); match LatentExploration's.
        spectrum: the spectrum of ``koopman/dsd_*`` and the histogram, "eig" or "sv_compat" (match
            LatentExploration's).
        metrics_every_n_steps: probes on RL steps divisible by this.
        read_from: ``"rollout"`` reads the responses in the step's shared no-grad forward, before the update: the
            policy that sampled them, at the cost of that forward where no other callback asks for it (15% of a
            relax_small GRPO step, benchmarks/latent_overhead.py). ``"update"`` reads the update's own forward,
            detached, the first time each row passes: no extra forward (0.2%). The same states when each epoch is
            one mini-batch and the policy has no dropout (relax_small); otherwise the rows of a later mini-batch
            are read after that rollout's earlier optimiser steps. ``"auto"`` (default) reads the update's forward
            where it gives the same states, the shared forward elsewhere.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        max_responses: int = 32,
        n_min: Optional[int] = None,
        spectrum: Literal["eig", "sv_compat"] = "sv_compat",
        metrics_every_n_steps: int = 1,
        read_from: Literal["auto", "rollout", "update"] = "auto",
    ) -> None:
        if every_n_steps < 1 or max_responses < 1 or metrics_every_n_steps < 1:
            raise ValueError(
                f"SpectrumMonitor needs every_n_steps, max_responses and metrics_every_n_steps >= 1, got "
                f"{every_n_steps}, {max_responses}, {metrics_every_n_steps}"
            )
        if spectrum not in ("eig", "sv_compat"):
            raise ValueError(f"SpectrumMonitor: spectrum must be 'eig' or 'sv_compat', got {spectrum!r}")
        if read_from not in ("auto", "rollout", "update"):
            raise ValueError(f"SpectrumMonitor: read_from must be 'auto', 'rollout' or 'update', got {read_from!r}")
        self.read_from = read_from
        self.needs_hidden_states = read_from == "update"  # the update's forward then keeps its final states
        self._from_update = read_from == "update"  # this step's choice (``auto`` decides per step)
        self.every_n_steps, self.metrics_every_n_steps = every_n_steps, metrics_every_n_steps
        self.max_responses, self.n_min, self.spectrum = max_responses, n_min, spectrum
        self.last_metrics: dict[str, float] = {}  # the latest measurement, for scripts without a logger
        self._rows: Tensor | None = None  # the rows this step reads, and their trajectories (T_i, d) in row order
        self._trajectories: list[Tensor] = []
        self._read: dict[int, Tensor] = {}  # read_from="update": row -> trajectory, as the update's forward passes
        self._rollout: RolloutBatch | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            find_koopman_fit(trainer, "SpectrumMonitor")

    def logs_now(self, trainer: L.Trainer, every: int) -> bool:
        return trainer.fit_loop.epoch_loop.total_batch_idx % every == 0

    @override
    def rollout_hidden_rows(
        self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch
    ) -> Tensor | None:
        self._rows, self._trajectories, self._read, self._rollout = None, [], {}, None
        self.needs_hidden_states = self.read_from == "update"
        if not len(rollout) or not (
            self.logs_now(trainer, self.metrics_every_n_steps) or self.logs_now(trainer, self.every_n_steps)
        ):
            return None
        count = min(len(rollout), self.max_responses)
        if count >= rollout.group_size:  # whole groups: the novelty is measured against a response's group
            count -= count % rollout.group_size
        self._rows = torch.arange(count, device=rollout.input_ids.device)
        self._from_update = self.read_from == "update" or (
            self.read_from == "auto" and update_reads_sampling_states(module, len(rollout))
        )
        self.needs_hidden_states = self._from_update
        return None if self._from_update else self._rows

    @override
    def on_rollout_hidden_states(
        self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch, part: DetachedForward
    ) -> None:
        if self._rows is None:
            return
        keep = part.rows < len(self._rows)
        # a response's mask is a prefix of its row (tokens up to the first EOS), so boolean indexing keeps order
        self._trajectories += [h[mask].detach() for h, mask in zip(part.hidden[keep], part.response_mask[keep])]

    @override
    def on_rollout_end(self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch) -> None:
        if self._rows is None:
            return
        find_koopman_fit(trainer, "SpectrumMonitor").ensure_fitted(trainer, module, rollout)
        if not self._from_update:
            self.measure(trainer, module, rollout, self._trajectories)
        else:
            self._rollout = rollout  # measured after the update, on the rows its forward passed

    @override
    def policy_loss_terms(
        self, trainer: L.Trainer, module: L.LightningModule, forward: PolicyForward
    ) -> LossTerms | None:
        if self._rollout is None or forward.rows is None:
            return None
        for row, hidden, mask in zip(forward.rows.tolist(), forward.hidden, forward.response_mask):
            if row < len(self._rows) and row not in self._read:  # the first pass over it
                self._read[row] = hidden.detach()[mask]
        return None

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._rollout is None:
            return
        rollout, self._rollout = self._rollout, None
        self.measure(trainer, pl_module, rollout, [self._read[row] for row in range(len(self._rows))])

    def measure(
        self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch, trajectories: list[Tensor]
    ) -> None:
        """The probes of ``trajectories`` (the states of rows ``self._rows``), logged; the images on their steps."""
        fit = find_koopman_fit(trainer, "SpectrumMonitor")
        start = time.perf_counter()
        correct = (correctness_or_overall(rollout.reward_components)[self._rows] > 0).cpu()
        dsd_eig, valid = fit.dsd_of(trajectories, eps=fit.eps, n_min=self.n_min, spectrum="eig")
        dsd_sv, _ = fit.dsd_of(
            trajectories, eps=fit.eps, n_min=self.n_min, spectrum="sv_compat",
            padded_length=module.sampling.max_new_tokens,
        )
        dsd_eig, dsd_sv, valid = dsd_eig.cpu(), dsd_sv.cpu(), valid.cpu()
        ranks = torch.stack([effective_rank(t.double()) for t in trajectories]).cpu()
        novelty = self.novelty(trajectories, rollout.group_index[self._rows]).cpu()
        every = torch.ones_like(valid)
        metrics = {"probes/correct_frac": float(correct.float().mean())}
        for name, values, defined in [
            ("dsd_eig", dsd_eig, valid), ("dsd_sv", dsd_sv, valid), ("effective_rank", ranks, every),
            ("repexp_novelty", novelty, every),
        ]:
            for split, rows in (("all", every), ("correct", correct), ("incorrect", ~correct)):
                if (defined & rows).any():
                    metrics[f"probes/{name}/{split}"] = float(values[defined & rows].mean())
        kept = (dsd_sv if self.spectrum == "sv_compat" else dsd_eig)[valid]
        metrics.update(
            {
                "koopman/dsd_mean": float(kept.mean()) if kept.numel() else math.nan,
                "koopman/dsd_median": float(kept.median()) if kept.numel() else math.nan,
                "koopman/valid_frac": float(valid.float().mean()),
            }
        )
        images = self.logs_now(trainer, self.every_n_steps)
        if images:
            eigenvalues = self.eigenvalues(fit, trajectories)
        metrics["timing_s/probes"] = time.perf_counter() - start
        if self.logs_now(trainer, self.metrics_every_n_steps):
            self.last_metrics = metrics
            log_metrics(trainer, metrics)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if images and loggers and trainer.is_global_zero:
            writer, step = loggers[0].experiment, trainer.fit_loop.epoch_loop._batches_that_stepped
            figure = eigenvalue_figure(eigenvalues[valid], step, correct[valid])
            writer.add_figure("koopman/eigenvalues", figure, global_step=step)
            writer.add_figure("koopman/dsd_histogram", dsd_figure(kept, len(valid), step), global_step=step)
        self._rows, self._trajectories, self._read = None, [], {}

    @staticmethod
    def novelty(trajectories: list[Tensor], group_index: Tensor) -> Tensor:
        """RepExp's bonus of each response against its group, on the policy's mean-pooled states (float64)."""
        pooled = torch.stack([t.double().mean(0) for t in trajectories])
        projection = sparse_random_projection(pooled.shape[-1], 32, torch.Generator().manual_seed(0))
        return group_leverage(pooled @ projection.to(pooled.device), group_index.to(pooled.device), 0.01)

    def eigenvalues(self, fit: KoopmanFit, trajectories: list[Tensor]) -> Tensor:
        """Koopman eigenvalues ``(B, m)`` of the trajectories (NaN rows where no DSD is defined), on the CPU."""
        hidden = nn.utils.rnn.pad_sequence(trajectories, batch_first=True)
        lengths = torch.tensor([t.shape[0] for t in trajectories], device=hidden.device)
        mask = torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]
        return koopman_eigenvalues(hidden, mask, fit.dictionary_on(hidden.device), fit.eps, n_min=self.n_min).cpu()


def eigenvalue_figure(eigenvalues: Tensor, step: int, correct: Tensor | None = None) -> Figure:
    """Eigenvalues of each response's K on the complex plane, with the unit circle: one colour per response, or
    green for correct and red for incorrect responses when ``correct`` is given."""
    figure = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = figure.subplots()
    theta = np.linspace(0, 2 * np.pi, 256)
    ax.plot(np.cos(theta), np.sin(theta), color="0.5", linestyle="--", linewidth=0.8)
    for k, row in enumerate(eigenvalues.numpy()):
        colour = None if correct is None else ("tab:green" if bool(correct[k]) else "tab:red")
        ax.scatter(row.real, row.imag, s=8, alpha=0.6, color=colour)
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
