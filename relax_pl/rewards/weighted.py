"""Several rewards in one run (as TRL's ``reward_funcs`` / ``reward_weights``): the policy is trained on their
weighted sum, each is scored in its own bounded pool, and each is logged under its own name.

Example recipe fragment::

    model:
      reward:
        - class_path: relax_pl.rewards.MathReward
        - class_path: my_rewards.Brevity
      reward_weights: [1.0, 0.1]
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from relax_pl.rewards.base import VerifiableReward
from relax_pl.rewards.bounded import BoundedScorer, ScoredBatch


def named_rewards(
    reward: VerifiableReward | list[VerifiableReward], weights: list[float] | None
) -> list[tuple[str, VerifiableReward, float]] | None:
    """``(name, reward, weight)`` of each reward of a list (its class name, numbered from the second of a class on:
    ``MathReward``, ``MathReward_2``), or None for a single reward.

    Raises:
        ValueError: weights without a list of rewards, as many weights as rewards, or an empty list.
    """
    if isinstance(reward, VerifiableReward):
        if weights is not None:
            raise ValueError("model.reward_weights weighs a list of rewards, but model.reward is a single reward")
        return None
    if not reward:
        raise ValueError("model.reward is an empty list; give one reward or several")
    weights = [1.0] * len(reward) if weights is None else list(weights)
    if len(weights) != len(reward):
        raise ValueError(f"model.reward_weights has {len(weights)} weights for {len(reward)} rewards in model.reward")
    named, seen = [], {}
    for item, weight in zip(reward, weights):
        name = type(item).__name__
        seen[name] = seen.get(name, 0) + 1
        named.append((name if seen[name] == 1 else f"{name}_{seen[name]}", item, float(weight)))
    return named


class RewardScorer:
    """Scores responses with the run's reward, or with several rewards and their weighted sum, each reward in its
    own :class:`BoundedScorer` (so each response is bounded by that reward's ``timeout_s`` and scored by its
    ``workers``, and a grader that hangs costs only its own component).

    One reward: its components as it returns them. Several: ``overall = sum_k w_k overall_k``, and reward ``k``'s
    own scores under its name (:func:`named_rewards`): ``<name>`` (its overall) and ``<name>/<component>``. A
    response on which reward ``k`` timed out or failed gets 0 from reward ``k`` only; the counts add up.

    Args:
        reward: a reward, or a list of them.
        weights: one per reward of a list (default: all 1).
        processes_per_node: training processes on this machine, each with pools of its own.
    """

    def __init__(
        self,
        reward: VerifiableReward | list[VerifiableReward],
        weights: list[float] | None = None,
        processes_per_node: int = 1,
    ) -> None:
        self.named = named_rewards(reward, weights)
        rewards = [reward] if self.named is None else [item for _, item, _ in self.named]
        self.scorers = [BoundedScorer(item, processes_per_node=processes_per_node) for item in rewards]

    def __call__(self, completions: list[str], samples: list[dict]) -> ScoredBatch:
        scored = [scorer(completions, samples) for scorer in self.scorers]
        if self.named is None:
            return scored[0]
        overall = [0.0] * len(completions)
        components: dict[str, list[float]] = {"overall": overall}
        for (name, _, weight), batch in zip(self.named, scored):
            for key, values in batch.components.items():
                components[name if key == "overall" else f"{name}/{key}"] = values
            for i, value in enumerate(batch.components["overall"]):
                overall[i] += weight * value
        return ScoredBatch(
            components=components,
            timeouts=sum(batch.timeouts for batch in scored),
            errors=sum(batch.errors for batch in scored),
            first_error=next((batch.first_error for batch in scored if batch.first_error), None),
            all_failed={
                name: error for (name, _, _), batch in zip(self.named, scored) for error in batch.all_failed.values()
            },
        )

    def close(self) -> None:
        for scorer in self.scorers:
            scorer.close()


def reward_fields(sample: dict[str, Any]) -> dict[str, Any]:
    """The row as a reward worker receives it: without images or other binary columns, which would be pickled to
    the worker once per response for nothing (a reward that needs the images overrides
    ``RLVRModule.compute_rewards``, which sees ``rollout.samples`` whole)."""
    return {k: v for k, v in sample.items() if k != "images" and not is_binary(v)}


def is_binary(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(is_binary(v) for v in value)
    return isinstance(value, (bytes, bytearray, Image.Image)) or (isinstance(value, dict) and "bytes" in value)
