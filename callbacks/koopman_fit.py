"""KoopmanFit: fits the Koopman dictionary once, on the first training step, and keeps it as training state."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from relax_pl.extension import DetachedForward, RLVRCallback
from relax_pl.koopman import KoopmanDictionary, dsd, fit_dictionary
from relax_pl.rollout import RolloutBatch


class KoopmanFit(RLVRCallback):
    """Fits ``W`` of the Koopman dictionary ``g(x) = sigmoid(x W)`` on the first step's response hidden states,
    then freezes it (docs/method.md section 3; paper Algorithm 1, FitKoopmanDict).

    The fit runs at the first ``on_rollout_end``, on the detached final-norm hidden states of at most
    ``max_trajectories`` responses (a seeded random subset of the rollout), read in the step's shared forward
    (extension.py, "the shared capture") with the other callbacks that read hidden states. The fitted ``W``, the
    fitted flag and the fit report are this callback's ``state_dict``: they are saved in every checkpoint and
    restored on resume, so a resumed run never refits.
    Under several ranks every rank computes hidden states (a sharded forward is collective), rank 0 fits, and
    ``W`` is broadcast.

    Callbacks that need the dictionary call :meth:`ensure_fitted` first, so their order in the recipe does not
    matter.

    Args:
        m: number of observables (paper: 50). Responses need at least m+2 tokens to be fitted on.
        steps: Adam steps of the fit.
        lr: Adam learning rate (paper: 1e-4).
        batch_size: trajectories per fit step (paper: 64).
        max_trajectories: responses of the first rollout the fit uses.
        eps: ridge of ``X^T X`` in the DMD operator.
        seed: seeds the dictionary's initial draw and the fit's sampling.
    """

    def __init__(
        self,
        m: int = 50,
        steps: int = 50,
        lr: float = 1e-4,
        batch_size: int = 64,
        max_trajectories: int = 256,
        eps: float = 1e-3,
        seed: int = 0,
    ) -> None:
        if m < 1 or steps < 0 or batch_size < 1 or max_trajectories < 1 or eps <= 0:
            raise ValueError(
                f"KoopmanFit needs m >= 1, steps >= 0, batch_size >= 1, max_trajectories >= 1 and eps > 0; got "
                f"{m=}, {steps=}, {batch_size=}, {max_trajectories=}, {eps=}"
            )
        self.m, self.steps, self.lr, self.batch_size = m, steps, lr, batch_size
        self.max_trajectories, self.eps, self.seed = max_trajectories, eps, seed
        self.dictionary: KoopmanDictionary | None = None
        self.fitted = False
        self.report: dict[str, float] = {}
        # The fitted-on trajectories, kept only until the end of the step that fitted (for calibrations).
        self.first_trajectories: list[Tensor] | None = None
        self._fit_rows: Tensor | None = None  # the rows read in this step's shared forward, and what it gave
        self._captured: list[Tensor] = []

    @override
    def rollout_hidden_rows(
        self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch
    ) -> Tensor | None:
        self._fit_rows, self._captured = None, []
        if self.fitted or not len(rollout):
            return None
        self._fit_rows = self.fit_rows(rollout)
        return self._fit_rows

    @override
    def on_rollout_hidden_states(
        self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch, part: DetachedForward
    ) -> None:
        if self._fit_rows is None:
            return
        keep = torch.isin(part.rows, self._fit_rows)
        # a response's mask is a prefix of its row (tokens up to the first EOS), so boolean indexing keeps order
        self._captured += [h[mask].detach() for h, mask in zip(part.hidden[keep], part.response_mask[keep])]

    @override
    def on_rollout_end(self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch) -> None:
        self.ensure_fitted(trainer, module, rollout)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.first_trajectories, self._fit_rows, self._captured = None, None, []

    def ensure_fitted(self, trainer: L.Trainer, module: L.LightningModule, rollout: RolloutBatch) -> None:
        """Fit the dictionary on ``rollout`` unless it is fitted (this run or a restored checkpoint). An empty
        rollout (every group dropped by dynamic sampling) leaves the fit to the next step."""
        if self.fitted or not len(rollout):
            return
        captured = self._fit_rows is not None and len(self._captured) == len(self._fit_rows)
        trajectories = self._captured if captured else self.trajectories(module, rollout)
        weight, report = None, None
        if trainer.is_global_zero:
            dictionary = KoopmanDictionary(trajectories[0].shape[-1], self.m, seed=self.seed).to(module.device)
            fit = fit_dictionary(
                dictionary,
                [t.float() for t in trajectories],
                steps=self.steps,
                lr=self.lr,
                batch_size=self.batch_size,
                eps=self.eps,
                seed=self.seed,
            )
            weight = dictionary.proj.weight.detach()
            report = {
                "koopman/fit_loss_initial": fit.initial_loss,
                "koopman/fit_loss_final": fit.final_loss,
                "koopman/cond_x": fit.cond_x,
                "koopman/saturated_fraction": fit.saturated_fraction,
                "timing_s/koopman_fit": fit.seconds,
            }
        weight, report = trainer.strategy.broadcast((weight, report), src=0)
        self.set_weight(weight)
        self.fitted, self.report, self.first_trajectories = True, report, trajectories
        log_metrics(trainer, report)
        rank_zero_info(
            f"KoopmanFit: m={self.m} fitted on {len(trajectories)} responses in {report['timing_s/koopman_fit']:.1f}s; "
            f"residual {report['koopman/fit_loss_initial']:.4g} -> {report['koopman/fit_loss_final']:.4g}, "
            f"cond(X) {report['koopman/cond_x']:.3g}, saturated {report['koopman/saturated_fraction']:.1%}"
        )

    def trajectories(self, module: L.LightningModule, rollout: RolloutBatch) -> list[Tensor]:
        """Detached ``(T_i, d)`` final-norm hidden states of a seeded subset of at most ``max_trajectories``
        responses of ``rollout``, each cut to its own length."""
        subset = rollout.select(self.fit_rows(rollout))
        # a response's mask is a prefix of its row (tokens up to the first EOS), so boolean indexing keeps order
        return [h[mask] for hidden, masks in module.response_hidden_states(subset) for h, mask in zip(hidden, masks)]

    def fit_rows(self, rollout: RolloutBatch) -> Tensor:
        """The sorted rows of a seeded subset of at most ``max_trajectories`` responses of ``rollout``."""
        rows = torch.randperm(len(rollout), generator=torch.Generator().manual_seed(self.seed))[: self.max_trajectories]
        return rows.sort().values.to(rollout.input_ids.device)

    def set_weight(self, weight: Tensor) -> None:
        m, d = weight.shape
        if m != self.m:
            raise ValueError(f"the Koopman dictionary being restored has m={m}, but KoopmanFit(m={self.m}) is configured")
        self.dictionary = KoopmanDictionary(d, m, seed=self.seed)
        self.dictionary.proj.weight = nn.Parameter(weight.detach().float().cpu().clone(), requires_grad=False)

    def dictionary_on(self, device: torch.device) -> KoopmanDictionary:
        """The frozen dictionary on ``device`` (moved once; the lift casts ``W`` to the hidden states' dtype)."""
        if self.dictionary is None:
            raise RuntimeError("the Koopman dictionary is not fitted yet: call KoopmanFit.ensure_fitted first")
        if self.dictionary.proj.weight.device != torch.device(device):
            self.dictionary.to(device)
        return self.dictionary

    def dsd_of(
        self,
        trajectories: list[Tensor],
        *,
        eps: float,
        n_min: int | None,
        spectrum: str,
        padded_length: int | None = None,
        chunk: int = 64,
    ) -> tuple[Tensor, Tensor]:
        """Detached DSD and validity of ``(T_i, d)`` trajectories, computed in chunks (``padded_length``: see
        :func:`relax_pl.koopman.dsd`)."""
        values, valid = [], []
        with torch.no_grad():
            for i in range(0, len(trajectories), chunk):
                part = trajectories[i : i + chunk]
                hidden = nn.utils.rnn.pad_sequence(part, batch_first=True)
                lengths = torch.tensor([t.shape[0] for t in part], device=hidden.device)
                mask = torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]
                d, v = dsd(
                    hidden, mask, self.dictionary_on(hidden.device), eps=eps, n_min=n_min, spectrum=spectrum,
                    padded_length=padded_length,
                )
                values.append(d)
                valid.append(v)
        return torch.cat(values), torch.cat(valid)

    @override
    def state_dict(self) -> dict[str, Any]:
        weight = None if self.dictionary is None else self.dictionary.proj.weight.detach().cpu()
        return {"weight": weight, "fitted": self.fitted, "report": dict(self.report)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("weight") is not None:
            self.set_weight(state_dict["weight"])
        self.fitted = bool(state_dict.get("fitted", False)) and self.dictionary is not None
        self.report = dict(state_dict.get("report", {}))


def log_metrics(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Write ``metrics`` to the loggers once, at the step of this batch's scalars (as Lightning's
    LearningRateMonitor does): a value given to ``module.log`` only now and then would be repeated at every
    later step of the epoch."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)


def find_koopman_fit(trainer: L.Trainer, needed_by: str) -> KoopmanFit:
    """The run's one KoopmanFit callback; a clear error if there is none or more than one."""
    found = [cb for cb in trainer.callbacks if isinstance(cb, KoopmanFit)]
    if len(found) != 1:
        raise ValueError(
            f"{needed_by} needs exactly one relax_pl.callbacks.KoopmanFit in trainer.callbacks, found {len(found)}; "
            "add `- class_path: relax_pl.callbacks.KoopmanFit` to the recipe's trainer.callbacks"
        )
    return found[0]
