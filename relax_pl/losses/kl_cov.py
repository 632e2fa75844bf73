"""KL-Cov (Cui et al. 2505.22617, Sec. 5): the unclipped policy gradient with a KL penalty on the few tokens of
highest covariance, against entropy collapse."""

from __future__ import annotations

import torch
from torch import Tensor

from relax_pl.losses.base import LossInput, LossOutput, PolicyLoss, UpdatePlan
from relax_pl.objectives import covariance_scores, masked_mean


def kl_cov_selection(logp: Tensor, advantages: Tensor, mask: Tensor, kl_ratio: float = 2e-3) -> Tensor:
    """The tokens KL-Cov penalises (Cui et al. 2505.22617, Sec. 5), ``(N, T)`` bool: the top
    ``max(int(kl_ratio * n_tokens), 1)`` tokens of the whole mini-batch by covariance score."""
    scores = covariance_scores(logp, advantages, mask)
    k = min(max(int(kl_ratio * int(mask.sum())), 1), int(mask.sum()))
    selected = torch.zeros_like(mask)
    if k:
        selected.view(-1)[scores.flatten().topk(k).indices] = True
    return selected


def kl_cov_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, selected: Tensor, kl_coef: float = 1.0
) -> Tensor:
    """KL-Cov's per-token loss: the unclipped policy-gradient loss ``-rho A`` plus ``kl_coef * |logp - old_logp|`` on
    the ``selected`` tokens (:func:`kl_cov_selection`). The penalty and its gradient are zero until the policy has
    moved away from the one that sampled (a second mini-batch or PPO epoch)."""
    adv = advantages.unsqueeze(-1) if advantages.ndim == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    return torch.where(selected, -ratio * adv + kl_coef * drift_magnitude(logp - old_logp), -ratio * adv)


def drift_magnitude(drift: Tensor) -> Tensor:
    """``|drift|`` whose gradient is 0 where the drift is rounding noise (within 64 ulps of 0): ``sign(drift)`` there
    would be the sign of the noise, which differs between forwards split into other micro-batches (a token the
    update left where it was, at ``p`` ~ 1, would be pushed one way or the other by chance)."""
    noise = 64 * torch.finfo(drift.dtype).eps
    return torch.where(drift.abs() > noise, drift.abs(), drift.detach().abs())


class KLCov(PolicyLoss):
    """KL-Cov: ``-rho A`` on every token plus ``coef * |logp - old_logp|`` on the top ``ratio`` of the mini-batch's
    tokens by centred covariance (:meth:`select`). Needs more than one optimiser step per rollout (:meth:`check`).

    Logs ``actor/cov_selected_frac``.

    Args:
        ratio: share of the mini-batch's response tokens penalised (the paper: 2e-3).
        coef: weight of the penalty (the paper: 1).
    """

    def __init__(self, ratio: float = 2e-3, coef: float = 1.0) -> None:
        if not 0 < ratio <= 1 or coef < 0:
            raise ValueError(f"KLCov needs 0 < ratio <= 1 and coef >= 0, got {ratio}, {coef}")
        self.ratio, self.coef = ratio, coef

    def select(self, batch: LossInput) -> Tensor:
        return kl_cov_selection(batch.logp, batch.advantages, batch.mask, self.ratio)

    def __call__(self, batch: LossInput) -> LossOutput:
        loss = kl_cov_surrogate(batch.logp, batch.old_logp, batch.advantages, batch.selected, self.coef)
        return LossOutput(loss, {"actor/cov_selected_frac": masked_mean(batch.selected.float(), batch.mask)})

    def check(self, plan: UpdatePlan) -> None:
        if plan.single_pass:
            responses = plan.responses_per_step
            raise ValueError(
                f"model.objective.policy_loss KLCov does nothing here: with model.update.ppo_epochs=1 and "
                f"model.update.mini_batch_size={plan.mini_batch_size} (>= the {responses or 'whole rollout of'} "
                f"responses per step) the policy is updated once per rollout, so KL-Cov's penalty |logp - old_logp| "
                f"and its gradient are 0 and the run is plain policy gradient. Set model.update.ppo_epochs >= 2, or a "
                f"mini_batch_size smaller than the responses per step, or use relax_pl.losses.ClipCov"
            )
