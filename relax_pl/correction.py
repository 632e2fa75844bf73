"""Truncated importance sampling (TIS): the policy loss of responses that an inference engine sampled.

An engine beside the trainer (vLLM) samples token ``y_t`` from ``pi_engine``, which differs from the trainer's
``pi_old`` even with the same weights (other kernels, precision, batch shapes). The policy gradient of those
tokens is then off-policy. Following Yao et al. 2025 ("Your efficient RL framework secretly brings you off-policy
RL training"), as verl (``rollout_is``), TRL (``vllm_importance_sampling_correction``) and OpenRLHF (``--use-tis``)
do, each token's policy loss is weighted by

    ``w_t = min(pi_old(y_t) / pi_engine(y_t), C)``,   detached,

which makes the expected gradient the on-policy one up to the truncation at ``C``: tokens the engine drew more
often than the policy would are down-weighted, and the cap bounds the variance of those it drew too rarely.
Pure tensor math: the module multiplies the weights into the per-token loss before aggregation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from relax_pl.objectives import masked_mean


def truncated_importance_weights(
    policy_logp: Tensor, engine_logp: Tensor, mask: Tensor, cap: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token TIS weights ``min(exp(policy_logp - engine_logp), cap)`` and the mismatch statistics.

    Args:
        policy_logp: ``(N, T)`` log-probs of the sampled tokens under the policy that was current when they were
            sampled (the trainer's ``old_logp``), after temperature.
        engine_logp: ``(N, T)`` the sampling engine's log-probs of the same tokens, after temperature.
        mask: ``(N, T)`` bool, True on response tokens.
        cap: the truncation ``C`` (>= 1); None gives weights of 1 (no correction; the gap is still measured).

    Returns:
        The detached weights ``(N, T)`` (1 on padding) and, as detached scalars, ``rollout/logp_abs_diff`` (mean
        ``|policy_logp - engine_logp|`` over response tokens) and, with a cap, ``rollout/tis_clipfrac`` (the
        fraction of response tokens whose ratio exceeded it) and ``rollout/tis_weight_mean``.
    """
    log_ratio = (policy_logp - engine_logp).detach().float().masked_fill(~mask, 0.0)
    stats = {"rollout/logp_abs_diff": masked_mean(log_ratio.abs(), mask)}
    if cap is None:
        return torch.ones_like(log_ratio), stats
    ratio = torch.exp(log_ratio)  # may overflow to inf for a token the engine almost never draws: the cap holds
    weights = ratio.clamp(max=cap)
    stats["rollout/tis_clipfrac"] = masked_mean((ratio > cap).float(), mask)
    stats["rollout/tis_weight_mean"] = masked_mean(weights, mask)
    return weights, stats
