"""Hardware layouts. A setup builds the policy and the reference policy and names the Lightning strategy and
precision that go with them, so a recipe says it once (``model.setup``) and the Trainer follows."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
from torch import nn

from relax_pl.models import load_causal_lm

Dtype = Literal["float32", "bfloat16", "float16"]


class Setup:
    """Base class: how to build the models and which Trainer strategy/precision runs them."""

    def __init__(self, dtype: Dtype = "float32", gradient_checkpointing: bool = False) -> None:
        self.dtype = dtype
        self.gradient_checkpointing = gradient_checkpointing

    def build_policy(self, pretrained: str, trust_remote_code: bool = False) -> nn.Module:
        policy = load_causal_lm(pretrained, dtype=self.dtype, trust_remote_code=trust_remote_code)
        if self.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy.config.use_cache = False  # generate() turns the cache back on through its own config
        return policy

    def build_reference(self, policy: nn.Module) -> nn.Module | None:
        """A frozen reference policy, or None when the policy itself can act as one (see ``reference``)."""
        return copy.deepcopy(policy).eval().requires_grad_(False)

    def reference(self, policy: nn.Module, built: nn.Module | None) -> tuple[nn.Module, AbstractContextManager]:
        """The model to run for reference log-probs and the context to run it in."""
        return built, nullcontext()

    def trainer_overrides(self) -> dict:
        """Trainer arguments this setup decides (strategy, precision, devices)."""
        return {}


class SingleDevice(Setup):
    """The whole policy on one device (CPU or one GPU), full fine-tuning, a full copy as reference.

    Args:
        dtype: weights' dtype. float32 on the CPU; bfloat16 on a GPU.
        gradient_checkpointing: recompute decoder activations in backward to save memory.
    """

    def trainer_overrides(self) -> dict:
        return {"strategy": "auto", "devices": 1}


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
