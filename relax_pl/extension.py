"""The one extension point through which callbacks reach an RL step.

RLVRModule imports no callback. A callback that wants to take part in the update subclasses
:class:`RLVRCallback` and implements one or both hooks:

* ``on_rollout_end(trainer, module, rollout)``: sees each step's scored rollout before the update (for
  example to fit a Koopman dictionary on the first step). ``module.response_hidden_states(rollout)`` gives
  the final-norm hidden states of the rollout's responses without gradient.
* ``policy_loss_terms(trainer, module, forward)``: called on every micro-batch of the policy update with a
  :class:`PolicyForward`; returns :class:`LossTerms` whose losses are added to the policy loss before
  ``backward`` and whose metrics are logged (averaged over the step's micro-batches).

Set ``needs_hidden_states = True`` on the callback class to have ``forward.hidden`` filled: the module then
captures the final norm's output with a forward hook (never ``output_hidden_states=True``, which keeps
every layer). Set ``needs_reference = True`` to have ``forward.reference_kl`` available: it computes the KL
to the reference policy of the rows a callback selects, running the reference forward over those rows only
(all rows up front when the objective has its own KL term, or on sharded ranks, which must run in lockstep).

Example::

    class LengthPenalty(RLVRCallback):
        def policy_loss_terms(self, trainer, module, forward):
            lengths = forward.response_mask.sum(-1).float()
            return LossTerms(losses={"length_penalty": 1e-4 * lengths.mean()})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import lightning as L
from torch import Tensor

if TYPE_CHECKING:
    from relax_pl.rollout import RolloutBatch


@dataclass
class PolicyForward:
    """What the policy-update forward of one micro-batch exposes to callbacks.

    All tensors cover the response positions only: index ``t`` is the ``t``-th generated token of a row.
    """

    response_mask: Tensor  # (B, T) bool: True on each response's own tokens (EOS included), False on padding
    logp: Tensor  # (B, T) log-probabilities of the sampled tokens under the current policy, with grad
    advantages: Tensor  # (B,) one detached scalar advantage per response
    group_index: Tensor  # (B,) long: responses of the same prompt share an index
    hidden: Tensor | None = None  # (B, T, d) final-norm hidden states with grad, if a callback needs them
    # reference_kl(selected) -> (S, T): per-token KL to the reference (model.objective.kl_estimator) of the rows
    # picked by the bool mask ``selected`` (B,), with grad; None unless a callback or the objective needs a reference
    reference_kl: Callable[[Tensor], Tensor] | None = None
    loss_agg_mode: str = "token-mean"  # how the module aggregates per-token losses (objectives.aggregate)
    global_step: int = 0


@dataclass
class LossTerms:
    """Named loss terms (added to the policy loss) and metrics (logged only) from one callback."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class RLVRCallback(L.Callback):
    """A Lightning callback that can also see rollouts and add terms to the policy loss."""

    needs_hidden_states: bool = False
    needs_reference: bool = False

    def on_rollout_end(self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch) -> None:
        """Called once per training step, after rewards and advantages, before the update."""

    def policy_loss_terms(
        self, trainer: L.Trainer, module: L.LightningModule, forward: PolicyForward
    ) -> LossTerms | None:
        """Called on every update micro-batch; return loss terms and metrics, or None."""
        return None


def rlvr_callbacks(trainer: L.Trainer) -> list[RLVRCallback]:
    """The trainer's callbacks that implement the extension point, in their configured order."""
    return [cb for cb in trainer.callbacks if isinstance(cb, RLVRCallback)]
