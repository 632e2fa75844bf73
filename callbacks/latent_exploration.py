"""LatentExploration: the ReLaX loss terms (paper Eq. 10-11 as a loss; relax-method.md section 4)."""

from __future__ import annotations

import math
import time
from typing import Any, Literal, Optional

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from relax_pl import objectives as obj
from relax_pl.callbacks.koopman_fit import KoopmanFit, find_koopman_fit
from relax_pl.extension import LossTerms, PolicyForward, RLVRCallback
from relax_pl.koopman import dsd
from relax_pl.rollout import RolloutBatch

CALIBRATION_KEY = "first_step_dsd_median"


def latent_exploration_loss(
    dispersion: Tensor, valid: Tensor, over: Tensor, advantages: Tensor, group_index: Tensor
) -> Tensor:
    """Advantage-shaped log-mean-exp of DSD (paper Eq. 10), a loss to minimise:
    ``L_xp = mean_g [ logsumexp_{i in g}(-z_i) - log n_g ]``, ``z_i = max(A_i, 0) * (sg(D_i) if over_i else D_i)``.

    Each group ``g`` holds the valid responses of one prompt present in ``dispersion`` (``n_g`` of them); invalid
    responses (no defined DSD) are left out of their group, a group without a valid response is left out of the
    mean, and with no valid response at all the loss is 0. Descending it raises ``D_i`` only where ``A_i > 0``
    and the response is not over-dispersed (``sg`` is stop-gradient).
    """
    z = advantages.clamp(min=0).to(dispersion.dtype) * torch.where(over, dispersion.detach(), dispersion)
    groups = group_index[valid].unique()
    if groups.numel() == 0:
        return dispersion.new_zeros(())
    member = (group_index[None, :] == groups[:, None]) & valid[None, :]  # (G, B)
    log_mean_exp = torch.where(member, -z[None, :], -math.inf).logsumexp(-1) - member.sum(-1).to(z.dtype).log()
    return log_mean_exp.mean()


