"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071): PPO's clip on a sequence-level
importance ratio, the geometric mean of the response's token ratios."""

from __future__ import annotations

import torch
from torch import Tensor

from relax_pl.losses.base import LossInput, LossOutput, PolicyLoss
from relax_pl.losses.ppo import clip_fractions

# exp() of a larger log-ratio overflows float32's range of useful gradients; verl clamps at the same point
MAX_LOG_RATIO = 10.0


def sequence_ratio_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token's per-token loss (Eq. 7 and 13 of 2507.18071):

    ``s_i = exp((1/|y_i|) sum_t (logp_it - old_logp_it))`` (Eq. 7), and per token
    ``s_it = sg(s_i) * pi(y_it) / sg(pi(y_it))`` (Eq. 13), whose value is ``s_i`` and whose gradient is
    ``s_i * grad logp_it``; ``L_it = -min(s_it A_i, clip(s_it, 1 - clip_low, 1 + clip_high) A_i)``.

    Averaged over each response's tokens and then over responses (``seq-mean-token-mean``) this is GSPO's
    sequence-level objective ``-(1/G) sum_i min(s_i A_i, clip(s_i) A_i)`` in value and gradient (Eq. 5, 10). Returns
    the per-token loss and the clip's per-token masks (every token of a clipped response).
    """
    lengths = mask.sum(-1).clamp(min=1)
    log_ratio = ((logp - old_logp) * mask).sum(-1) / lengths  # (N,) log s_i
    # the detached sequence term is added last: logp - logp.detach() is exactly 0 in value (verl#2775)
    log_token_ratio = (logp - logp.detach() + log_ratio.detach()[:, None]).clamp(max=MAX_LOG_RATIO)
    ratio = torch.exp(log_token_ratio)
    adv = advantages[:, None]
    loss = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv)
    with torch.no_grad():
        active = {
            "clipped_low": (adv < 0) & (ratio < 1.0 - clip_low),
            "clipped_high": (adv > 0) & (ratio > 1.0 + clip_high),
        }
    return loss, active


class GSPO(PolicyLoss):
    """GSPO: one importance ratio per response (:func:`sequence_ratio_surrogate`), clipped PPO-style; a response is
    kept or clipped whole. Reduced ``seq-mean-token-mean`` (its objective is a mean over responses).

    Logs PPO's clip fractions (here: the share of response tokens in clipped responses).

    Args:
        clip_low, clip_high: the sequence ratio's clip range; a geometric mean moves far less than a token ratio,
            hence the paper's 3e-4 and 4e-4.
    """

    aggregation = "seq-mean-token-mean"

    def __init__(self, clip_low: float = 3e-4, clip_high: float = 4e-4) -> None:
        if not 0 <= clip_low < 1 or clip_high < 0:
            raise ValueError(f"GSPO needs 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
        self.clip_low, self.clip_high = clip_low, clip_high

    def __call__(self, batch: LossInput) -> LossOutput:
        loss, active = sequence_ratio_surrogate(
            batch.logp, batch.old_logp, batch.advantages, batch.mask, self.clip_low, self.clip_high
        )
        return LossOutput(loss, clip_fractions(active, batch.mask))
