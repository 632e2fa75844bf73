"""The policy's weights as an inference engine loads them: under their Hugging Face checkpoint names, one full
tensor at a time, so that streaming them never builds a second full copy of the model beside the engine's.

Used by every engine that keeps weights of its own (:class:`relax_pl.rollout.VLLM`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

ADAPTER_MARKERS = ("lora_", ".modules_to_save.")


def is_adapter_policy(policy: nn.Module) -> bool:
    """Whether the policy is a PEFT model whose adapter is what trains (``relax_pl.setups.QLoRA``)."""
    return hasattr(policy, "peft_config") and hasattr(policy, "get_base_model")


def adapter_rank(policy: nn.Module) -> int:
    return int(policy.peft_config["default"].r)


def base_model(policy: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (with its adapter layers injected), or the policy itself."""
    return policy.get_base_model() if is_adapter_policy(policy) else policy


def base_weights(policy: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(checkpoint name, full tensor)`` for every parameter of the policy's base model, produced one at a time.

    * FSDP2 shards (``DTensor``) are gathered one parameter at a time, when the consumer asks for it; it is a
      collective, so every rank must consume the whole iterator, in order, at the same point of the step.
    * Under a PEFT adapter the base weights are yielded (``...q_proj.base_layer.weight`` as ``...q_proj.weight``)
      and the adapter's own tensors are left out: the engine receives them through its LoRA support.
    * 4-bit bitsandbytes weights are de-quantised, one at a time, to the dtype the policy computes in: the engine's
      base is then exactly the one the policy multiplies with, never a re-quantised or merged copy.
    """
    from torch.distributed.tensor import DTensor

    # tied weights under each of their names: the engine keeps its output head apart from the embedding
    for name, param in base_model(policy).named_parameters(remove_duplicate=False):
        if any(marker in name for marker in ADAPTER_MARKERS):
            continue
        tensor = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        if hasattr(param, "quant_state"):  # bitsandbytes Params4bit
            import bitsandbytes as bnb

            tensor = bnb.functional.dequantize_4bit(param.data, param.quant_state)
        yield name.replace(".base_layer.", "."), tensor


def save_adapter(policy: nn.Module, folder: Path) -> None:
    """Write the policy's adapter (weights and ``adapter_config.json``) as a PEFT folder that vLLM's LoRA loader
    reads; only the adapter's tensors are written (megabytes), never the base."""
    with torch.no_grad():
        policy.save_pretrained(str(folder))
