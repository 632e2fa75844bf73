"""Rollout engines: prompts in, responses (and, from an engine of its own, their log-probs) out.

The recipe picks one with ``model.rollout`` (a ``class_path``); the module calls only the :class:`RolloutEngine`
hooks. One engine per file:

* :class:`HFGenerate` (``hf.py``): the policy's own Hugging Face ``generate``; the default.
* :class:`HFContinuousBatching` (``hf_continuous.py``): transformers' continuous batching on the policy itself.
* :class:`VLLM` (``vllm.py``): a vLLM engine colocated in each training process, synced after every update.

``base.py`` holds what they share (the :class:`RolloutBatch` layout, prompt encoding); ``weights.py`` streams the
policy's weights to an engine that keeps its own; ``sampling.py`` is :class:`HFGenerate`'s draw (the row's CDF
inverted, in place of ``torch.multinomial``). A new engine is one file: any importable module, named in the
recipe by its ``class_path`` (README, "Writing an engine"); an import line below only gives a built-in one the short
``relax_pl.rollout.<Name>`` path. An engine sees the run only through its :class:`RolloutContext` (the policy, the
tokenizer, the device, the ranks, the setup's ``lockstep``, ...), never the module: nothing here imports it.
"""

from relax_pl.rollout.base import (
    RolloutBatch,
    RolloutContext,
    RolloutEngine,
    SamplingConfig,
    WeightSyncError,
    check_prompt_lengths,
    response_mask_from_tokens,
    stop_token_ids,
)
from relax_pl.rollout.hf import CACHE_ARG, HFGenerate, generate, generation_config, shared_prefix_cache
from relax_pl.rollout.hf_continuous import HFContinuousBatching
from relax_pl.rollout.vllm import VLLM

__all__ = [
    "CACHE_ARG",
    "HFContinuousBatching",
    "HFGenerate",
    "RolloutBatch",
    "RolloutContext",
    "RolloutEngine",
    "SamplingConfig",
    "VLLM",
    "WeightSyncError",
    "check_prompt_lengths",
    "generate",
    "generation_config",
    "response_mask_from_tokens",
    "shared_prefix_cache",
    "stop_token_ids",
]
