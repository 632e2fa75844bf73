"""The recipe's ``model.objective``, ``model.update``, ``model.optimizer`` and ``model.validation`` sections: typed
dataclasses that jsonargparse checks key by key before anything is loaded (``model.sampling`` is
:class:`relax_pl.rollout.SamplingConfig`, ``model.vision`` :class:`relax_pl.vision.VisionConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from relax_pl import objectives as obj
from relax_pl.errors import RecipeError
from relax_pl.losses import PolicyLoss, PPOClip
from relax_pl.rollout import SamplingConfig

# Keys of model.objective before the policy losses became plug-ins, and where each went (the CLI names it when an
# older recipe uses one).
MOVED_OBJECTIVE_KEYS = {
    "clip_low": "model.objective.policy_loss.init_args.clip_low (policy_loss: relax_pl.losses.PPOClip)",
    "clip_high": "model.objective.policy_loss.init_args.clip_high (policy_loss: relax_pl.losses.PPOClip)",
    "clip_cov_ratio": "model.objective.policy_loss.init_args.ratio (policy_loss: relax_pl.losses.ClipCov)",
    "clip_cov_bounds": "model.objective.policy_loss.init_args.bounds (policy_loss: relax_pl.losses.ClipCov)",
    "kl_cov_ratio": "model.objective.policy_loss.init_args.ratio (policy_loss: relax_pl.losses.KLCov)",
    "kl_cov_coef": "model.objective.policy_loss.init_args.coef (policy_loss: relax_pl.losses.KLCov)",
}
RENAMED_POLICY_LOSSES = {
    "ppo": "relax_pl.losses.PPOClip", "clip_cov": "relax_pl.losses.ClipCov", "kl_cov": "relax_pl.losses.KLCov"
}


@dataclass
class ObjectiveConfig:
    """What the update minimises (recipe key ``model.objective``; docs/method.md sections 1 and 6): the policy loss, a
    plug-in with its own settings (``class_path`` and ``init_args``, :mod:`relax_pl.losses`), plus GRPO's KL and
    entropy terms, reduced by ``loss_agg``. A loss may declare the reduction and the advantage scaling it needs
    (:class:`relax_pl.losses.DrGRPO` does); a recipe that asks for others is refused."""

    policy_loss: PolicyLoss = field(default_factory=PPOClip)
    kl_coef: float = 0.0  # 0 skips the reference forward entirely
    kl_estimator: obj.KLEstimator = "k3"
    # token-mean, seq-mean-token-mean or seq-mean-token-sum-norm (objectives.aggregate); None: the policy loss's own
    # (GSPO's, DrGRPO's), else token-mean
    loss_agg: obj.LossAggregation | None = None
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef * entropy
    scale_advantages: bool | None = None  # divide by the group std; None: the policy loss's own (DrGRPO: no), else yes

    def __post_init__(self) -> None:
        loss = type(self.policy_loss).__name__
        own = self.policy_loss.aggregation
        if own is not None and self.loss_agg not in (None, own):
            raise ValueError(
                f"model.objective.loss_agg={self.loss_agg} conflicts with model.objective.policy_loss {loss}, which "
                f"is reduced {own}; remove model.objective.loss_agg"
            )
        own_scaling = self.policy_loss.scale_advantages
        if own_scaling is not None and self.scale_advantages not in (None, own_scaling):
            raise ValueError(
                f"model.objective.scale_advantages={self.scale_advantages} conflicts with model.objective.policy_loss "
                f"{loss}, whose advantages are {'' if own_scaling else 'not '}divided by the group std; remove "
                "model.objective.scale_advantages"
            )

    @property
    def aggregation(self) -> obj.LossAggregation:
        """How every per-token term is reduced: ``loss_agg``, else the policy loss's own, else token-mean."""
        return self.loss_agg or self.policy_loss.aggregation or "token-mean"

    @property
    def advantages_scaled(self) -> bool:
        """Whether the group advantages are divided by the group's std: ``scale_advantages``, else the policy loss's
        own, else yes (GRPO)."""
        for choice in (self.scale_advantages, self.policy_loss.scale_advantages):
            if choice is not None:
                return choice
        return True


@dataclass
class UpdateConfig:
    """How the policy is updated on one step's rollout (recipe key ``model.update``)."""

    ppo_epochs: int = 1
    mini_batch_size: int | None = None  # responses per optimiser step; None: the whole rollout
    micro_batch_size: int = 8  # responses per forward/backward (gradient accumulation inside a mini-batch)
    grad_clip: float = 1.0
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (DAPO) and log how many
    logprob_chunk_size: int = 1024  # positions per vocabulary-projection chunk

    def __post_init__(self) -> None:
        for key in ("ppo_epochs", "mini_batch_size", "micro_batch_size", "logprob_chunk_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise RecipeError(f"model.update.{key}", value, "must be >= 1")
        if not self.grad_clip > 0:
            raise RecipeError("model.update.grad_clip", self.grad_clip, "the gradient-norm bound must be > 0")


@dataclass
class OptimizerConfig:
    """AdamW (recipe key ``model.optimizer``). The 8-bit variants come from bitsandbytes."""

    name: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise RecipeError("model.optimizer.lr", self.lr, "the learning rate must be a positive number, e.g. 1e-6")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise RecipeError("model.optimizer.betas", list(self.betas), "each must be in [0, 1), e.g. [0.9, 0.95]")
        if self.weight_decay < 0:
            raise RecipeError("model.optimizer.weight_decay", self.weight_decay, "must be >= 0")
        if not self.eps > 0:
            raise RecipeError("model.optimizer.eps", self.eps, "must be > 0, e.g. 1e-8")

    def build(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        kwargs = dict(lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay, eps=self.eps)
        if self.name == "adamw":
            return torch.optim.AdamW(params, **kwargs)
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.PagedAdamW8bit if self.name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return optimizer_class(params, **kwargs)


@dataclass
class ValidationConfig:
    """Validation sampling (recipe key ``model.validation``): ``num_responses`` (k) per prompt, greedy when
    temperature is 0. Logs ``val/accuracy`` (mean over all responses: mean@k), ``val/accuracy/mean@k``,
    ``val/accuracy/pass@k`` (a prompt passes when one of its k responses is right), ``val/accuracy/greedy`` and
    ``val/accuracy/source/<name>`` per data source (the row's ``data_source`` column, else its source)."""

    num_responses: int = 1
    temperature: float = 0.0
    max_new_tokens: int | None = None  # None: sampling.max_new_tokens
    greedy: bool = True  # with temperature > 0, also decode one greedy response per prompt (val/accuracy/greedy)

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise RecipeError(
                "model.validation.max_new_tokens", self.max_new_tokens, "a response needs >= 1 token (null: sampling's)"
            )

    def sampling(self, training: SamplingConfig) -> SamplingConfig:
        """The training sampling with this section's responses, length and temperature."""
        return replace(
            training,
            num_responses=self.num_responses,
            max_new_tokens=self.max_new_tokens or training.max_new_tokens,
            temperature=self.temperature,
        )
