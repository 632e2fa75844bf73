"""LatentExploration: the ReLaX loss terms (paper Eq. 10-11 as a loss; docs/method.md section 4)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from relax_pl.callbacks.koopman_fit import KoopmanFit, find_koopman_fit
from relax_pl.extension import (
    DetachedForward, LossTerms, MiniBatch, PolicyForward, RLVRCallback, whole_group_micro_size,
)
from relax_pl.koopman import dsd, has_dsd, resolve_n_min
from relax_pl.rollout import RolloutBatch


def latent_exploration_loss(
    dispersion: Tensor,
    valid: Tensor,
    over: Tensor,
    advantages: Tensor,
    group_index: Tensor,
    *,
    outside_log_sum: Tensor | None = None,
    group_valid_count: Tensor | None = None,
    num_groups: int | None = None,
    group_weight: Tensor | None = None,
) -> Tensor:
    """The share of the rows given of the advantage-shaped log-mean-exp of DSD (paper Eq. 10), a loss to minimise:

    ``L_xp = (1/G) sum_g [ LSE_g - log n_g ]``, ``LSE_g = log sum_{j in g} exp(-z_j)``,
    ``z_j = max(A_j, 0) * (sg(D_j) if over_j else D_j)``,

    over the ``G`` groups (prompts) of the mini-batch that have a valid response (a defined DSD), ``n_g`` valid
    responses each; invalid responses and groups without a valid one take no part. Descending it raises ``D_i``
    only where ``A_i > 0`` and the response is not over-dispersed (``sg`` is stop-gradient).

    A group may be spread over several micro-batches. Each row's share is
    ``(w_i / G) (LSE_g - log n_g - z_i + sg(z_i))`` with the softmin weight ``w_i = exp(-sg(z_i) - LSE_g)``: since
    the ``w_i`` of a group add up to 1, the shares of all micro-batches add up to ``L_xp`` in value and in
    gradient (``dL_xp/dz_i = -w_i / G``), whatever the cut. The whole-group ``LSE_g`` needs the detached ``z_j`` of
    the group's other rows: ``outside_log_sum`` (per row: ``log sum exp(-z_j)`` over its group's valid rows that are
    not given here, ``-inf`` when there are none), ``group_valid_count`` (per row: ``n_g``) and ``num_groups``
    (``G``). Left out, the rows given are taken to be the whole mini-batch.

    ``group_weight`` (per row: a weight of its group, e.g. its share of failed responses) multiplies each group's
    term: ``(1/G) sum_g c_g [LSE_g - log n_g]``, a deviation from Eq. 10 (LatentExploration's
    ``failure_weighting``); the shares still add up, ``c_g`` being constant over a group.
    """
    z = advantages.clamp(min=0).to(dispersion.dtype) * torch.where(over, dispersion.detach(), dispersion)
    z_detached = z.detach()
    groups, inverse = group_index.unique(return_inverse=True)
    member = (inverse[None, :] == torch.arange(len(groups), device=inverse.device)[:, None]) & valid[None, :]  # (G', B)
    present_log_sum = torch.where(member, -z_detached[None, :], -math.inf).logsumexp(-1)[inverse]
    if outside_log_sum is None:
        outside_log_sum = torch.full_like(present_log_sum, -math.inf)
    log_sum = torch.logaddexp(present_log_sum, outside_log_sum.to(present_log_sum.dtype))
    if group_valid_count is None:
        group_valid_count = member.sum(-1)[inverse]
    if num_groups is None:
        num_groups = int(member.any(-1).sum())
    if num_groups == 0 or not valid.any():
        return dispersion.new_zeros(())
    weight = torch.exp(-z_detached - log_sum)
    per_row = weight * (log_sum - group_valid_count.to(z.dtype).clamp(min=1).log() - z + z_detached)
    if group_weight is not None:
        per_row = per_row * group_weight.to(per_row.dtype)
    return torch.where(valid, per_row, 0.0).sum() / num_groups


def dropout_sites(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, float]]:
    """Every dropout probability above 0 in ``model``, as ``(module, attribute, probability)``: ``nn.Dropout.p``
    (a LoRA adapter's, say) and the float ``attention_dropout`` that Hugging Face attention modules apply in training
    mode."""
    sites = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            sites.append((module, "p", module.p))
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            sites.append((module, "attention_dropout", rate))
    return sites


def disable_dropout(model: torch.nn.Module) -> list[str]:
    """Set every dropout probability in ``model`` to 0; returns the ones it changed (``"p=0.05 x 14"``)."""
    changed: dict[str, int] = {}
    for module, attribute, rate in dropout_sites(model):
        setattr(module, attribute, 0.0)
        changed[f"{attribute}={rate:g}"] = changed.get(f"{attribute}={rate:g}", 0) + 1
    return [f"{setting} x {count}" for setting, count in changed.items()]


def most_rows_of_any_rank(rows: int, device: torch.device) -> int:
    """The largest ``rows`` over the ranks of the process group (``rows`` itself without one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    count = torch.tensor([rows], device=device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count)


@dataclass
class MiniBatchDispersion:
    """What LatentExploration knows of a mini-batch before its first micro-batch."""

    num_groups: int  # groups with at least one valid response
    group_index: Tensor  # (N,) over the rollout's rows: the prompt group
    advantages: Tensor  # (N,)
    valid: Tensor  # (N,) has a defined DSD (rows of this mini-batch only)
    group_valid_count: Tensor  # (N,) n_g of each row's group
    known: Tensor  # (N,) detached DSD of rows measured ahead (NaN elsewhere)
    xi: float | None = None  # the quantile bound over the mini-batch, when measured ahead
    group_weight: Tensor | None = None  # (N,) failure_weighting: the share of failed responses in the row's group


@dataclass
class StepRecord:
    """Per-step sums for the metrics LatentExploration logs at the end of each step."""

    dsd: list[Tensor] = field(default_factory=list)
    advantages: list[Tensor] = field(default_factory=list)  # of the same (valid) rows
    l_xp: float = 0.0
    mini_batches: int = 0
    rows: int = 0
    valid: int = 0
    over: int = 0  # valid responses over xi
    gated: int = 0
    xi: list[float] = field(default_factory=list)
    xp_grad_sq: Tensor | float = 0.0
    rest_grad_sq: Tensor | float = 0.0
    mini_xp_grad_sq: Tensor | float = 0.0  # the running optimiser step's, for the alpha controller
    mini_rest_grad_sq: Tensor | float = 0.0
    lookahead_gap: float | None = None  # largest |DSD of the update - DSD measured ahead| of a split group's row
    forward_ahead: int = 0  # rows measured ahead by a forward of this callback's own (not the shared read)
    seconds: float = 0.0


@dataclass
class AlphaController:
    """Steers alpha so that ``relax/grad_share`` stays near ``target`` (opt-in; beyond the paper, which fixes alpha).

    grad_share is proportional to alpha on a given batch (it is ``alpha |dL_xp/dh| / |d rest/dh|``), so each
    optimiser step yields a sensitivity ``share / alpha``; its running mean ``S`` (``S <- (1 - rate) S + rate s``)
    sets the next alpha multiplicatively, ``alpha <- alpha * (target / (alpha S))``, i.e. ``target / S``, bounded by
    ``bounds``. A step in which nothing could move (no row with A > 0 and a DSD under xi) leaves both unchanged."""

    target: float
    bounds: tuple[float, float]
    rate: float = 0.3
    sensitivity: float | None = None  # running mean of share / alpha

    def update(self, alpha: float, share: float) -> float:
        """The alpha of the next optimiser step, after one in which ``alpha`` gave ``share``."""
        if not (alpha > 0 and share > 0 and math.isfinite(share)):
            return alpha
        measured = share / alpha
        self.sensitivity = measured if self.sensitivity is None else (
            (1 - self.rate) * self.sensitivity + self.rate * measured)
        low, high = self.bounds
        return min(max(self.target / self.sensitivity, low), high)  # alpha * target / (predicted share alpha S)


class LatentExploration(RLVRCallback):
    """Adds ReLaX's latent-exploration term and its adaptive (gated) KL to the policy update (paper Eq. 11).

    With ``D_i`` the DSD of response ``i`` under KoopmanFit's frozen dictionary, measured on the current policy's
    final-norm hidden states, and ``a_i = max(A_i, 0)``: ``over_i = valid_i and D_i > xi`` (detached); the loss
    gains ``alpha * L_xp`` (:func:`latent_exploration_loss`, over whole prompt groups) and ``kl_coef`` times the
    per-token KL to the reference of the gated responses (``gate_i = over_i``, and ``A_i > 0`` when
    ``gate_positive_only``, as in the authors' code; False gives the paper's set I), aggregated exactly as the
    policy loss is. Neither depends on ``model.update.micro_batch_size``: a group that micro-batches split has the
    DSDs of its other rows measured ahead, by a no-grad forward over those rows at the start of the optimiser
    step (free when micro-batches hold whole groups).

    The threshold ``xi`` (in the units of ``spectrum``):

    * ``absolute``: ``xi`` as given. The paper's 25 (Table 3) is in the authors' units (``sv_compat``); eigenvalue
      DSD stays below ~0.25, so there a bound near the DSDs actually seen is needed.
    * ``relative``: ``xi_scale`` times the median DSD of the responses KoopmanFit fitted on (the first rollout),
      measured once and kept in this callback's checkpointed state.
    * ``quantile``: the ``xi_quantile`` quantile of the mini-batch's valid DSDs (measured ahead when the
      mini-batch takes several micro-batches), so about ``1 - xi_quantile`` of them is over the bound.

    Measuring ahead (a quantile bound, or groups split over micro-batches) takes a no-grad forward of the rows. When
    the step's first mini-batch is the whole rollout (one mini-batch per epoch), it is read from the step's shared
    hidden-state forward instead (extension.py, "the shared capture": the same weights), which the other latent
    callbacks read too and which also gives the old policy's log-probs. Not on the first step (the dictionary is
    fitted from that read, after it) nor for later mini-batches (after an optimiser step): those run their own.

    Defaults are the paper's (Table 3) in the authors' units: ``spectrum="sv_compat"``, ``alpha=0.1``,
    ``xi=25`` absolute, ``kl_coef=0.01``. With ``spectrum="eig"`` the same push takes a larger ``alpha``: compare
    ``relax/grad_share`` (docs/method.md, "Strength").

    Logged once per step: ``relax/dsd_mean|median|p90`` (valid DSDs of the update's forwards), ``relax/valid_frac``,
    ``relax/over_frac`` (valid responses over xi), ``relax/gated_frac`` (gated responses, of all), ``relax/xi``,
    ``relax/alpha``, ``relax/lookahead_dsd_gap`` (split groups: the largest difference between a row's DSD measured
    ahead and in the update, 0 up to rounding), ``relax/l_xp`` (mean over mini-batches), ``relax/grad_share``
    (norm of ``alpha * L_xp``'s gradient at the final hidden states over the norm of every other term's gradient
    there) and ``timing_s/dsd`` (the time of its own DSD forwards; their backward is in ``timing_s/update``, the DSDs
    it reads from the shared forward in ``timing_s/hidden``).

    With ``grad_share_target`` set (opt-in, beyond the paper: docs/method.md, "Strength under control"), ``alpha``
    is only the starting value: after every optimiser step :class:`AlphaController` sets the next one so that
    ``relax/grad_share`` stays near the target, within ``alpha_bounds``; its state is checkpointed, so a resumed run
    continues with the same alpha. ``relax/alpha`` logs the alpha of each step's last optimiser step.

    Args:
        alpha: weight of ``L_xp`` (paper: 0.1); the starting value when ``grad_share_target`` is set.
        grad_share_target: steer alpha so that grad_share stays near this value; None keeps alpha fixed (the paper).
        alpha_bounds: the range the controller keeps alpha in.
        failure_weighting: weight each group's ``L_xp`` term by its share of failed responses (reward at most
            ``failure_threshold``), so the push goes where the group still fails; off by default (a deviation from
            Eq. 10: docs/method.md, "Strength under control").
        failure_threshold: the reward at or below which a response counts as failed.
        xi, xi_mode, xi_scale, xi_quantile: the over-dispersion bound, see above.
        kl_coef: weight of the gated KL (paper's beta: 0.01); 0 turns it off and skips the reference forward.
        gate_positive_only: gate only positive-advantage responses.
        n_min: fewest own transitions for a defined DSD (default 2m, floor m+1).
        eps: ridge of ``X^T X``.
        spectrum: "sv_compat" (the authors' units, singular values of K, responses padded to
            ``model.sampling.max_new_tokens``) or "eig" (eigenvalue magnitudes, each response on its own tokens).

    Raises:
        ValueError: on a bad argument, or (at setup) when the run has no KoopmanFit callback.
    """

    needs_hidden_states = True

    def __init__(
        self,
        alpha: float = 0.1,
        grad_share_target: Optional[float] = None,
        alpha_bounds: tuple[float, float] = (0.01, 5.0),
        failure_weighting: bool = False,
        failure_threshold: float = 0.5,
        xi: float = 25.0,
        xi_mode: Literal["absolute", "relative", "quantile"] = "absolute",
        xi_scale: float = 2.0,
        xi_quantile: float = 0.9,
        kl_coef: float = 0.01,
        gate_positive_only: bool = True,
        n_min: Optional[int] = None,
        eps: float = 1e-3,
        spectrum: Literal["eig", "sv_compat"] = "sv_compat",
    ) -> None:
        if xi_mode not in ("absolute", "relative", "quantile"):
            raise ValueError(f"xi_mode must be 'absolute', 'relative' or 'quantile', got {xi_mode!r}")
        if spectrum not in ("eig", "sv_compat"):
            raise ValueError(f"spectrum must be 'eig' or 'sv_compat', got {spectrum!r}")
        if alpha < 0 or kl_coef < 0 or xi_scale <= 0 or not 0 < xi_quantile < 1 or eps <= 0:
            raise ValueError(
                f"LatentExploration needs alpha >= 0, kl_coef >= 0, xi_scale > 0, 0 < xi_quantile < 1 and eps > 0; "
                f"got {alpha=}, {kl_coef=}, {xi_scale=}, {xi_quantile=}, {eps=}"
            )
        if grad_share_target is not None and not (grad_share_target > 0 and 0 < alpha_bounds[0] <= alpha_bounds[1]):
            raise ValueError(
                f"LatentExploration needs grad_share_target > 0 and 0 < alpha_bounds[0] <= alpha_bounds[1]; got "
                f"{grad_share_target=}, {alpha_bounds=}"
            )
        if grad_share_target is not None and alpha <= 0:
            raise ValueError(f"LatentExploration(grad_share_target=...) needs a starting alpha > 0, got {alpha}")
        self.alpha, self.xi, self.xi_mode, self.xi_scale, self.xi_quantile = alpha, xi, xi_mode, xi_scale, xi_quantile
        self.controller = None if grad_share_target is None else AlphaController(grad_share_target, alpha_bounds)
        self.failure_weighting, self.failure_threshold = failure_weighting, failure_threshold
        self.kl_coef, self.gate_positive_only = kl_coef, gate_positive_only
        self.n_min, self.eps, self.spectrum = n_min, eps, spectrum
        self.calibrated_median: float | None = None  # xi_mode="relative": median DSD of the fitted-on responses
        self._mini: MiniBatchDispersion | None = None
        self._step = StepRecord()
        self._captured: Tensor | None = None  # per rollout row: DSD from the shared forward (NaN: none)

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before any model is loaded
            find_koopman_fit(trainer, "LatentExploration")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Switch the policy's dropout off (a LoRA adapter's 0.05, say): a split group's DSDs measured ahead and those
        of the update's forward must be the same numbers, and with dropout each forward draws other masks."""
        switched = disable_dropout(pl_module.policy)
        if switched:
            rank_zero_info(f"LatentExploration: dropout off in the policy ({', '.join(switched)}): its look-ahead and "
                           "update forwards must see the same hidden states")

    # ------------------------------------------------------------------------------------------------ hooks
    @override
    def on_rollout_end(self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch) -> None:
        fit = find_koopman_fit(trainer, "LatentExploration")
        fit.ensure_fitted(trainer, module, rollout)
        if fit.fitted and self.xi_mode == "relative" and self.calibrated_median is None:
            self.calibrate(trainer, module, rollout, fit)

    def measures_the_rollout_ahead(self, module: L.LightningModule, rollout: RolloutBatch) -> bool:
        """Whether the step's first mini-batch is the whole rollout and measures its DSDs ahead of the update."""
        update, rows = module.update, len(rollout)
        micro = whole_group_micro_size(rollout.group_size, update.micro_batch_size)
        one_mini_batch = update.mini_batch_size is None or update.mini_batch_size >= rows
        return one_mini_batch and rows > micro and (self.xi_mode == "quantile" or rollout.group_size > micro)

    @override
    def rollout_hidden_rows(
        self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch
    ) -> Tensor | None:
        """Every row (the same count on every rank, as sharded forwards need) when the first mini-batch measures the
        whole rollout ahead and the dictionary is fitted (the first step's fit comes from this very forward)."""
        fitted = find_koopman_fit(trainer, "LatentExploration").fitted
        if not fitted or not self.measures_the_rollout_ahead(module, rollout):
            return None
        device = rollout.input_ids.device
        self._captured = torch.full((len(rollout),), math.nan, dtype=torch.float64, device=device)
        return torch.arange(len(rollout), device=device)

    @override
    def on_rollout_hidden_states(
        self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch, part: DetachedForward
    ) -> None:
        if self._captured is None:
            return
        # untimed here: the shared read's phase (timing_s/hidden) holds this, and a phase must not count it twice
        fit = find_koopman_fit(trainer, "LatentExploration")
        values, valid = self.dispersion(fit, part.hidden, part.response_mask, module.sampling.max_new_tokens)
        self._captured[part.rows[valid]] = values.detach()[valid].double()

    def calibrate(self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch, fit: KoopmanFit) -> None:
        """Keep the median DSD of the valid responses of the fit (or, after a resume, of ``rollout``)."""
        trajectories = fit.first_trajectories or fit.trajectories(module, rollout)
        values, valid = fit.dsd_of(
            trajectories, eps=self.eps, n_min=self.n_min, spectrum=self.spectrum,
            padded_length=module.sampling.max_new_tokens,
        )
        if not valid.any():
            lengths = [t.shape[0] for t in trajectories]
            raise ValueError(
                f"LatentExploration(xi_mode='relative') cannot calibrate xi: none of the {len(lengths)} responses "
                f"(lengths {min(lengths)}-{max(lengths)} tokens) has n_min={resolve_n_min(fit.m, self.n_min)} "
                f"transitions; lower n_min (floor m+1={fit.m + 1}), lower KoopmanFit's m or raise "
                f"model.sampling.max_new_tokens"
            )
        self.calibrated_median = trainer.strategy.broadcast(float(values[valid].median()), src=0)

    @override
    def on_mini_batch_start(self, trainer: L.Trainer, module: L.LightningModule, mini_batch: MiniBatch) -> None:
        """Count the mini-batch's groups and valid responses; measure ahead (no grad) the DSD of the rows whose
        group micro-batches split, or of every row for a quantile bound, so that the terms are whole-group ones."""
        self.end_optimizer_step()  # the previous mini-batch's (a no-op before the step's first)
        fit = find_koopman_fit(trainer, "LatentExploration")
        rollout, rows = mini_batch.rollout, mini_batch.rows
        valid = torch.zeros(len(rollout), dtype=torch.bool, device=rows.device)
        valid[rows] = has_dsd(rollout.response_mask[rows], fit.m, self.n_min)
        groups = rollout.group_index
        count = torch.zeros(len(rollout) // rollout.group_size, dtype=torch.long, device=rows.device)
        count.index_add_(0, groups[rows], valid[rows].long())
        stats = MiniBatchDispersion(
            num_groups=int((count > 0).sum()),
            group_index=groups,
            advantages=rollout.advantages,
            valid=valid,
            group_valid_count=count[groups],
            known=torch.full((len(rollout),), math.nan, dtype=torch.float64, device=rows.device),
            group_weight=self.failure_shares(rollout.rewards, groups) if self.failure_weighting else None,
        )
        captured, self._captured = self._captured, None  # the shared forward's weights hold until the first update
        if len(mini_batch.micro_batches) > 1:
            ahead = rows if self.xi_mode == "quantile" else mini_batch.split_rows
            ahead = ahead[valid[ahead]]
            if captured is not None:
                stats.known[ahead] = captured[ahead]
                ahead = ahead[stats.known[ahead].isnan()]
            start = time.perf_counter()
            measured = len(ahead)
            self._step.forward_ahead += measured
            if module.model_setup.lockstep:
                # Sharded forwards are collectives: every rank must run as many. A rank with fewer valid rows ahead
                # (more short responses) pads them with repeats of its first row, whose results are not kept.
                padding = most_rows_of_any_rank(measured, rows.device) - measured
                ahead = torch.cat([ahead, rows[:1].repeat(padding)])
            done = 0
            for part in mini_batch.forward(ahead, True):
                values, _ = self.dispersion(fit, part.hidden, part.response_mask, module.sampling.max_new_tokens)
                real = torch.arange(done, done + len(part.rows), device=rows.device) < measured
                stats.known[part.rows[real]] = values.detach()[real]
                done += len(part.rows)
            self._step.seconds += time.perf_counter() - start
            if self.xi_mode == "quantile":
                measured = stats.known[rows][valid[rows]]
                stats.xi = float(torch.quantile(measured, self.xi_quantile)) if measured.numel() else math.nan
        self._mini = stats
        self._step.mini_batches += 1

    @override
    def policy_loss_terms(self, trainer: L.Trainer, module: L.LightningModule, forward: PolicyForward) -> LossTerms:
        if forward.hidden is None:
            raise RuntimeError("LatentExploration needs forward.hidden; the module did not capture hidden states")
        fit = find_koopman_fit(trainer, "LatentExploration")
        start = time.perf_counter()
        # DSD on a detached copy: its gradient at the hidden states is taken here (for grad_share) and handed to
        # the policy's backward below, so the DSD's own backward still runs once
        hidden = forward.hidden.detach().requires_grad_(self.alpha > 0)
        with torch.enable_grad():
            values, valid = self.dispersion(fit, hidden, forward.response_mask, forward.max_new_tokens)
        detached = values.detach()
        if self._mini is not None and forward.rows is not None:
            ahead = self._mini.known[forward.rows]
            measured = ~ahead.isnan() & valid
            if measured.any():  # the same rows, the same weights: the two forwards must agree
                gap = (detached[measured].double() - ahead[measured]).abs().max()
                self._step.lookahead_gap = max(self._step.lookahead_gap or 0.0, float(gap))
        xi = self.threshold(detached, valid)
        over = valid & (detached > xi)
        with torch.enable_grad():
            l_xp = self.exploration_share(values, valid, over, forward)
        losses: dict[str, Tensor] = {}
        if self.alpha > 0:
            if l_xp.requires_grad:
                (grad,) = torch.autograd.grad(self.alpha * l_xp, hidden)
            else:  # no row can move (none valid with A > 0 and under xi)
                grad = torch.zeros_like(hidden)
            squared = grad.float().square().sum()
            self._step.xp_grad_sq = self._step.xp_grad_sq + squared
            self._step.mini_xp_grad_sq = self._step.mini_xp_grad_sq + squared
            surrogate = (forward.hidden * grad.to(forward.hidden.dtype)).sum()
            losses["relax/xp_loss"] = self.alpha * l_xp.detach().float() + surrogate - surrogate.detach()
            if forward.head_hidden is not None and forward.head_hidden.requires_grad:
                forward.head_hidden.register_hook(self._record_rest_gradient)
        self._step.seconds += time.perf_counter() - start
        gate = over & (forward.advantages > 0) if self.gate_positive_only else over
        if self.kl_coef > 0:
            if forward.reference_kl is None:
                raise RuntimeError("LatentExploration(kl_coef > 0) needs forward.reference_kl; the module has no reference")
            gated = torch.zeros_like(forward.logp)
            if gate.any():  # the reference forward runs over the gated responses only
                gated[gate] = forward.reference_kl(gate).to(gated.dtype)
            losses["relax/gated_kl_loss"] = self.kl_coef * forward.aggregate(gated)
        self.record(detached, valid, over, gate, xi, float(l_xp.detach()), forward.advantages)
        return LossTerms(losses=losses)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step = StepRecord()
        self._captured = None

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        alpha = self.alpha  # the alpha this step's last optimiser step used
        self.end_optimizer_step()
        pl_module.log("relax/alpha", alpha, batch_size=1)
        pl_module.log("timing_s/dsd", self._step.seconds, batch_size=1)
        pl_module.log_dict(self.step_metrics(), batch_size=1)

    def step_dispersions(self) -> tuple[Tensor, Tensor]:
        """The DSDs of the step's valid responses, as the update measured them, and their advantages (one pair per
        update forward of a response: ``ppo_epochs`` of them), to compare over-dispersion bounds offline."""
        if not self._step.dsd:
            return torch.zeros(0), torch.zeros(0)
        return torch.cat(self._step.dsd).float(), torch.cat(self._step.advantages).float()

    def step_metrics(self) -> dict[str, float]:
        """The ``relax/*`` metrics of the step so far (empty before its first update micro-batch)."""
        step = self._step
        if not step.rows:
            return {}
        kept = torch.cat(step.dsd).float()
        metrics = {
            "relax/valid_frac": step.valid / step.rows,
            "relax/gated_frac": step.gated / step.rows,
            "relax/over_frac": step.over / max(step.valid, 1),
            "relax/xi": sum(step.xi) / len(step.xi),
            "relax/l_xp": step.l_xp / max(step.mini_batches, 1),
        }
        if kept.numel():
            metrics.update(
                {
                    "relax/dsd_mean": float(kept.mean()),
                    "relax/dsd_median": float(kept.median()),
                    "relax/dsd_p90": float(torch.quantile(kept, 0.9)),
                }
            )
        if step.lookahead_gap is not None:
            metrics["relax/lookahead_dsd_gap"] = step.lookahead_gap
        if self.alpha > 0 and float(step.rest_grad_sq) > 0:
            metrics["relax/grad_share"] = math.sqrt(float(step.xp_grad_sq) / float(step.rest_grad_sq))
        return metrics

    # ------------------------------------------------------------------------------------------------ math
    def dispersion(self, fit: KoopmanFit, hidden: Tensor, mask: Tensor, padded_length: int | None) -> tuple[Tensor, Tensor]:
        """DSD of each response (paper Eq. 6) in this callback's spectrum (``padded_length``: the sampling limit)."""
        return dsd(
            hidden, mask, fit.dictionary_on(hidden.device), eps=self.eps, n_min=self.n_min, spectrum=self.spectrum,
            padded_length=padded_length,
        )

    def threshold(self, values: Tensor, valid: Tensor) -> float:
        if self.xi_mode == "absolute":
            return self.xi
        if self.xi_mode == "relative":
            if self.calibrated_median is None:
                raise RuntimeError("LatentExploration: xi is not calibrated yet (on_rollout_end did not run)")
            return self.xi_scale * self.calibrated_median
        if self._mini is not None and self._mini.xi is not None:  # measured over the whole mini-batch ahead
            return self._mini.xi
        return float(torch.quantile(values[valid], self.xi_quantile)) if valid.any() else math.nan

    def exploration_share(self, values: Tensor, valid: Tensor, over: Tensor, forward: PolicyForward) -> Tensor:
        """This micro-batch's share of ``L_xp`` over whole groups (:func:`latent_exploration_loss`)."""
        mini = self._mini
        if mini is None or forward.rows is None:  # called outside an update: the rows given are the whole batch
            weight = self.failure_shares(forward.rewards, forward.group_index) if self.failure_weighting else None
            return latent_exploration_loss(values, valid, over, forward.advantages, forward.group_index,
                                           group_weight=weight)
        rows = forward.rows
        outside = mini.valid.clone()
        outside[rows] = False  # valid rows of the mini-batch in other micro-batches
        candidates = (forward.group_index[:, None] == mini.group_index[None, :]) & outside[None, :]  # (B, N)
        z_outside = mini.advantages.clamp(min=0).to(mini.known.dtype) * mini.known
        if torch.isnan(z_outside[candidates.any(0)]).any():
            raise RuntimeError("LatentExploration: a split group's DSD was not measured ahead (on_mini_batch_start)")
        log_sum = torch.where(candidates, -z_outside[None, :], -math.inf).logsumexp(-1)
        return latent_exploration_loss(
            values, valid, over, forward.advantages, forward.group_index,
            outside_log_sum=log_sum, group_valid_count=mini.group_valid_count[rows], num_groups=mini.num_groups,
            group_weight=None if mini.group_weight is None else mini.group_weight[rows],
        )

    def failure_shares(self, rewards: Tensor, group_index: Tensor) -> Tensor:
        """Per row, the share of its group's responses whose reward is at most ``failure_threshold``."""
        failed = (rewards <= self.failure_threshold).float()
        groups, inverse = group_index.unique(return_inverse=True)
        totals = torch.zeros(len(groups), device=rewards.device).index_add_(0, inverse, failed)
        counts = torch.zeros(len(groups), device=rewards.device).index_add_(0, inverse, torch.ones_like(failed))
        return (totals / counts)[inverse]

    def _record_rest_gradient(self, grad: Tensor) -> None:
        squared = grad.detach().float().square().sum()
        self._step.rest_grad_sq = self._step.rest_grad_sq + squared
        self._step.mini_rest_grad_sq = self._step.mini_rest_grad_sq + squared

    def end_optimizer_step(self) -> None:
        """Let the controller set the next alpha from the optimiser step that just ended (its backward is done)."""
        step = self._step
        if self.controller is not None and float(step.mini_rest_grad_sq) > 0:
            share = math.sqrt(float(step.mini_xp_grad_sq) / float(step.mini_rest_grad_sq))
            self.alpha = self.controller.update(self.alpha, share)
        step.mini_xp_grad_sq, step.mini_rest_grad_sq = 0.0, 0.0

    def record(
        self, values: Tensor, valid: Tensor, over: Tensor, gate: Tensor, xi: float, l_xp: float, advantages: Tensor
    ) -> None:
        step = self._step
        step.dsd.append(values[valid].cpu())
        step.advantages.append(advantages[valid].detach().cpu())
        step.rows += len(valid)
        step.valid += int(valid.sum())
        step.over += int(over.sum())
        step.gated += int(gate.sum())
        step.xi.append(xi)
        step.l_xp += l_xp

    # ------------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"calibrated_median": self.calibrated_median}
        if self.controller is not None:
            state.update(alpha=self.alpha, sensitivity=self.controller.sensitivity)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calibrated_median = state_dict.get("calibrated_median")
        if self.controller is not None and "alpha" in state_dict:
            self.alpha, self.controller.sensitivity = state_dict["alpha"], state_dict["sensitivity"]
