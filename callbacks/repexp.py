"""RepExp: representation-based exploration, an elliptical novelty bonus on the reward (arXiv 2510.11686)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from relax_pl import objectives as obj
from relax_pl.callbacks.koopman_fit import log_metrics
from relax_pl.extension import DetachedForward, RLVRCallback
from relax_pl.metrics import correctness_or_overall
from relax_pl.rollout import RolloutBatch


def mean_pooled(hidden: Tensor, mask: Tensor) -> Tensor:
    """``h_bar_i = (1/T_i) sum_t h_{i,t}`` over each response's own tokens, ``(B, d)`` (RepExp's feature vector)."""
    weights = mask.to(hidden.dtype)
    return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)


def sparse_random_projection(d: int, k: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """A ``(d, k)`` very sparse random projection (Li, Hastie and Church 2006): with density ``s = 1/sqrt(d)`` each
    entry is ``+-1/sqrt(s k)`` with probability ``s/2`` each and 0 otherwise, so ``E[||x P||^2] = ||x||^2``.
    This is scikit-learn's ``SparseRandomProjection(density="auto")``, which the authors' code draws."""
    density = 1 / math.sqrt(d)
    draw = torch.rand(d, k, generator=generator, dtype=torch.float64)
    sign = torch.where(draw < density / 2, -1.0, 1.0)
    return torch.where(draw < density, sign / math.sqrt(density * k), 0.0).to(dtype)


def group_leverage(features: Tensor, group_index: Tensor, lam: float) -> Tensor:
    """The elliptical bonus of each response against its own prompt group (RepExp, the authors' ``leverage``):

    ``b_i = c_i^T (lam I + sum_{j in g} c_j c_j^T)^{-1} c_i``, ``c_i = phi_i - mean_{j in g} phi_j``,

    with ``phi`` the (projected) features. The covariance holds every response of the group, ``i`` included
    (what the authors' code folds in by Sherman-Morrison rank-1 updates before it reads the bonuses). By the
    push-through identity the ``k x k`` inverse is never formed: ``b_g = diag(G (G + lam I)^{-1})`` with the
    group's Gram matrix ``G = C C^T``, one ``n x n`` solve per group. Each ``b_i`` lies in ``[0, 1)``.
    """
    bonus = torch.zeros(features.shape[0], dtype=features.dtype, device=features.device)
    for group in group_index.unique():
        members = (group_index == group).nonzero().squeeze(-1)
        centred = features[members] - features[members].mean(0)
        gram = centred @ centred.T
        eye = torch.eye(len(members), dtype=features.dtype, device=features.device)
        bonus[members] = torch.linalg.solve(gram + lam * eye, gram).diagonal()
    return bonus


@dataclass
class PromptCovariance:
    """One prompt's running sums over every projected feature seen for it: ``S = sum phi phi^T``, ``sum phi``, n."""

    scatter: Tensor
    total: Tensor
    count: int = 0

    @classmethod
    def empty(cls, width: int) -> PromptCovariance:
        return cls(torch.zeros(width, width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64))


def accumulated_leverage(features: Tensor, state: PromptCovariance, lam: float) -> Tensor:
    """The elliptical bonus of one prompt group against every response seen for that prompt so far (the authors'
    ``persist_covariance=True``): fold the group into the prompt's running sums, then

    ``b_i = (phi_i - mu)^T (lam I + sum_j phi_j phi_j^T - n mu mu^T)^{-1} (phi_i - mu)``,

    ``j`` over the ``n`` responses seen for the prompt (this group's included) and ``mu`` their running mean. The
    code folds the uncentred ``phi`` into ``(lam I + S)^{-1}`` by Sherman-Morrison and removes ``n mu mu^T`` with one
    more; a solve of the same matrix gives the same bonus. On a fresh state this is :func:`group_leverage`.
    Updates ``state`` in place."""
    state.scatter += features.T @ features
    state.total += features.sum(0)
    state.count += features.shape[0]
    mu = state.total / state.count
    eye = torch.eye(features.shape[-1], dtype=features.dtype, device=features.device)
    covariance = lam * eye + state.scatter - state.count * torch.outer(mu, mu)
    centred = features - mu
    return (centred * torch.linalg.solve(covariance, centred.T).T).sum(-1)


def bonus_shaped_advantages(
    advantages: Tensor, rewards: Tensor, bonus: Tensor, group_size: int, scale: bool = True
) -> Tensor:
    """``advantages + A(r + bonus) - A(r)`` with ``A`` the GRPO advantage: the paper's ``A(r')`` of the bonus-shaped
    reward (step 4 of :class:`RepExp`) when ``advantages`` are the plain ``A(r)``, and a shaping that ran before
    (EffectiveRankShaping first in the recipe) kept rather than recomputed away."""
    shaped = obj.group_advantages(rewards + bonus.to(rewards.dtype), group_size, scale=scale)
    return advantages + (shaped - obj.group_advantages(rewards, group_size, scale=scale)).to(advantages.dtype)


def prompt_key(rollout: RolloutBatch, row: int) -> str:
    """The identity of a response's prompt across steps: a hash of its prompt tokens (two rows with the same text
    and different images share one)."""
    tokens = rollout.input_ids[row, : rollout.prompt_length][rollout.attention_mask[row, : rollout.prompt_length] > 0]
    return hashlib.sha1(tokens.cpu().numpy().astype("int64").tobytes()).hexdigest()


class RepExp(RLVRCallback):
    """Adds RepExp's elliptical novelty bonus to each response's reward before the GRPO advantage (arXiv 2510.11686;
    the authors' code is the ``rep_exp`` recipe of verl).

    Per step and per prompt group ``g`` (the paper's RL post-training; the code's ``EllipticalRewardModelWorker``):

    1. pooling: ``h_bar_i``, the mean of the final hidden states over response ``i``'s tokens (:func:`mean_pooled`);
    2. projection: ``phi_i = h_bar_i P`` with a very sparse random ``P`` of ``sparse_dim`` columns, drawn again
       every step (:func:`sparse_random_projection`);
    3. bonus: ``b_i = c_i^T (lam I + sum_{j in g} c_j c_j^T)^{-1} c_i`` with ``c`` the group-centred ``phi``
       (:func:`group_leverage`); ``b_i = 0`` for every response of a group with no correct one
       (``gate_none_correct``; correct: :func:`relax_pl.metrics.correctness_or_overall` > 0, the accuracy component
       when the reward has one, where the code reads the summed reward, which a format bonus would make positive);
    4. reward: ``r'_i = r_i + beta * b_i``, and the advantages are the GRPO ones of ``r'``
       (``model.objective.scale_advantages`` or the loss's own, as for the plain reward); a shaping of the
       advantages by a callback before this one is kept (:func:`bonus_shaped_advantages`).

    The covariance lives one step and one group, as in the paper's runs (``persist_covariance=False``). With
    ``persist_covariance=True`` (the code's other setting) each prompt keeps the running sums of every response
    sampled for it in earlier steps, so a response is novel against all of the prompt's past answers
    (:func:`accumulated_leverage`); the sums are the callback's state (``state_dict``: saved in checkpoints, a
    resumed run continues them), and the projection must stay fixed (``redraw_projection=False``), since sums in
    different random bases do not add up. The projection of the step that starts at optimiser step ``t`` is drawn
    from ``seed + t``, so a resumed run draws the same one.

    Defaults are the paper's (its script ``train_elliptical.sh`` for MATH and GSM8K): ``beta=0.01``, ``lam=0.01``,
    ``sparse_dim=32`` (128 for DAPO+AIME), projection redrawn every step, bonus off for groups with no correct
    response, leverage with the response itself in the covariance. Where the code's yaml defaults differ
    (``sparse_dim=512``, ``beta=1.0``, leave-one-out bonus), the default follows the paper's script, which is what
    the paper's figures ran.

    ``representation="reference"`` (default) reads the frozen pre-trained model, as the paper ("the pre-trained
    language model's hidden states") and its code (a frozen copy loaded from the initial checkpoint) do: one
    no-grad reference forward per step. ``"policy"`` reads the current policy instead, in the step's shared forward
    (extension.py), so it adds no forward to a run that already reads hidden states (ReLaX, EffectiveRankShaping,
    SpectrumMonitor).

    Logged once per step: ``repexp/bonus_mean`` (raw ``b`` over all responses), ``repexp/bonus_group_std`` (its
    spread within groups, the part the GRPO advantage sees), ``repexp/bonus_correct`` and ``repexp/bonus_incorrect``,
    ``repexp/gated_frac`` (responses whose group got no bonus) and ``repexp/advantage_change`` (mean ``|A' - A|``).

    With ``n`` responses a group and ``n - 1 <= sparse_dim``, every ``b_i`` tends to ``(n - 1) / n`` when ``lam``
    is small against the features' spread; the bonus then tells responses apart only through ``lam``
    (docs/method.md section 13).

    Args:
        beta: weight of the bonus in the reward (paper: 0.01).
        lam: ridge ``lambda`` of the covariance (paper: 0.01).
        sparse_dim: columns of the random projection (paper: 32 for MATH/GSM8K, 128 for DAPO+AIME); 0 keeps the
            full hidden size.
        redraw_projection: draw a new projection every step (paper); False keeps the one of ``seed``.
        gate_none_correct: no bonus for the groups with no correct response (paper: on).
        representation: "reference" (the pre-trained model, paper) or "policy" (the current policy).
        seed: seeds the projection.
        persist_covariance: keep each prompt's covariance across steps (code's option; paper's runs: off). Needs
            ``redraw_projection=False``, ``sparse_dim > 0`` and one device (the sums live in this process).

    Raises:
        ValueError: on a bad argument.
    """

    def __init__(
        self,
        beta: float = 0.01,
        lam: float = 0.01,
        sparse_dim: int = 32,
        redraw_projection: bool = True,
        gate_none_correct: bool = True,
        representation: Literal["reference", "policy"] = "reference",
        seed: int = 0,
        persist_covariance: bool = False,
    ) -> None:
        if beta < 0 or lam <= 0 or sparse_dim < 0:
            raise ValueError(f"RepExp needs beta >= 0, lam > 0 and sparse_dim >= 0; got {beta=}, {lam=}, {sparse_dim=}")
        if representation not in ("reference", "policy"):
            raise ValueError(f"RepExp: representation must be 'reference' or 'policy', got {representation!r}")
        if persist_covariance and (redraw_projection or not sparse_dim):
            raise ValueError(
                "RepExp(persist_covariance=True) adds up features across steps, so they must share one projection: "
                f"set redraw_projection: false and sparse_dim > 0 (got {redraw_projection=}, {sparse_dim=})"
            )
        self.beta, self.lam, self.sparse_dim, self.redraw_projection = beta, lam, sparse_dim, redraw_projection
        self.gate_none_correct, self.representation, self.seed = gate_none_correct, representation, seed
        self.persist_covariance = persist_covariance
        self.covariances: dict[str, PromptCovariance] = {}  # prompt key -> running sums (persist_covariance)
        self._pooled: Tensor | None = None  # (N, d) of this step's rollout, from the shared forward

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.persist_covariance and trainer.world_size > 1:
            raise ValueError(
                f"RepExp(persist_covariance=True) keeps each prompt's covariance in one process; this run has "
                f"{trainer.world_size} devices, each seeing other prompts. Use one device or persist_covariance: false"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        if not self.persist_covariance:
            return {}
        keys = sorted(self.covariances)
        if not keys:
            return {"keys": []}
        return {
            "keys": keys,
            "scatter": torch.stack([self.covariances[k].scatter for k in keys]),
            "total": torch.stack([self.covariances[k].total for k in keys]),
            "count": torch.tensor([self.covariances[k].count for k in keys]),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keys = state_dict.get("keys", [])
        self.covariances = {
            key: PromptCovariance(state_dict["scatter"][i].double(), state_dict["total"][i].double(),
                                  int(state_dict["count"][i]))
            for i, key in enumerate(keys)
        }

    @property
    def needs_reference(self) -> bool:
        return self.representation == "reference"

    @override
    def rollout_hidden_rows(
        self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch
    ) -> Tensor | None:
        self._pooled = None
        if self.representation != "policy":
            return None
        return torch.arange(len(rollout), device=rollout.input_ids.device)

    @override
    def on_rollout_hidden_states(
        self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch, part: DetachedForward
    ) -> None:
        if self.representation != "policy":
            return
        if self._pooled is None:
            width = part.hidden.shape[-1]
            self._pooled = torch.zeros(len(rollout), width, dtype=torch.float64, device=part.rows.device)
        self._pooled[part.rows] = mean_pooled(part.hidden.double(), part.response_mask)

    @override
    def on_rollout_end(self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch) -> None:
        if not len(rollout):
            return
        features = self._pooled if self.representation == "policy" else self.reference_features(module, rollout)
        if features is None:
            raise RuntimeError("RepExp(representation='policy') got no hidden states from the shared forward")
        bonus = self.bonus(features, rollout, trainer.global_step)
        correct = correctness_or_overall(rollout.reward_components) > 0
        gated = torch.zeros_like(correct)
        if self.gate_none_correct:
            any_correct = torch.zeros(int(rollout.group_index.max()) + 1, dtype=torch.bool, device=correct.device)
            any_correct.index_put_((rollout.group_index,), correct, accumulate=True)
            gated = ~any_correct[rollout.group_index]
        before = rollout.advantages
        rollout.advantages = bonus_shaped_advantages(
            before, rollout.rewards, self.beta * torch.where(gated, 0.0, bonus), rollout.group_size,
            scale=module.objective.advantages_scaled,
        )
        metrics = {
            "repexp/bonus_mean": float(bonus.mean()),
            "repexp/bonus_group_std": float(bonus.view(-1, rollout.group_size).std(1).mean()),
            "repexp/gated_frac": float(gated.float().mean()),
            "repexp/advantage_change": float((rollout.advantages - before).abs().mean()),
        }
        for name, rows in (("correct", correct), ("incorrect", ~correct)):
            if rows.any():
                metrics[f"repexp/bonus_{name}"] = float(bonus[rows].mean())
        log_metrics(trainer, metrics)

    def reference_features(self, module: L.LightningModule, rollout: RolloutBatch) -> Tensor:
        """Pooled hidden states of the frozen pre-trained model (the reference policy), ``(N, d)`` float64."""
        pairs = module.reference_hidden_states(rollout)
        return torch.cat([mean_pooled(hidden.double(), mask) for hidden, mask in pairs])

    def bonus(self, features: Tensor, rollout: RolloutBatch, step: int) -> Tensor:
        """Raw ``b_i`` of every response (steps 2-3 above), float64."""
        features = features.double()
        if self.sparse_dim:
            seed = self.seed + (step if self.redraw_projection else 0)
            projection = sparse_random_projection(
                features.shape[-1], self.sparse_dim, torch.Generator().manual_seed(seed)
            )
            features = features @ projection.to(features.device)
        if not self.persist_covariance:
            return group_leverage(features, rollout.group_index, self.lam)
        bonus = torch.zeros(features.shape[0], dtype=features.dtype)
        features = features.cpu()
        for group in rollout.group_index.unique().tolist():
            members = (rollout.group_index == group).nonzero().squeeze(-1).cpu()
            key = prompt_key(rollout, int(members[0]))
            state = self.covariances.setdefault(key, PromptCovariance.empty(features.shape[-1]))
            bonus[members] = accumulated_leverage(features[members], state, self.lam)
        return bonus.to(rollout.group_index.device)
