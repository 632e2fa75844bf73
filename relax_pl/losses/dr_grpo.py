"""Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv 2503.20783):
GRPO without its two normalisations, which the paper shows bias the optimisation."""

from __future__ import annotations

from relax_pl.losses.ppo import PPOClip


class DrGRPO(PPOClip):
    """Dr. GRPO: PPO's clipped surrogate (:func:`~relax_pl.losses.ppo.clipped_surrogate`) with

    * advantages only centred, ``A_i = r_i - mean_g`` (no division by the group's std, which weights prompts that are
      too easy or too hard more), and
    * each response's token losses summed, not averaged (``seq-mean-token-sum-norm``: ``(1/N) sum_i sum_t L_it / L``
      with ``L`` = ``model.sampling.max_new_tokens``, a constant: dividing by each response's length penalises a long
      wrong answer less than a short one).

    Both are declared (``scale_advantages``, ``aggregation``), so ``model.objective`` needs neither key, and a recipe
    that sets either differently is refused. Logs PPO's clip fractions.

    Args:
        clip_low, clip_high: as :class:`~relax_pl.losses.PPOClip`'s (the paper keeps PPO's 0.2).
    """

    aggregation = "seq-mean-token-sum-norm"
    scale_advantages = False
