"""What a step logs, computed in one place: phase timings, per-micro-batch means, rollout and throughput metrics,
and the validation means (the names are documented in the README's "What is logged")."""

from __future__ import annotations

import math
import re
import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from relax_pl import objectives as obj
from relax_pl.rollout import RolloutBatch


class PhaseTimer:
    """Wall time per named phase of a step (CUDA work is synchronised so it is counted where it runs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        begin = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begin

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def total(self) -> float:
        return time.perf_counter() - self.start

    def metrics(self) -> dict[str, float]:
        out = {f"timing_s/{k}": v for k, v in self.seconds.items()}
        out["timing_s/step"] = self.total()
        return out


class MeanAccumulator:
    """Weighted means of per-micro-batch statistics. Tensor values stay on their device until :meth:`means`, so
    the update loop does not wait for the device at every micro-batch; NaN floats (undefined statistics) are
    left out."""

    def __init__(self) -> None:
        self.sums: dict[str, float | Tensor] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, values: dict[str, float | Tensor], weight: float = 1.0) -> None:
        for k, v in values.items():
            if isinstance(v, Tensor) or not math.isnan(v):
                self.sums[k] = self.sums[k] + v * weight
                self.weights[k] += weight

    def means(self) -> dict[str, float]:
        return {k: float(self.sums[k]) / self.weights[k] for k in self.sums}


def rollout_metrics(rollout: RolloutBatch, max_new_tokens: int) -> dict[str, float]:
    """Scores, advantages, response lengths and each reward component (``reward/<name>``) of a scored rollout."""
    lengths = rollout.response_mask.sum(-1).float()
    metrics = {
        "critic/score/mean": float(rollout.rewards.mean()),
        "critic/score/std": float(rollout.rewards.std()) if len(rollout) > 1 else 0.0,
        "critic/advantages/abs_mean": float(rollout.advantages.abs().mean()),
        "critic/frac_reward_zero_std": float(obj.uniform_groups(rollout.rewards, rollout.group_size).float().mean()),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/clip_ratio": float((lengths >= max_new_tokens).float().mean()),
    }
    for name, values in rollout.reward_components.items():
        if name != "overall":
            metrics[f"reward/{name}"] = float(values.mean())
    return metrics


@dataclass
class RunCounters:
    """What went wrong over the run, which checkpoints keep (``reward_failures_total``, ``skipped_updates_total``),
    and in the latest step; logged every step."""

    reward_failures: int = 0  # responses whose scoring timed out or failed, over the run
    skipped_updates: int = 0  # optimiser steps skipped for a non-finite gradient, over the run
    step_reward_failures: tuple[int, int] = (0, 0)  # (timeouts, errors) of the latest scoring call
    skipped_long_prompts: int | None = None  # rows left out at setup (sampling.on_long_prompt: skip)

    def scored(self, timeouts: int, errors: int) -> None:
        self.reward_failures += timeouts + errors
        self.step_reward_failures = (timeouts, errors)

    def metrics(self) -> dict[str, float]:
        timeouts, errors = self.step_reward_failures
        counters = {
            "reward/failures_total": float(self.reward_failures),
            "reward/timeouts": float(timeouts),
            "reward/errors": float(errors),
        }
        if self.skipped_long_prompts is not None:
            counters["data/skipped_long_prompts"] = float(self.skipped_long_prompts)
        return counters

    def checkpoint_entries(self) -> dict[str, int]:
        return {"reward_failures_total": self.reward_failures, "skipped_updates_total": self.skipped_updates}

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.reward_failures = checkpoint.get("reward_failures_total", 0)
        self.skipped_updates = checkpoint.get("skipped_updates_total", 0)


def performance_metrics(
    rollout: RolloutBatch, timer: PhaseTimer, world_size: int, device: torch.device
) -> dict[str, float]:
    """Tokens per second (all tokens per device, and generated ones), peak host and device memory."""
    response_tokens = float(rollout.response_mask.sum())
    all_tokens = float(rollout.attention_mask.sum())
    step = timer.total()
    metrics = {
        "perf/throughput": all_tokens / max(step, 1e-9) / max(world_size, 1),
        "perf/gen_tokens_per_s": response_tokens / max(timer.seconds.get("gen", 0.0), 1e-9),
        "perf/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if device.type == "cuda":
        metrics["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return metrics


def correctness(components: dict[str, Tensor]) -> Tensor | None:
    """Per response, how right it is: the reward's ``accuracy`` component; with several rewards, the first one's
    that has one (``<name>/accuracy``). None when no reward reports an accuracy: the overall reward is not one."""
    if "accuracy" in components:
        return components["accuracy"]
    return next((v for k, v in components.items() if k.endswith("/accuracy")), None)


def correctness_or_overall(components: dict[str, Tensor]) -> Tensor:
    """:func:`correctness`, or the overall reward for a reward that reports no accuracy: for what needs a score for
    every answer whatever the reward (latent probes split by right / wrong, ``evaluate``)."""
    accuracy = correctness(components)
    return components["overall"] if accuracy is None else accuracy


class ValidationMeans:
    """The validation metrics of an epoch: each reward component, the response length, and accuracy as mean@k,
    pass@k and per data source. Kept in a plain dict (never in the module's state_dict, never sharded)."""

    def __init__(self) -> None:
        self.metrics: dict[str, MeanMetric] = {}

    def add(self, name: str, values: Tensor) -> None:
        if name not in self.metrics:
            self.metrics[name] = MeanMetric(nan_strategy="ignore").to(values.device)
        self.metrics[name].update(values)

    def add_rollout(self, components: dict[str, Tensor], rollout: RolloutBatch, batch: list[dict[str, Any]]) -> bool:
        """One validation batch: its rollout's reward ``components``, lengths and accuracies (``val/accuracy`` is
        :func:`correctness`'s mean, for one reward or several). Returns whether a reward reported an accuracy."""
        for name, values in components.items():
            if name != "accuracy":  # val/accuracy below
                self.add("val/reward" if name == "overall" else f"val/{name}", values)
        self.add("val/response_length", rollout.response_mask.sum(-1).float())
        accuracy = correctness(components)
        if accuracy is None:
            return False
        self.add("val/accuracy", accuracy)
        k = rollout.group_size
        per_prompt = accuracy.view(-1, k)  # (prompts, k)
        self.add(f"val/accuracy/mean@{k}", per_prompt.mean(-1))
        self.add(f"val/accuracy/pass@{k}", per_prompt.max(-1).values)
        for sample, value in zip(batch, per_prompt.mean(-1)):
            source = re.sub(r"[^\w.@-]+", "_", str(sample.get("data_source") or sample.get("source")))
            self.add(f"val/accuracy/source/{source}", value)
        return True

    def compute_all(self, device: torch.device) -> dict[str, Tensor]:
        """Every mean, reduced over all ranks by ``compute()``, then reset. Ranks may have seen different data sources,
        so the names are gathered first: every rank then syncs the same metrics in the same order."""
        names = set(self.metrics)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, sorted(names))
            names = set().union(*gathered)
        means = {}
        for name in sorted(names):
            if name not in self.metrics:  # seen by another rank only: this one syncs an empty mean
                self.metrics[name] = MeanMetric(nan_strategy="ignore").to(device)
            means[name] = self.metrics[name].compute()
            self.metrics[name].reset()
        return means