class LatentExploration(RLVRCallback):
    """Adds ReLaX's latent-exploration term and its adaptive (gated) KL to every policy-update micro-batch.

    Per micro-batch, with ``D_i`` the DSD of response ``i`` under KoopmanFit's frozen dictionary and
    ``a_i = max(A_i, 0)``: ``over_i = valid_i and D_i > xi`` (detached); the loss gains
    ``alpha * L_xp`` (:func:`latent_exploration_loss`) and ``kl_coef * aggregate(KL * gate)`` with
    ``gate_i = over_i`` (and ``A_i > 0`` when ``gate_positive_only``, as in the authors' code; False gives the
    paper's set I). The KL is the module's per-token k3 KL to the reference, aggregated as the policy loss is.

    The threshold ``xi`` (in the units of ``spectrum``):

    * ``absolute``: ``xi`` as given (the paper's 25 is in ``sv_compat`` units; eigenvalue DSD stays below ~0.25).
    * ``relative``: ``xi_scale`` times the median DSD of the valid responses KoopmanFit fitted on (the first
      step's rollout), computed once and kept in KoopmanFit's checkpointed state.
    * ``quantile``: the ``xi_quantile`` quantile (linear interpolation) of the current micro-batch's valid DSDs,
      so about a ``1 - xi_quantile`` share of them is over the bound at every update.

    Metrics are micro-batch statistics averaged over the step; ``timing_s/dsd`` is the forward time of the
    DSD term summed over the step (its backward is part of ``timing_s/update``).

    Args:
        alpha: weight of ``L_xp`` (paper: 0.1).
        xi, xi_mode, xi_scale, xi_quantile: the over-dispersion bound, see above.
        kl_coef: weight of the gated KL (paper's beta: 0.01); 0 turns it off and skips the reference forward.
        gate_positive_only: gate only positive-advantage responses.
        n_min: fewest own transitions for a defined DSD (default 2m, floor m+1).
        eps: ridge of ``X^T X``.
        spectrum: "eig" (eigenvalue magnitudes) or "sv_compat" (the authors' pre-release code).

    Raises:
        ValueError: on a bad argument, or (at setup) when the run has no KoopmanFit callback.
    """

    needs_hidden_states = True

    def __init__(
        self,
        alpha: float = 0.1,
        xi: float = 25.0,
        xi_mode: Literal["absolute", "relative", "quantile"] = "relative",
        xi_scale: float = 2.0,
        xi_quantile: float = 0.9,
        kl_coef: float = 0.01,
        gate_positive_only: bool = True,
        n_min: Optional[int] = None,
        eps: float = 1e-3,
        spectrum: Literal["eig", "sv_compat"] = "eig",
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
        self.alpha, self.xi, self.xi_mode, self.xi_scale, self.xi_quantile = alpha, xi, xi_mode, xi_scale, xi_quantile
        self.kl_coef, self.gate_positive_only = kl_coef, gate_positive_only
        self.n_min, self.eps, self.spectrum = n_min, eps, spectrum
        self._dsd_seconds = 0.0

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before any model is loaded
            find_koopman_fit(trainer, "LatentExploration")

    @override
    def on_rollout_end(self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch) -> None:
        fit = find_koopman_fit(trainer, "LatentExploration")
        fit.ensure_fitted(trainer, module, rollout)
        if fit.fitted and self.xi_mode == "relative" and CALIBRATION_KEY not in fit.calibration:
            self.calibrate(trainer, module, rollout, fit)

    def calibrate(self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch, fit: KoopmanFit) -> None:
        """Store the median DSD of the valid responses of the fit (or, after a resume, of ``rollout``)."""
        trajectories = fit.first_trajectories or fit.trajectories(module, rollout)
        values, valid = fit.dsd_of(trajectories, eps=self.eps, n_min=self.n_min, spectrum=self.spectrum)
        if not valid.any():
            lengths = [t.shape[0] for t in trajectories]
            raise ValueError(
                f"LatentExploration(xi_mode='relative') cannot calibrate xi: none of the {len(lengths)} responses "
                f"(lengths {min(lengths)}-{max(lengths)} tokens) has n_min={self.n_min or 2 * fit.m} transitions; "
                f"lower n_min (floor m+1={fit.m + 1}), lower KoopmanFit's m or raise model.sampling.max_new_tokens"
            )
        median = trainer.strategy.broadcast(float(values[valid].median()), src=0)
        fit.calibration[CALIBRATION_KEY] = median

    def threshold(self, fit: KoopmanFit, values: Tensor, valid: Tensor) -> float:
        if self.xi_mode == "absolute":
            return self.xi
        if self.xi_mode == "relative":
            if CALIBRATION_KEY not in fit.calibration:
                raise RuntimeError("LatentExploration: xi is not calibrated yet (on_rollout_end did not run)")
            return self.xi_scale * fit.calibration[CALIBRATION_KEY]
        return float(torch.quantile(values[valid], self.xi_quantile)) if valid.any() else math.nan

    @override
    def policy_loss_terms(self, trainer: L.Trainer, module: L.LightningModule, forward: PolicyForward) -> LossTerms:
        if forward.hidden is None:
            raise RuntimeError("LatentExploration needs forward.hidden; the module did not capture hidden states")
        fit = find_koopman_fit(trainer, "LatentExploration")
        start = time.perf_counter()
        dictionary = fit.dictionary_on(forward.hidden.device)
        values, valid = dsd(
            forward.hidden, forward.response_mask, dictionary, eps=self.eps, n_min=self.n_min, spectrum=self.spectrum
        )
        detached = values.detach()
        xi = self.threshold(fit, detached, valid)
        over = valid & (detached > xi)
        l_xp = latent_exploration_loss(values, valid, over, forward.advantages, forward.group_index).float()
        self._dsd_seconds += time.perf_counter() - start
        gate = over & (forward.advantages > 0) if self.gate_positive_only else over
        kept = detached[valid].float()
        metrics: dict[str, Any] = {
            "relax/l_xp": float(l_xp.detach()),
            "relax/xi": xi,
            "relax/valid_frac": float(valid.float().mean()),
            "relax/gated_frac": float(gate.float().mean()),
            "relax/dsd_mean": float(kept.mean()) if kept.numel() else math.nan,
            "relax/dsd_median": float(kept.median()) if kept.numel() else math.nan,
            "relax/dsd_p90": float(torch.quantile(kept, 0.9)) if kept.numel() else math.nan,
        }
        losses = {"relax/xp_loss": self.alpha * l_xp}
        if self.kl_coef > 0:
            if forward.reference_kl is None:
                raise RuntimeError(
                    "LatentExploration(kl_coef > 0) needs forward.reference_kl; the module has no reference"
                )
            gated = torch.zeros_like(forward.logp)
            if gate.any():  # the reference forward runs over the gated responses only
                gated[gate] = forward.reference_kl(gate).to(gated.dtype)
            gated_kl = obj.aggregate(gated, forward.response_mask, forward.loss_agg_mode)
            losses["relax/gated_kl_loss"] = self.kl_coef * gated_kl
            metrics["relax/gated_kl"] = float(gated_kl.detach())
        return LossTerms(losses=losses, metrics=metrics)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._dsd_seconds = 0.0

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        pl_module.log("timing_s/dsd", self._dsd_seconds, batch_size=1)
