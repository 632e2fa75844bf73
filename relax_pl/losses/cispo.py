"""CISPO (MiniMax-M1, arXiv 2506.13585, Sec. 3.1): REINFORCE with a clipped, stop-gradient importance weight, so that
no token's gradient is dropped (PPO's clip zeroes the gradient of the rare tokens that move most)."""

from __future__ import annotations

import torch
from torch import Tensor

from relax_pl.losses.base import LossInput, LossOutput, PolicyLoss
from relax_pl.objectives import masked_mean


def clipped_weight_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float | None, clip_high: float
) -> tuple[Tensor, Tensor]:
    """CISPO's per-token loss (Eq. 4-5 of 2506.13585), negated:

    ``L_t = -sg(r_hat_t) A log pi(y_t)``, ``r_hat_t = clip(r_t, 1 - clip_low, 1 + clip_high)``,
    ``r_t = exp(logp_t - old_logp_t)``; no lower bound when ``clip_low`` is None (the paper's choice).

    Its gradient is ``-r_hat_t A grad logp_t`` on every token, clipped or not. Returns the per-token loss and the
    bool mask of the tokens whose weight was clipped.
    """
    adv = advantages.unsqueeze(-1) if advantages.ndim == 1 else advantages
    ratio = torch.exp(logp - old_logp).detach()
    weight = ratio.clamp(min=None if clip_low is None else 1.0 - clip_low, max=1.0 + clip_high)
    return -weight * adv * logp, weight != ratio


class CISPO(PolicyLoss):
    """CISPO: the policy gradient of every token weighted by its importance ratio clipped to
    ``[1 - clip_low, 1 + clip_high]`` under a stop-gradient (:func:`clipped_weight_surrogate`).

    Logs ``actor/is_weight_clipfrac`` (the share of response tokens whose weight was clipped).

    Args:
        clip_low: None leaves the weight unbounded below (MiniMax-M1: "we did not impose a lower bound").
        clip_high: the weight's upper bound is ``1 + clip_high`` (the paper tunes only this one).
    """

    def __init__(self, clip_low: float | None = None, clip_high: float = 0.28) -> None:
        if clip_low is not None and not 0 <= clip_low <= 1 or clip_high < 0:
            raise ValueError(
                f"CISPO needs clip_low in [0, 1] (or None) and clip_high >= 0, got {clip_low}, {clip_high}"
            )
        self.clip_low, self.clip_high = clip_low, clip_high

    def __call__(self, batch: LossInput) -> LossOutput:
        loss, clipped = clipped_weight_surrogate(
            batch.logp, batch.old_logp, batch.advantages, self.clip_low, self.clip_high
        )
        return LossOutput(loss, {"actor/is_weight_clipfrac": masked_mean(clipped.float(), batch.mask)})
