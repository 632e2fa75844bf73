"""Hugging Face ``generate`` on the policy itself: the default engine, with no dependency beyond transformers.

One ``generate`` call per step samples ``num_responses`` responses for every prompt. Under a setup that declares
``lockstep`` (FSDP: every rank holds a shard) the ranks must run the same number of decoding steps, so they generate
with ``synced_gpus``.

The responses of a prompt share its prefix: :func:`shared_prefix_cache` encodes each prompt once and repeats its
key/value cache for every response, both before decoding and in the training forward.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import DynamicCache, GenerationConfig, LlamaModel

from relax_pl.rollout.base import (
    RolloutBatch,
    RolloutEngine,
    SamplingConfig,
    build_rollout,
    encode_prompts,
    response_mask_from_tokens,
    stop_token_ids,
)
from relax_pl.families import family_of
from relax_pl.rollout.sampling import sampling_processors
from relax_pl.vision import gather_by_prompt, vision_token_ids


class HFGenerate(RolloutEngine):
    """Sample with the policy's own ``generate`` (recipe: ``model.rollout: {class_path: relax_pl.rollout.HFGenerate}``,
    the default). The samples come from the policy itself, so there is no weight sync and no importance correction.

    Args:
        cache: ``"dynamic"``: a growing key/value cache, each prompt encoded once for all its responses (best on
            the CPU and for large batches); ``"static"``: a preallocated cache whose decoding step transformers
            compiles with ``torch.compile`` on a GPU (faster for moderate batches; the first step pays the
            compilation). Both draw the same samples from the same seed.
    """

    def __init__(self, cache: Literal["dynamic", "static"] = "dynamic") -> None:
        self.cache = cache

    def generate(
        self, prompts: list[str], samples: list[dict[str, Any]], sampling: SamplingConfig, greedy: bool = False
    ) -> RolloutBatch:
        run = self.context
        with run.generation():
            return generate(  # sharded ranks run the same decoding steps (synced)
                run.policy, run.tokenizer, prompts, samples, sampling, greedy=greedy, synced=run.lockstep,
                processor=run.processor, cache=self.cache,
            )


def generation_config(
    sampling: SamplingConfig,
    stop_ids: list[int],
    pad_id: int,
    greedy: bool = False,
    suppress_ids: list[int] | None = None,
    cache: Literal["dynamic", "static"] = "dynamic",
) -> GenerationConfig:
    """A complete GenerationConfig, so the model's own ``generation_config`` defaults (a top_p or
    repetition penalty shipped with the checkpoint) never change the sampling the recipe asked for.
    ``suppress_ids`` are never sampled (vision placeholders: a response holding one could not be re-read)."""
    do_sample = not greedy and sampling.temperature > 0
    return GenerationConfig(
        do_sample=do_sample,
        temperature=sampling.temperature if do_sample else None,
        top_p=sampling.top_p if do_sample else None,
        top_k=sampling.top_k if do_sample else None,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        repetition_penalty=1.0,
        suppress_tokens=suppress_ids or None,
        use_cache=True,
        cache_implementation="static" if cache == "static" else None,
    )


# transformers 5.x renamed the forward's and generate's `past_key_values` argument to `cache` (the old name warns)
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def shared_prefix_cache(model, input_ids: Tensor, attention_mask: Tensor, rows: Tensor) -> DynamicCache:
    """``model``'s key/value cache over the distinct left-padded prefixes ``input_ids`` ``(B, L)``, each encoded
    once, then repeated so that row ``i`` of the cache holds prefix ``rows[i]`` (``rows``: ``(N,)`` indices).

    Exact: in a causal model a prefix's keys and values do not depend on what follows it, so the responses of a
    prompt can all continue from one encoding of it. Indexing is differentiable, so under grad the prefix's
    backward also runs once, with the gradients of all its responses summed.
    """
    cache = DynamicCache(config=model.config)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
    model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
        logits_to_keep=1, **{CACHE_ARG: cache},
    )
    cache.batch_select_indices(rows)
    return cache


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    samples: list[dict[str, Any]],
    sampling: SamplingConfig,
    *,
    greedy: bool = False,
    num_responses: int | None = None,
    synced: bool = False,
    processor: Any = None,
    cache: Literal["dynamic", "static"] = "dynamic",
) -> RolloutBatch:
    """Sample ``num_responses`` (default ``sampling.num_responses``) responses for each rendered prompt with
    ``model.generate`` (:class:`HFGenerate`'s work, callable without a module).

    With a ``processor`` (vision-language models) the prompts are encoded together with each sample's
    ``"images"``, in order; their patches go through generation and are kept once per prompt in the rollout.
    """
    group_size = sampling.num_responses if num_responses is None else num_responses
    device = next(model.parameters()).device
    encoded = encode_prompts(
        tokenizer, processor, prompts, samples, sampling.max_prompt_tokens, device, family=family_of(model)
    )
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
    input_ids, attention_mask = encoded.input_ids[prompt_index], encoded.attention_mask[prompt_index]
    extra = gather_by_prompt(encoded.model_inputs, encoded.counts, prompt_index.tolist())
    extra.update({k: v[prompt_index] for k, v in encoded.token_inputs.items()})
    config = generation_config(
        sampling, stop_token_ids(model, tokenizer), tokenizer.pad_token_id, greedy=greedy,
        suppress_ids=vision_token_ids(model), cache=cache,
    )
    was_training = model.training
    model.eval()
    try:
        # the dynamic cache encodes each prompt once (all but its last token, from which generate() decodes);
        # not with images (their rotary positions span the whole sequence) nor on sharded ranks (one forward each)
        if cache == "dynamic" and group_size > 1 and input_ids.shape[1] > 1 and not extra and not synced:
            extra[CACHE_ARG] = shared_prefix_cache(
                model, encoded.input_ids[:, :-1], encoded.attention_mask[:, :-1], prompt_index
            )
        decoding, sampler = sampling_processors(config)
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=decoding, logits_processor=sampler,
            synced_gpus=synced, **extra,
        )
    finally:
        model.train(was_training)
    responses = sequences[:, input_ids.shape[1] :]
    response_mask = response_mask_from_tokens(responses, config.eos_token_id)
    return build_rollout(encoded, responses, response_mask, tokenizer, samples, group_size)
