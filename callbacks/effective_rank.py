"""EffectiveRankShaping: the hidden-state effective rank, its velocity and acceleration shaping the GRPO advantage
(VERL, arXiv 2509.23808)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from relax_pl.callbacks.koopman_fit import log_metrics
from relax_pl.extension import DetachedForward, RLVRCallback
from relax_pl.rollout import RolloutBatch


def effective_rank(states: Tensor) -> Tensor:
    """``ER(Z) = exp(-sum_k p_k log p_k)``, ``p_k = sigma_k / sum_j sigma_j``, over the singular values ``sigma`` of
    the token-centred ``(T, d)`` matrix ``Z`` (Roy and Vetterli 2007; VERL's ER). 0 for fewer than 2 tokens."""
    if states.shape[0] < 2:
        return states.new_zeros(())
    sigma = torch.linalg.svdvals(states - states.mean(0))
    if not sigma.sum() > 0:  # every token the same: no direction at all
        return states.new_zeros(())
    p = sigma / sigma.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())


def rank_dynamics(states: Tensor, stride: int, max_tokens: int) -> Tensor:
    """``(ER, ERV, ERA)`` of one response's ``(T, d)`` hidden states (VERL's ER and its first and second
    differences).

    ``ER`` is :func:`effective_rank` of the whole response. Over its last ``max_tokens`` tokens, the prefixes
    ``Z_{<=t}`` ending at ``t = s, 2s, ...`` (``s = stride``, ``t < T``) have ranks ``E_0, E_1, ...``;

    ``d_k = E_k - (1/k) sum_{j<k} E_j`` (the rank's step over the mean of the earlier prefixes), ``ERV = mean_{k>=1}
    d_k``, ``ERA = mean_{k>=2} (d_k - d_{k-1})``,

    each 0 where it has no term (a response shorter than ``2s`` tokens has neither), as in the authors' code.
    """
    er = effective_rank(states)
    tail = states[-max_tokens:]
    ranks = [effective_rank(tail[: t + 1]) for t in range(stride, tail.shape[0], stride)]
    steps = [ranks[k] - torch.stack(ranks[:k]).mean() for k in range(1, len(ranks))]
    erv = torch.stack(steps).mean() if steps else er.new_zeros(())
    era = torch.stack([b - a for a, b in zip(steps, steps[1:])]).mean() if len(steps) > 1 else er.new_zeros(())
    return torch.stack([er, erv, era])


def rank_bonus(values: Tensor, reference: Tensor, gain: float, weight: float, clip: float = 5.0) -> Tensor:
    """VERL's auxiliary signal per response, from ``values`` ``(N, 3)`` = ``(ER, ERV, ERA)`` and ``reference``
    ``(3,)``, the moving averages of their batch means:

    ``u_j = clip((x_j - m_j) / (|m_j| + 1e-8), -5, 5)`` (relative deviation), ``beta = sigmoid(gain * u_ERA)``
    (ERA as meta-controller: a rank accelerating above its average leans to exploration),
    ``aux = weight * (beta tanh(u_ER) + (1 - beta) tanh(u_ERV))``.
    """
    deviation = ((values - reference) / (reference.abs() + 1e-8)).clamp(-clip, clip)
    tendency = torch.sigmoid(gain * deviation[:, 2])
    return weight * (tendency * torch.tanh(deviation[:, 0]) + (1 - tendency) * torch.tanh(deviation[:, 1]))


def shaped_advantages(advantages: Tensor, bonus: Tensor, kappa: float) -> Tensor:
    """``A' = A + min(max(aux, 0), |A| / kappa)``: only a positive bonus, never more than ``1/kappa`` of ``|A|``
    (so it cannot flip an advantage's sign, and a response of a uniform group, ``A = 0``, stays at 0)."""
    return advantages + torch.minimum(bonus.clamp(min=0).to(advantages.dtype), advantages.abs() / kappa)


