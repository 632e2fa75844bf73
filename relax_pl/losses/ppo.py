"""PPO's clipped surrogate with clip-higher (DAPO): the default policy loss."""

from __future__ import annotations

import torch
from torch import Tensor

from relax_pl.losses.base import LossInput, LossOutput, PolicyLoss
from relax_pl.objectives import masked_mean


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negated PPO clipped surrogate per token, with clip-higher (DAPO):

    ``L_t = -min(rho_t A, clip(rho_t, 1 - clip_low, 1 + clip_high) A)``, ``rho_t = exp(logp_t - old_logp_t)``.

    ``advantages`` is ``(N,)`` (broadcast over tokens) or ``(N, T)``. Returns the per-token loss and boolean
    per-token masks of where the clip was active: ``clipped_low`` (A < 0, ratio below 1 - clip_low) and
    ``clipped_high`` (A > 0, ratio above 1 + clip_high).
    """
    adv = advantages.unsqueeze(-1) if advantages.ndim == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        active = {
            "clipped_low": (adv < 0) & (ratio < 1.0 - clip_low),
            "clipped_high": (adv > 0) & (ratio > 1.0 + clip_high),
        }
    return loss, active


def clip_fractions(active: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
    """The share of response tokens the clip cut from below (A < 0), from above (A > 0), and in all.

    ``actor/pg_clipfrac`` is verl's figure (tokens where the clipped term won). The two sides are named ``_low`` and
    ``_high``, not verl's ``pg_clipfrac_lower``, which in verl is the share of tokens its dual clip (``clip_ratio_c``)
    capped: relax_pl's PPOClip has no dual clip."""
    lower = masked_mean(active["clipped_low"].float(), mask)
    higher = masked_mean(active["clipped_high"].float(), mask)
    return {"actor/pg_clipfrac_low": lower, "actor/pg_clipfrac_high": higher, "actor/pg_clipfrac": lower + higher}


class PPOClip(PolicyLoss):
    """PPO's clipped surrogate (:func:`clipped_surrogate`), with DAPO's clip-higher when ``clip_high > clip_low``.

    Logs ``actor/pg_clipfrac_low``, ``actor/pg_clipfrac_high`` and ``actor/pg_clipfrac``.

    Args:
        clip_low: the ratio's lower bound is ``1 - clip_low`` (for A < 0).
        clip_high: its upper bound is ``1 + clip_high`` (for A > 0); DAPO raises it to 0.28.
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2) -> None:
        if not 0 <= clip_low < 1 or clip_high < 0:
            raise ValueError(f"PPOClip needs 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
        self.clip_low, self.clip_high = clip_low, clip_high

    def __call__(self, batch: LossInput) -> LossOutput:
        loss, active = clipped_surrogate(batch.logp, batch.old_logp, batch.advantages, self.clip_low, self.clip_high)
        return LossOutput(loss, clip_fractions(active, batch.mask))
