"""Pure loss math for GRPO-style policy optimisation.

Every function works on plain tensors. Shapes: ``N`` responses, ``T`` response positions; per-token tensors
are ``(N, T)`` with a boolean ``mask`` that is True on real response tokens. Equations refer to
docs/method.md section 1 and to the papers named in each docstring.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

LossAggregation = Literal["token-mean", "seq-mean-token-mean"]
KLEstimator = Literal["k1", "k2", "k3"]


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6, scale: bool = True) -> Tensor:
    """GRPO advantage ``A_i = (r_i - mean_g) / (std_g + eps)`` over each prompt's group.

    ``rewards`` is ``(N,)`` with the ``group_size`` responses of a prompt stored contiguously.
    ``std_g`` is the unbiased standard deviation (as in verl and TRL). With ``scale=False`` the advantage is
    only centred (Dr. GRPO).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def uniform_groups(rewards: Tensor, group_size: int) -> Tensor:
    """``(G,)`` bool: True for groups whose rewards are all equal (zero advantage; DAPO's dynamic sampling
    drops them)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negated PPO clipped surrogate per token, with clip-higher (DAPO):

    ``L_t = -min(rho_t A, clip(rho_t, 1 - clip_low, 1 + clip_high) A)``, ``rho_t = exp(logp_t - old_logp_t)``.

    ``advantages`` is ``(N,)`` (broadcast over tokens) or ``(N, T)``. Returns the per-token loss and boolean
    per-token masks of where the clip was active: ``clipped_low`` (A < 0, ratio below 1 - clip_low) and
    ``clipped_high`` (A > 0, ratio above 1 + clip_high).
    """
    adv = advantages.unsqueeze(-1) if advantages.ndim == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "clipped_low": (adv < 0) & (ratio < 1.0 - clip_low),
            "clipped_high": (adv > 0) & (ratio > 1.0 + clip_high),
            "approx_kl": old_logp - logp,  # k1 estimate of KL(pi_old || pi_theta) per token
        }
    return loss, stats


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs (Schulman's k1/k2/k3).

    k1 = ``logp - ref``; k2 = ``(logp - ref)^2 / 2``; k3 ("low_var_kl") = ``exp(ref - logp) - (ref - logp) - 1``.
    k3 is unbiased, non-negative and has low variance; its log-ratio is clamped to [-20, 20] (as in verl) so
    one extreme token cannot overflow the exponential.
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        neg = torch.clamp(-log_ratio, -20.0, 20.0)
        return torch.exp(neg) - neg - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")


def aggregate(values: Tensor, mask: Tensor, mode: LossAggregation = "token-mean", normaliser: float | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar.

    * ``token-mean``: ``sum_{i,t} v_it / n_tokens`` (DAPO; long responses weigh more).
    * ``seq-mean-token-mean``: ``(1/N) sum_i mean_t v_it`` (original GRPO).

    ``normaliser`` replaces ``n_tokens`` (or ``N``) with the count over the whole mini-batch, so that the losses
    of its micro-batches add up to the mini-batch loss under gradient accumulation.
    """
    mask = mask.to(values.dtype)
    if mode == "token-mean":
        denominator = mask.sum() if normaliser is None else normaliser
        return (values * mask).sum() / max(float(denominator), 1.0)
    if mode == "seq-mean-token-mean":
        per_sequence = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        denominator = values.shape[0] if normaliser is None else normaliser
        return per_sequence.sum() / max(float(denominator), 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose token-mean or seq-mean-token-mean")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the True entries of ``mask`` (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def covariance_scores(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Centred per-token ``(logp - mean logp)(A - mean A)``, means over the valid tokens of the whole batch given
    (Cui et al. 2505.22617, Eq. 11); ``-inf`` on padding. Pass the whole mini-batch, not one micro-batch."""
    adv = advantages.unsqueeze(-1).expand_as(logp) if advantages.ndim == 1 else advantages
    lp = logp.detach()[mask]
    a = adv.detach().to(lp.dtype)[mask]
    scores = torch.full_like(logp.detach(), float("-inf"))
    scores[mask] = (lp - lp.mean()) * (a - a.mean())
    return scores


def clip_cov_selection(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    clip_ratio: float = 2e-4,
    cov_bounds: tuple[float, float] = (1.0, 5.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """The tokens whose gradient Clip-Cov detaches (Cui et al. 2505.22617, Sec. 5), ``(N, T)`` bool: a random
    ``max(int(clip_ratio * n_tokens), 1)`` of the tokens whose covariance score lies in ``cov_bounds``, drawn
    among those the PPO clip has not already zeroed (as the reference implementation does). Computed over the
    whole mini-batch, so the budget, the centring and the draw do not depend on micro-batching."""
    _, clip = clipped_surrogate(logp.detach(), old_logp, advantages, clip_low, clip_high)
    scores = covariance_scores(logp, advantages, mask)
    in_bounds = (scores >= cov_bounds[0]) & (scores <= cov_bounds[1])
    candidates = (in_bounds & mask & ~clip["clipped_low"] & ~clip["clipped_high"]).nonzero()
    n_clip = min(len(candidates), max(int(clip_ratio * int(mask.sum())), 1))
    selected = torch.zeros_like(mask)
    if len(candidates):
        pick = torch.randperm(len(candidates), generator=generator, device="cpu")[:n_clip].to(candidates.device)
        rows, cols = candidates[pick].unbind(-1)
        selected[rows, cols] = True
    return selected


def clip_cov_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float, clip_high: float, selected: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov: the clipped surrogate with the gradient of the ``selected`` tokens (:func:`clip_cov_selection`)
    detached."""
    loss, stats = clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)
    stats["cov_selected"] = selected
    return torch.where(selected, loss.detach(), loss), stats


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-Cov: the unclipped policy-gradient loss ``-rho A`` plus ``kl_coef * |logp - old_logp|`` on the
    ``selected`` tokens (:func:`kl_cov_selection`). The penalty and its gradient are zero until the policy has
    moved away from the one that sampled (a second mini-batch or PPO epoch)."""
    adv = advantages.unsqueeze(-1) if advantages.ndim == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    loss = torch.where(selected, -ratio * adv + kl_coef * (logp - old_logp).abs(), -ratio * adv)
    with torch.no_grad():
        stats = {
            "clipped_low": torch.zeros_like(selected),
            "clipped_high": torch.zeros_like(selected),
            "approx_kl": old_logp - logp,
            "cov_selected": selected,
        }
    return loss, stats


def _logprob_entropy_chunk(hidden: Tensor, tokens: Tensor, head: Callable[[Tensor], Tensor], temperature: float):
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # bf16/fp16 -> float32
    log_z = logits.logsumexp(-1)
    logp = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_z
    entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def token_logprobs_and_entropy(
    hidden: Tensor,
    tokens: Tensor,
    head: Callable[[Tensor], Tensor],
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Log-probability of each sampled token and the true entropy ``H = logsumexp(z) - sum softmax(z) z`` of the
    full next-token distribution, with logits ``z = head(hidden) / temperature``.

    ``hidden`` is ``(N, T, d)`` (the final-norm states that predict ``tokens`` ``(N, T)``). The vocabulary
    projection runs in chunks of ``chunk_size`` positions under activation checkpointing, so neither the
    full ``(N, T, V)`` logits nor their float32 copy is kept for backward: only ``hidden`` is.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_tokens = tokens.reshape(-1)
    logps, entropies = [], []
    for start in range(0, flat_hidden.shape[0], chunk_size):
        h, t = flat_hidden[start : start + chunk_size], flat_tokens[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(_logprob_entropy_chunk, h, t, head, temperature, use_reentrant=False)
        else:
            lp, ent = _logprob_entropy_chunk(h, t, head, temperature)
        logps.append(lp)
        entropies.append(ent)
    return torch.cat(logps).view(tokens.shape), torch.cat(entropies).view(tokens.shape)