class EffectiveRankShaping(RLVRCallback):
    """Shapes each response's GRPO advantage with the effective rank of its hidden states, the rank's velocity and
    its acceleration (VERL, arXiv 2509.23808; the authors' code: github.com/hf618/VERL).

    Per response (final-norm hidden states of the response tokens, read in the step's shared forward):
    ``(ER, ERV, ERA)`` by :func:`rank_dynamics`; the auxiliary signal ``aux`` by :func:`rank_bonus` against
    ``m``, exponential moving averages (rate ``ema_rate``) of the previous steps' batch means; the advantage
    ``A' = A + min(max(aux, 0), |A| / kappa)`` (:func:`shaped_advantages`). The first step only sets ``m``
    (nothing to deviate from yet). ``m`` is this callback's ``state_dict``, saved in every checkpoint.

    Defaults follow the authors' run script (``train.sh``; the paper's text was not available to us, its
    symbols are mapped to these flags in their ``TRAINING_CONFIG.md``): ``stride=40``
    (``diff_stride``), ``max_tokens=512`` (the calculator's window for the differences), ``gain=2.0``
    (``modulation_gain``), ``weight=1.0`` (``aux_reward_global_weight`` with ``aux_fix``), ``kappa=2.0``
    (``adv_shaping_kappa``), ``ema_rate=0.3`` (``reward_ema_alpha``); the explore profile weights ER only and the
    exploit profile ERV only (``reward_weights`` / ``reward_weights_exploit``); shaping on the advantage
    (``add_adv``), not the reward. One deviation: the authors' averages start at 0 and take a step's batch mean
    one step late, so at their second step every relative deviation hits the +-5 clip; here ``m`` starts at the
    first step's means and takes each step's means after that step's shaping.

    Logged once per step: ``er/effective_rank``, ``er/erv``, ``er/era`` (batch means), ``er/bonus_mean`` (mean
    ``aux``), ``er/shaped_frac`` (responses whose advantage changed), ``er/tendency`` (mean ``beta``) and
    ``er/advantage_change`` (mean ``|A' - A|``).

    Args:
        stride: tokens between the prefixes of ERV and ERA (authors: 40).
        max_tokens: the differences read a response's last ``max_tokens`` tokens (authors: 512).
        gain: slope of ERA's sigmoid (authors: 2.0).
        weight: scale of ``aux`` (authors: 1.0).
        kappa: the bonus is at most ``|A| / kappa`` (authors: 2.0).
        ema_rate: weight of a new batch mean in ``m`` (authors: 0.3).

    Raises:
        ValueError: on a bad argument.
    """

    def __init__(
        self,
        stride: int = 40,
        max_tokens: int = 512,
        gain: float = 2.0,
        weight: float = 1.0,
        kappa: float = 2.0,
        ema_rate: float = 0.3,
    ) -> None:
        if stride < 1 or max_tokens < 2 * stride or weight < 0 or kappa <= 0 or not 0 < ema_rate <= 1:
            raise ValueError(
                f"EffectiveRankShaping needs stride >= 1, max_tokens >= 2 * stride, weight >= 0, kappa > 0 and "
                f"0 < ema_rate <= 1; got {stride=}, {max_tokens=}, {weight=}, {kappa=}, {ema_rate=}"
            )
        self.stride, self.max_tokens, self.gain, self.weight = stride, max_tokens, gain, weight
        self.kappa, self.ema_rate = kappa, ema_rate
        self.reference: Tensor | None = None  # (3,) float64: moving averages of the batch means of ER, ERV, ERA
        self._values: Tensor | None = None  # (N, 3) of this step's rollout, from the shared forward

    @override
    def rollout_hidden_rows(
        self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch
    ) -> Tensor | None:
        self._values = None
        return torch.arange(len(rollout), device=rollout.input_ids.device)

    @override
    def on_rollout_hidden_states(
        self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch, part: DetachedForward
    ) -> None:
        if self._values is None:
            self._values = torch.zeros(len(rollout), 3, dtype=torch.float64)
        for row, hidden, mask in zip(part.rows.tolist(), part.hidden, part.response_mask):
            self._values[row] = rank_dynamics(hidden[mask].float(), self.stride, self.max_tokens).double().cpu()

    @override
    def on_rollout_end(self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch) -> None:
        if not len(rollout):
            return
        if self._values is None:
            raise RuntimeError("EffectiveRankShaping got no hidden states from the shared forward")
        # the batch's means over every rank (the authors' driver sees the whole batch): the moving averages are then
        # the same on every rank, and rank 0's checkpoint resumes them all
        values = self._values
        means = trainer.strategy.reduce(values.mean(0).to(module.device), reduce_op="mean").cpu()
        metrics = {"er/effective_rank": float(means[0]), "er/erv": float(means[1]), "er/era": float(means[2])}
        if self.reference is not None:
            bonus = rank_bonus(values, self.reference, self.gain, self.weight)
            before = rollout.advantages
            rollout.advantages = shaped_advantages(before, bonus.to(before.device), self.kappa)
            deviation = ((values[:, 2] - self.reference[2]) / (self.reference[2].abs() + 1e-8)).clamp(-5, 5)
            metrics.update(
                {
                    "er/bonus_mean": float(bonus.mean()),
                    "er/shaped_frac": float((rollout.advantages != before).float().mean()),
                    "er/tendency": float(torch.sigmoid(self.gain * deviation).mean()),
                    "er/advantage_change": float((rollout.advantages - before).abs().mean()),
                }
            )
            means = (1 - self.ema_rate) * self.reference + self.ema_rate * means
        self.reference = means
        log_metrics(trainer, metrics)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reference": None if self.reference is None else self.reference.clone()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        reference = state_dict.get("reference")
        self.reference = None if reference is None else torch.as_tensor(reference, dtype=torch.float64)
