"""The policy-loss seam: what every loss receives (:class:`LossInput`) and returns (:class:`LossOutput`), and the
base class :class:`PolicyLoss` whose hooks the module calls.

A loss turns the log-probs of one micro-batch's sampled tokens into a per-token loss; the module then multiplies
it by the importance weights of an engine that samples with its own copy (:mod:`relax_pl.correction`), reduces it
(:func:`relax_pl.objectives.aggregate`, the mini-batch's normaliser) and adds the KL, entropy and callback terms.
So a loss never sees micro-batching, aggregation or the engine: only tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from relax_pl.objectives import LossAggregation

if TYPE_CHECKING:
    from relax_pl.extension import MiniBatch


@dataclass
class LossInput:
    """One micro-batch's tokens (or, in :meth:`PolicyLoss.select`, the whole mini-batch's), at the response
    positions: per-token tensors are ``(B, T)``, ``mask`` is True on each response's own tokens."""

    logp: Tensor  # log-probabilities of the sampled tokens under the current policy (with grad in __call__)
    old_logp: Tensor  # the same under the policy that sampled them, detached (== logp.detach() in one on-policy pass)
    advantages: Tensor  # (B,) one detached scalar per response
    mask: Tensor  # bool
    selected: Tensor | None = None  # bool: the tokens select() chose over the mini-batch, rows of this micro-batch


@dataclass
class LossOutput:
    """A per-token loss (the module aggregates it) and the loss's own statistics: detached scalar tensors over this
    micro-batch's tokens, logged under their names (averaged over the step's micro-batches)."""

    per_token: Tensor  # (B, T)
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdatePlan:
    """How often the policy is updated on one rollout (``model.update``), for :meth:`PolicyLoss.check`."""

    ppo_epochs: int
    mini_batch_size: int | None  # responses per optimiser step; None: the whole rollout
    responses_per_step: int | None  # None when the data module does not say

    @property
    def single_pass(self) -> bool:
        """One optimiser step per rollout: the policy being updated is the one that sampled, so ``logp == old_logp``
        in value throughout the update."""
        whole = self.mini_batch_size is None or (
            self.responses_per_step is not None and self.mini_batch_size >= self.responses_per_step
        )
        return self.ppo_epochs == 1 and whole


class PolicyLoss:
    """Base class of the policy losses (recipe key ``model.objective.policy_loss``, a ``class_path``).

    A loss takes its settings as constructor arguments (the recipe's ``init_args``) and implements
    :meth:`__call__`. Optional hooks:

    * :meth:`select`: choose tokens over the *whole mini-batch* before its first micro-batch (Clip-Cov and KL-Cov
      centre a covariance and count a budget over it); ``__call__`` then finds the choice in ``batch.selected``.
      When the mini-batch takes several micro-batches this costs one extra no-grad forward over it.
    * :meth:`check`: refuse an update plan under which the loss would compute something else than asked (before
      any weights are read).
    * ``aggregation``: a loss that only makes sense reduced one way declares it (GSPO: ``seq-mean-token-mean``,
      DrGRPO: ``seq-mean-token-sum-norm``); ``model.objective.loss_agg`` then defaults to it, and a recipe that asks
      for another is refused.
    * ``scale_advantages``: likewise for dividing the group advantages by the group's std (DrGRPO: False);
      ``model.objective.scale_advantages`` defaults to it, and a recipe that asks otherwise is refused.

    Example::

        class Reinforce(PolicyLoss):
            def __call__(self, batch: LossInput) -> LossOutput:
                return LossOutput(-batch.advantages[:, None] * batch.logp)
    """

    aggregation: LossAggregation | None = None
    scale_advantages: bool | None = None

    def __call__(self, batch: LossInput) -> LossOutput:
        """The per-token loss of ``batch`` (a micro-batch) and this loss's statistics."""
        raise NotImplementedError(f"{type(self).__name__} implements no __call__")

    def select(self, batch: LossInput) -> Tensor:
        """``(B, T)`` bool: the tokens this loss acts on, chosen over the whole mini-batch (``batch.logp`` detached)."""
        raise NotImplementedError(f"{type(self).__name__} chooses no tokens")

    @property
    def selects_tokens(self) -> bool:
        """Whether this loss implements :meth:`select`."""
        return type(self).select is not PolicyLoss.select

    def check(self, plan: UpdatePlan) -> None:
        """Raise, naming the recipe key to change, when ``plan`` defeats this loss."""


def mini_batch_selection(policy_loss: PolicyLoss, batch: MiniBatch) -> Tensor | None:
    """The tokens ``policy_loss`` chooses over the whole mini-batch (:meth:`PolicyLoss.select`), ``(N, T)`` over the
    rollout's rows; None when it chooses none, or when the mini-batch is one micro-batch (whose forward then chooses
    them itself). Costs a no-grad forward over the mini-batch, in float64 so that the covariance's centring does not
    depend on how the rows are cut."""
    if not policy_loss.selects_tokens or len(batch.micro_batches) == 1:
        return None
    rollout, rows = batch.rollout, batch.rows
    logp = torch.zeros(len(rollout), rollout.response_mask.shape[1], dtype=torch.float64, device=rows.device)
    for part in batch.forward(rows, False):
        logp[part.rows, : part.logp.shape[1]] = part.logp.double()
    old_logp = logp[rows] if rollout.old_logp is None else rollout.old_logp[rows]
    selected = torch.zeros_like(rollout.response_mask)
    selected[rows] = policy_loss.select(
        LossInput(logp[rows], old_logp, rollout.advantages[rows], rollout.response_mask[rows])
    )
    return selected
