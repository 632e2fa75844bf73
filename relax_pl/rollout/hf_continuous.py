"""transformers' continuous batching (``model.generate_batch``) on the policy itself: a paged key/value cache and a
scheduler that refills the batch as responses finish, with no dependency beyond transformers (what TRL offers as
``use_transformers_continuous_batching``).

The responses come from the policy's own weights, so there is nothing to sync and no importance correction. Text
only: ``generate_batch`` takes token ids, not images. One process only: its scheduler decides each rank's forwards
on its own, while FSDP ranks must run theirs in lockstep.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from relax_pl.rollout.base import (
    RolloutBatch,
    RolloutContext,
    RolloutEngine,
    SamplingConfig,
    build_rollout,
    encode_prompts,
    response_mask_from_tokens,
    stop_token_ids,
)
from relax_pl.rollout.hf import generation_config

PAGE_SIZE = 256  # tokens per key/value cache block (ContinuousBatchingConfig's default page_size)


class HFContinuousBatching(RolloutEngine):
    """Sample with ``policy.generate_batch``
    (recipe: ``model.rollout: {class_path: relax_pl.rollout.HFContinuousBatching}``).

    Args:
        max_batch_tokens: tokens per forward. None: on a GPU transformers sizes it from the free memory; on a CPU
            it is the rollout's prompt tokens (all prompts are encoded in one forward).
        num_blocks: key/value cache blocks of 256 tokens. None: on a GPU transformers' choice; on a CPU exactly
            what the rollout's sequences need (sized for a GPU's memory, the cache takes seconds to allocate
            on every call).
    """

    def __init__(self, max_batch_tokens: int | None = None, num_blocks: int | None = None) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.num_blocks = num_blocks

    def check(self, context: RolloutContext) -> None:
        if context.processor is not None:
            raise ValueError(
                f"model.rollout HFContinuousBatching takes no images, and model.pretrained={context.pretrained!r} is a "
                "vision-language model; use relax_pl.rollout.HFGenerate or relax_pl.rollout.VLLM"
            )
        if context.lockstep:
            raise ValueError(
                "model.rollout HFContinuousBatching schedules each process's forwards on its own, but sharded ranks "
                "must run theirs in lockstep; use relax_pl.rollout.HFGenerate or relax_pl.rollout.VLLM with FSDP"
            )

    @torch.no_grad()
    def generate(
        self, prompts: list[str], samples: list[dict[str, Any]], sampling: SamplingConfig, greedy: bool = False
    ) -> RolloutBatch:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        policy, tokenizer = self.context.policy, self.context.tokenizer
        device = next(policy.parameters()).device
        encoded = encode_prompts(tokenizer, None, prompts, samples, sampling.max_prompt_tokens, device)
        inputs = [ids[mask.bool()].tolist() for ids, mask in zip(encoded.input_ids, encoded.attention_mask)]
        config = generation_config(sampling, stop_token_ids(policy, tokenizer), tokenizer.pad_token_id, greedy=greedy)
        group = sampling.num_responses
        config.num_return_sequences = 1 if greedy else group  # a greedy response is the same every time: repeated
        # generate_batch seeds the global generator it samples from; the seed is drawn from it (so checkpoints keep
        # it, and a resumed run draws the same responses) and the generator is restored around the call
        seed = int(torch.randint(0, 2**31, ()))
        batching = ContinuousBatchingConfig(seed=seed, **self.cache_size(device, inputs, sampling, group))
        was_training = policy.training
        policy.eval()
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                outputs = policy.generate_batch(
                    inputs, generation_config=config, continuous_batching_config=batching, progress_bar=False
                )
        finally:
            policy.train(was_training)
        responses = [[] for _ in range(len(prompts) * group)]
        for request_id, output in outputs.items():
            prompt, child = request_position(request_id)
            for copy in range(group if greedy else 1):
                responses[prompt * group + (copy if greedy else child)] = list(output.generated_tokens)
        width = max(1, max(len(r) for r in responses))
        tokens = torch.full((len(responses), width), tokenizer.pad_token_id, dtype=torch.long)
        for row, response in enumerate(responses):
            tokens[row, : len(response)] = torch.tensor(response, dtype=torch.long)
        return build_rollout(
            encoded, tokens, response_mask_from_tokens(tokens, config.eos_token_id), tokenizer, samples, group
        )

    def cache_size(
        self, device: torch.device, inputs: list[list[int]], sampling: SamplingConfig, group: int
    ) -> dict[str, int | None]:
        max_batch_tokens, num_blocks = self.max_batch_tokens, self.num_blocks
        if device.type == "cpu":
            longest = max(len(ids) for ids in inputs) + sampling.max_new_tokens
            num_blocks = num_blocks or len(inputs) * group * math.ceil(longest / PAGE_SIZE)
            max_batch_tokens = max_batch_tokens or max(sum(len(ids) for ids in inputs), len(inputs) * group)
        return {"max_batch_tokens": max_batch_tokens, "num_blocks": num_blocks}


def request_position(request_id: str) -> tuple[int, int]:
    """``(prompt, response)`` of a ``generate_batch`` request id: ``req_<prompt>`` is a prompt's first response,
    ``req_<prompt>__child#<k>`` its ``k + 2``-th."""
    head, _, child = request_id.partition("__child#")
    if not head.startswith("req_"):
        raise RuntimeError(
            f"unexpected generate_batch request id {request_id!r}: this transformers release names them differently"
        )
    return int(head.removeprefix("req_")), int(child) + 1 if child else 0
