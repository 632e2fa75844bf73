"""Policy losses: recipe key ``model.objective.policy_loss``, a ``class_path`` with the loss's own ``init_args``.

* :class:`PPOClip` (``ppo.py``, the default): PPO's clipped surrogate, with DAPO's clip-higher.
* :class:`ClipCov` (``clip_cov.py``) and :class:`KLCov` (``kl_cov.py``): Cui et al.'s covariance-based losses against
  entropy collapse; they choose their tokens over the whole mini-batch.
* :class:`GSPO` (``gspo.py``): a sequence-level importance ratio (Zheng et al. 2025).
* :class:`CISPO` (``cispo.py``): a clipped, stop-gradient importance weight (MiniMax-M1).
* :class:`DrGRPO` (``dr_grpo.py``): PPO-clip with Dr. GRPO's unscaled advantages and length-unbiased sum (Liu et al.).

``base.py`` holds the seam (:class:`PolicyLoss`, :class:`LossInput`, :class:`LossOutput`). A new loss is one file
anywhere on the path, named by its ``class_path``; it need not be listed here (README, "Write a loss").
"""

from relax_pl.losses.base import LossInput, LossOutput, PolicyLoss, UpdatePlan, mini_batch_selection
from relax_pl.losses.cispo import CISPO
from relax_pl.losses.clip_cov import ClipCov
from relax_pl.losses.dr_grpo import DrGRPO
from relax_pl.losses.gspo import GSPO
from relax_pl.losses.kl_cov import KLCov
from relax_pl.losses.ppo import PPOClip

__all__ = ["CISPO", "GSPO", "ClipCov", "DrGRPO", "KLCov", "LossInput", "LossOutput", "PPOClip", "PolicyLoss",
           "UpdatePlan", "mini_batch_selection"]
