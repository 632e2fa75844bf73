"""The one extension point through which callbacks reach an RL step.

RLVRModule imports no callback. A callback that wants to take part in the update subclasses
:class:`RLVRCallback` and implements any of these hooks:

* ``on_rollout_end(trainer, module, rollout)``: sees each step's scored rollout before the update (for
  example to fit a Koopman dictionary on the first step, or to shape the advantages).
  ``module.response_hidden_states(rollout)`` gives the final-norm hidden states of the rollout's responses without
  gradient.
* ``rollout_hidden_rows(trainer, module, rollout)`` and ``on_rollout_hidden_states(trainer, module, rollout,
  part)``: the shared capture. Before ``on_rollout_end`` the module runs *one* no-grad forward over the union of
  the rows that every callback's ``rollout_hidden_rows`` asks for, and hands each chunk of it (a
  :class:`DetachedForward` with hidden states) to each of those callbacks; when the update needs the old policy's
  log-probs and the union is the whole rollout, the same forward gives them. However many latent callbacks run
  (KoopmanFit's fit, RepExp, EffectiveRankShaping, SpectrumMonitor, LatentExploration's DSDs measured ahead of
  a first mini-batch that is the whole rollout), the rollout is read once per step.
* ``on_mini_batch_start(trainer, module, mini_batch)``: called before the first micro-batch of every
  optimiser step with a :class:`MiniBatch`: its rows, how they are cut into micro-batches and a no-grad
  forward over any of its rows. A term that couples responses (a log-mean-exp over a prompt's group, a
  quantile over the batch) reads what it needs of the other micro-batches here, so that its loss and gradient
  do not depend on ``micro_batch_size``.
* ``policy_loss_terms(trainer, module, forward)``: called on every micro-batch of the policy update with a
  :class:`PolicyForward` (log-probs, entropy, old log-probs, advantages, rewards, the response mask and the
  aggregation normaliser; hidden states and the reference KL on request); returns :class:`LossTerms` whose losses
  are added to the policy loss before ``backward`` and whose metrics are logged (averaged over the step's
  micro-batches).

A callback keeps its own state (a fitted dictionary, a calibration) in its own ``state_dict`` /
``load_state_dict``, which Lightning saves in every checkpoint; it reads another callback's state only through that
callback's methods (``KoopmanFit.ensure_fitted``, ``dictionary_on``) and never writes it.

The loss contract: a returned loss is *this micro-batch's share* of the mini-batch loss; the module adds it
unscaled, and the shares of a mini-batch's micro-batches add up to the term over the whole mini-batch (what one
micro-batch holding every row would return). ``forward.aggregate(per_token)`` reduces a per-token term exactly
as the module reduces the policy loss (same mode, same mini-batch normaliser); ``forward.mean_over_responses``
averages a per-response term over the mini-batch.

Set ``needs_hidden_states = True`` on the callback class to have ``forward.hidden`` filled: the module then
captures the final norm's output with a forward hook (never ``output_hidden_states=True``, which keeps
every layer). Set ``needs_reference = True`` to have ``forward.reference_kl`` available: it computes the KL
to the reference policy of the rows a callback selects, running the reference forward over those rows only
(all rows up front when the objective has its own KL term, or on sharded ranks, which must run in lockstep).

Example (an entropy bonus on the responses that earned nothing, one file)::

    class EntropyOnFailures(RLVRCallback):
        def __init__(self, coef: float = 0.01):
            self.coef = coef

        def policy_loss_terms(self, trainer, module, forward):
            failed = (forward.rewards <= 0)[:, None] & forward.response_mask
            return LossTerms(losses={"entropy_on_failures": -self.coef * forward.aggregate(forward.entropy * failed)})
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import lightning as L
import torch
from torch import Tensor

from relax_pl import objectives as obj

if TYPE_CHECKING:
    from relax_pl.rollout import RolloutBatch


@dataclass
class DetachedForward:
    """A no-grad policy forward over some rows, at the current parameters (see :meth:`MiniBatch.forward`)."""

    rows: Tensor  # (B,) rollout rows
    logp: Tensor  # (B, T) log-probabilities of the sampled tokens
    response_mask: Tensor  # (B, T) bool
    hidden: Tensor | None  # (B, T, d) final-norm hidden states at the response positions, when asked for


@dataclass
class MiniBatch:
    """The rows of one optimiser step and how the module cuts them into micro-batches.

    ``micro_batches`` are consecutive slices of ``rows``; each is one forward and backward. The module keeps a
    prompt's responses in one micro-batch whenever ``micro_batch_size`` holds a whole group, so a group is split
    only when it is larger than a micro-batch.
    """

    rollout: RolloutBatch
    rows: Tensor  # (M,) rollout rows, whole prompt groups
    micro_batches: list[Tensor]
    normaliser: float  # what objectives.aggregate divides by: response tokens (token-mean) or responses (the others)
    loss_agg_mode: str
    # forward(rows, keep_hidden) -> DetachedForward chunks of at most micro_batch_size rows, no grad
    forward: Callable[[Tensor, bool], Iterator[DetachedForward]]

    @classmethod
    def shuffled(
        cls,
        rollout: RolloutBatch,
        mini_batch_size: int | None,
        micro_batch_size: int,
        loss_agg_mode: str,
        forward: Callable[[Tensor, bool], Iterator[DetachedForward]],
    ) -> list[MiniBatch]:
        """One epoch of optimiser steps over ``rollout``: its groups in random order (whole groups), ``mini_batch_size``
        responses per step (None: all), each step :meth:`cut` into micro-batches."""
        order = torch.randperm(len(rollout) // rollout.group_size)
        rows = (order[:, None] * rollout.group_size + torch.arange(rollout.group_size)).reshape(-1)
        rows = rows.to(rollout.input_ids.device)
        return [
            cls.cut(rollout, part, micro_batch_size, loss_agg_mode, forward)
            for part in rows.split(mini_batch_size or len(rollout))
        ]

    @classmethod
    def cut(
        cls,
        rollout: RolloutBatch,
        rows: Tensor,
        micro_batch_size: int,
        loss_agg_mode: str,
        forward: Callable[[Tensor, bool], Iterator[DetachedForward]],
    ) -> MiniBatch:
        """``rows`` cut into micro-batches of at most ``micro_batch_size`` responses, each holding whole groups
        whenever ``micro_batch_size`` holds one (so group-level terms need no extra forward)."""
        size = whole_group_micro_size(rollout.group_size, micro_batch_size)
        mask = rollout.response_mask[rows]
        normaliser = float(mask.sum()) if loss_agg_mode == "token-mean" else float(len(rows))
        return cls(rollout, rows, list(rows.split(size)), normaliser, loss_agg_mode, forward)

    @property
    def split_rows(self) -> Tensor:
        """The rows whose prompt group is spread over more than one micro-batch."""
        groups = self.rollout.group_index
        micro_of = torch.cat([torch.full_like(rows, k) for k, rows in enumerate(self.micro_batches)])
        rows = torch.cat(self.micro_batches)
        first = torch.full_like(groups, -1).scatter_reduce(0, groups[rows], micro_of, "amin", include_self=False)
        last = torch.full_like(groups, -1).scatter_reduce(0, groups[rows], micro_of, "amax", include_self=False)
        return rows[first[groups[rows]] != last[groups[rows]]]


def whole_group_micro_size(group_size: int, micro_batch_size: int) -> int:
    """The rows of a micro-batch: ``micro_batch_size`` rounded down to whole groups when it holds one."""
    return micro_batch_size - micro_batch_size % group_size if group_size <= micro_batch_size else micro_batch_size


@dataclass
class PolicyForward:
    """What the policy-update forward of one micro-batch exposes to callbacks.

    All per-token tensors cover the response positions only: index ``t`` is the ``t``-th generated token of a row.
    """

    response_mask: Tensor  # (B, T) bool: True on each response's own tokens (EOS included), False on padding
    logp: Tensor  # (B, T) log-probabilities of the sampled tokens under the current policy, with grad
    advantages: Tensor  # (B,) one detached scalar advantage per response
    group_index: Tensor  # (B,) long: responses of the same prompt share an index
    rows: Tensor | None = None  # (B,) the rollout rows of this micro-batch (keys into MiniBatch statistics)
    entropy: Tensor | None = None  # (B, T) true entropy of each next-token distribution, with grad
    # (B, T) log-probs of the sampled tokens under the policy that sampled them, detached (in one on-policy pass:
    # logp.detach(), so logp - old_logp is 0 in value and carries the gradient of logp)
    old_logp: Tensor | None = None
    rewards: Tensor | None = None  # (B,) each response's overall reward (rollout.reward_components has the parts)
    hidden: Tensor | None = None  # (B, T, d) final-norm hidden states with grad, if a callback needs them
    # (B, T, d) the final-norm states that predict each response token (the vocabulary projection's input), with
    # grad: register a hook on it to see the gradient every logp-based term sends to the final hidden states
    head_hidden: Tensor | None = None
    # reference_kl(selected) -> (S, T): per-token KL to the reference (model.objective.kl_estimator) of the rows
    # picked by the bool mask ``selected`` (B,), with grad; None unless a callback or the objective needs a reference
    reference_kl: Callable[[Tensor], Tensor] | None = None
    loss_agg_mode: str = "token-mean"  # how the module aggregates per-token losses (objectives.aggregate)
    normaliser: float | None = None  # the mini-batch's aggregation denominator (None: this micro-batch's own)
    mini_batch_responses: int | None = None  # responses in the mini-batch (None: this micro-batch's)
    # the sampling limit: every response is padded to it in some layouts; seq-mean-token-sum-norm divides by it
    max_new_tokens: int | None = None
    global_step: int = 0

    def aggregate(self, values: Tensor) -> Tensor:
        """This micro-batch's share of a per-token term reduced as the policy loss is (Eq. of
        :func:`relax_pl.objectives.aggregate`, with the mini-batch's normaliser)."""
        return obj.aggregate(values, self.response_mask, self.loss_agg_mode, self.normaliser, self.max_new_tokens)

    def mean_over_responses(self, values: Tensor) -> Tensor:
        """This micro-batch's share of the mean of a per-response term over the mini-batch."""
        return values.sum() / (self.mini_batch_responses or values.shape[0])


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

    def rollout_hidden_rows(
        self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch
    ) -> Tensor | None:
        """The rows of ``rollout`` whose hidden states this callback reads this step (None: none)."""
        return None

    def on_rollout_hidden_states(
        self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch, part: DetachedForward
    ) -> None:
        """Called with each chunk of the step's shared no-grad forward (``part.rows`` may hold rows other callbacks
        asked for), before ``on_rollout_end``."""

    def on_mini_batch_start(self, trainer: L.Trainer, module: L.LightningModule, mini_batch: MiniBatch) -> None:
        """Called before the first micro-batch of every optimiser step."""

    def policy_loss_terms(
        self, trainer: L.Trainer, module: L.LightningModule, forward: PolicyForward
    ) -> LossTerms | None:
        """Called on every update micro-batch; return loss terms (this micro-batch's shares) and metrics, or None."""
        return None


def import_modules(names: list[str]) -> None:
    """Import the modules a recipe lists under ``imports`` (``--imports``), before anything is built: a module that
    registers something by defining it (a :class:`~relax_pl.families.ModelFamily` adapter, found by ``model_type``
    and never named by a class_path) then takes part in the run.

    Raises:
        ImportError: a module that cannot be imported, named with the reason.
    """
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ImportError(
                f"imports: cannot import {name!r} ({type(error).__name__}: {error}); a module must be importable "
                "from where the run starts (the current folder is on the path, or set PYTHONPATH)"
            ) from error


def rlvr_callbacks(trainer: L.Trainer) -> list[RLVRCallback]:
    """The trainer's callbacks that implement the extension point, in their configured order."""
    return [cb for cb in trainer.callbacks if isinstance(cb, RLVRCallback)]
