"""Clip-Cov (Cui et al. 2505.22617, Sec. 5): the clipped surrogate with the gradient of a few high-covariance tokens
detached, against entropy collapse."""

from __future__ import annotations

import torch
from torch import Tensor

from relax_pl.losses.base import LossInput, LossOutput, PolicyLoss
from relax_pl.losses.ppo import clip_fractions, clipped_surrogate
from relax_pl.objectives import covariance_scores, masked_mean


def clip_cov_selection(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    clip_ratio: float = 2e-4,
    cov_bounds: tuple[float, float] = (1.0, 5.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """The tokens whose gradient Clip-Cov detaches (Cui et al. 2505.22617, Sec. 5), ``(N, T)`` bool: a random
    ``max(int(clip_ratio * n_tokens), 1)`` of the tokens whose covariance score lies in ``cov_bounds``, drawn
    among those the PPO clip has not already zeroed (as the reference implementation does). Computed over the
    whole mini-batch, so the budget, the centring and the draw do not depend on micro-batching."""
    _, clip = clipped_surrogate(logp.detach(), old_logp, advantages, clip_low, clip_high)
    scores = covariance_scores(logp, advantages, mask)
    in_bounds = (scores >= cov_bounds[0]) & (scores <= cov_bounds[1])
    candidates = (in_bounds & mask & ~clip["clipped_low"] & ~clip["clipped_high"]).nonzero()
    n_clip = min(len(candidates), max(int(clip_ratio * int(mask.sum())), 1))
    selected = torch.zeros_like(mask)
    if len(candidates):
        pick = torch.randperm(len(candidates), generator=generator, device="cpu")[:n_clip].to(candidates.device)
        rows, cols = candidates[pick].unbind(-1)
        selected[rows, cols] = True
    return selected


def clip_cov_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float, clip_high: float, selected: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov: the clipped surrogate with the gradient of the ``selected`` tokens (:func:`clip_cov_selection`)
    detached. Returns the per-token loss and the clip's masks (:func:`~relax_pl.losses.ppo.clipped_surrogate`)."""
    loss, active = clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)
    return torch.where(selected, loss.detach(), loss), active


class ClipCov(PolicyLoss):
    """Clip-Cov: PPO-clip whose gradient skips a random ``ratio`` of the tokens whose centred covariance
    ``(logp - mean)(A - mean)`` lies in ``bounds``, chosen over the whole mini-batch (:meth:`select`).

    Logs PPO's clip fractions and ``actor/cov_selected_frac``.

    Args:
        clip_low, clip_high: PPO's clip range (see :class:`~relax_pl.losses.PPOClip`).
        ratio: share of the mini-batch's response tokens detached (the paper: 2e-4).
        bounds: the covariance window tokens are drawn from (the paper: 1 to 5).
    """

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        ratio: float = 2e-4,
        bounds: tuple[float, float] = (1.0, 5.0),
    ) -> None:
        if not 0 < ratio <= 1 or bounds[0] > bounds[1]:
            raise ValueError(f"ClipCov needs 0 < ratio <= 1 and bounds low <= high, got {ratio}, {bounds}")
        self.clip_low, self.clip_high, self.ratio, self.bounds = clip_low, clip_high, ratio, tuple(bounds)

    def select(self, batch: LossInput) -> Tensor:
        return clip_cov_selection(
            batch.logp, batch.old_logp, batch.advantages, batch.mask, self.clip_low, self.clip_high, self.ratio,
            self.bounds,
        )

    def __call__(self, batch: LossInput) -> LossOutput:
        loss, active = clip_cov_surrogate(
            batch.logp, batch.old_logp, batch.advantages, self.clip_low, self.clip_high, batch.selected
        )
        metrics = clip_fractions(active, batch.mask)
        metrics["actor/cov_selected_frac"] = masked_mean(batch.selected.float(), batch.mask)
        return LossOutput(loss, metrics)
