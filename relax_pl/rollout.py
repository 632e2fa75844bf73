"""Generation: prompts in, scored-later responses out.

One ``generate`` call per step samples ``num_responses`` responses for every prompt. Ranks that shard the
model (FSDP) must run the same number of decoding steps, so ``synced=True`` keeps them in lockstep.

The responses of a prompt share its prefix: :func:`shared_prefix_cache` encodes each prompt once and repeats its
key/value cache for every response, both before decoding and in the training forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import DynamicCache, GenerationConfig, LlamaModel

from relax_pl.vision import gather_by_prompt, split_by_prompt, vision_token_ids


@dataclass
class SamplingConfig:
    """How responses are sampled (recipe key ``model.sampling``)."""

    num_responses: int = 8  # R responses per prompt (the group size)
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_prompt_tokens: int = 1024  # counted after chat templating, image tokens included
    # "error": a longer prompt fails with a message naming its row; "skip": such rows are left out of the data
    # when the run starts (counted and named in a warning), so every batch stays full and ranks stay in step
    on_long_prompt: Literal["skip", "error"] = "error"
    # "dynamic": HF generate with a growing cache, each prompt encoded once for all its responses (best on the
    # CPU and for large batches); "static": a preallocated cache whose decoding step HF compiles with
    # torch.compile on a GPU (faster for moderate batches; the first step pays the compilation). Same sampling.
    backend: Literal["dynamic", "static"] = "dynamic"

    def __post_init__(self) -> None:
        if self.num_responses < 1 or self.max_new_tokens < 1:
            raise ValueError("sampling.num_responses and sampling.max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.temperature must be >= 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}")


@dataclass
class RolloutBatch:
    """The responses of one step, laid out as ``[left-padded prompt | right-padded response]`` per row.

    Rows ``g*R .. g*R + R - 1`` are the R responses of prompt ``g``. Fields after ``samples`` are filled by the
    module as the step proceeds (rewards, advantages, log-probs).
    """

    input_ids: Tensor  # (N, P + T)
    attention_mask: Tensor  # (N, P + T)
    response_mask: Tensor  # (N, T) bool: generated tokens up to and including the first EOS
    prompt_length: int  # P
    completions: list[str]
    samples: list[dict[str, Any]]  # the dataset row of each response's prompt
    group_size: int
    # Extra forward inputs stored once per prompt, not per response (vision.split_by_prompt): prompt g owns
    # model_input_counts[k][g] consecutive rows of model_inputs[k] (Qwen-VL: its image patches and grids).
    model_inputs: dict[str, Tensor] = field(default_factory=dict)
    model_input_counts: dict[str, list[int]] = field(default_factory=dict)
    prompt_index: Tensor | None = None  # (N,) the prompt of model_inputs each row's response answers
    mm_token_type_ids: Tensor | None = None  # (N, P + T) Qwen-VL's modality of each position (1: image token)
    rewards: Tensor | None = None  # (N,)
    reward_components: dict[str, Tensor] = field(default_factory=dict)
    advantages: Tensor | None = None  # (N,)
    old_logp: Tensor | None = None  # (N, T); None when the update is on-policy in one pass
    ref_logp: Tensor | None = None  # (N, T), when computed for every response before the update
    # otherwise the reference log-probs of the rows callbacks selected during the update, row -> (T,), so that
    # PPO epochs that revisit a row do not run the reference again
    ref_logp_of_rows: dict[int, Tensor] = field(default_factory=dict, repr=False)

    @property
    def responses(self) -> Tensor:
        return self.input_ids[:, self.prompt_length :]

    @property
    def group_index(self) -> Tensor:
        return torch.arange(len(self.completions), device=self.input_ids.device) // self.group_size

    def __len__(self) -> int:
        return len(self.completions)

    def select(self, rows: Tensor) -> RolloutBatch:
        """The rollout restricted to ``rows`` (a 1-D index tensor; keep whole groups to keep ``group_index`` right)."""
        idx = rows.tolist()
        pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        return replace(
            self,
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            response_mask=self.response_mask[rows],
            completions=[self.completions[i] for i in idx],
            samples=[self.samples[i] for i in idx],
            prompt_index=pick(self.prompt_index),
            mm_token_type_ids=pick(self.mm_token_type_ids),
            rewards=pick(self.rewards),
            reward_components={k: v[rows.to(v.device)] for k, v in self.reward_components.items()},
            advantages=pick(self.advantages),
            old_logp=pick(self.old_logp),
            ref_logp=pick(self.ref_logp),
            ref_logp_of_rows={},  # keyed by the old row numbers
        )

    def forward_inputs(self, rows: Tensor, width: int) -> dict[str, Tensor]:
        """The extra forward inputs of ``rows`` for a forward over their first ``width`` positions: each row's
        prompt's images (repeated for rows of the same prompt) and modality ids."""
        extra = {}
        if self.model_inputs:
            prompts = self.prompt_index[rows.to(self.prompt_index.device)].tolist()
            extra = gather_by_prompt(self.model_inputs, self.model_input_counts, prompts)
        if self.mm_token_type_ids is not None:
            extra["mm_token_type_ids"] = self.mm_token_type_ids[rows.to(self.mm_token_type_ids.device), :width]
        return extra


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus the checkpoint's own stop tokens (Qwen2.5-Instruct stops on ``<|im_end|>``
    and ``<|endoftext|>``)."""
    ids = [tokenizer.eos_token_id]
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += model_eos if isinstance(model_eos, list) else [model_eos]
    return sorted({i for i in ids if i is not None})


def generation_config(
    sampling: SamplingConfig,
    stop_ids: list[int],
    pad_id: int,
    greedy: bool = False,
    suppress_ids: list[int] | None = None,
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
        cache_implementation="static" if sampling.backend == "static" else None,
    )


def response_mask_from_tokens(responses: Tensor, eos_token_id: int | list[int]) -> Tensor:
    """True on each response's tokens up to and including its first EOS; False after it.

    Generation pads finished rows with ``pad_token_id``, which may equal EOS, so only the first EOS counts.
    """
    eos_ids = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=responses.device)
    is_eos = torch.isin(responses, eos_ids)
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return ~after_eos


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
) -> RolloutBatch:
    """Sample ``num_responses`` (default ``sampling.num_responses``) responses for each rendered prompt.

    With a ``processor`` (vision-language models) the prompts are encoded together with each sample's
    ``"images"``, in order; their patches go through generation and are kept once per prompt in the rollout.
    """
    group_size = sampling.num_responses if num_responses is None else num_responses
    device = next(model.parameters()).device
    if processor is None:
        encoded = dict(tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False))
    else:
        images = [image for sample in samples for image in sample.get("images") or []]
        encoded = dict(processor(text=prompts, images=images or None, return_tensors="pt", padding=True))
    check_prompt_lengths(encoded, samples, sampling.max_prompt_tokens)
    images_per_prompt = [len(sample.get("images") or []) for sample in samples]
    model_inputs, counts = split_by_prompt(encoded, images_per_prompt) if processor is not None else ({}, {})
    model_inputs = {k: v.to(device) for k, v in model_inputs.items()}
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
    input_ids = encoded["input_ids"].to(device).repeat_interleave(group_size, dim=0)
    attention_mask = encoded["attention_mask"].to(device).repeat_interleave(group_size, dim=0)
    extra = gather_by_prompt(model_inputs, counts, prompt_index.tolist())
    prompt_types = encoded.get("mm_token_type_ids")
    if prompt_types is not None:
        extra["mm_token_type_ids"] = prompt_types = prompt_types.to(device).repeat_interleave(group_size, dim=0)
    config = generation_config(
        sampling, stop_token_ids(model, tokenizer), tokenizer.pad_token_id, greedy=greedy,
        suppress_ids=vision_token_ids(model),
    )
    was_training = model.training
    model.eval()
    try:
        # the dynamic backend encodes each prompt once (all but its last token, from which generate() decodes);
        # not with images (their rotary positions span the whole sequence) nor on sharded ranks (one forward each)
        if sampling.backend == "dynamic" and group_size > 1 and input_ids.shape[1] > 1 and not extra and not synced:
            prompt_ids, prompt_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
            extra[CACHE_ARG] = shared_prefix_cache(model, prompt_ids[:, :-1], prompt_mask[:, :-1], prompt_index)
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, synced_gpus=synced, **extra
        )
    finally:
        model.train(was_training)
    prompt_length = input_ids.shape[1]
    responses = sequences[:, prompt_length:]
    response_mask = response_mask_from_tokens(responses, config.eos_token_id)
    responses = responses.masked_fill(~response_mask, tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    if prompt_types is not None:  # response tokens are text
        prompt_types = torch.cat([prompt_types, torch.zeros_like(responses, dtype=prompt_types.dtype)], dim=1)
    return RolloutBatch(
        input_ids=torch.cat([input_ids, responses], dim=1),
        attention_mask=torch.cat([attention_mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        prompt_length=prompt_length,
        completions=completions,
        samples=[s for s in samples for _ in range(group_size)],
        group_size=group_size,
        model_inputs=model_inputs,
        model_input_counts=counts,
        prompt_index=prompt_index,
        mm_token_type_ids=prompt_types,
    )


def check_prompt_lengths(encoded: dict[str, Tensor], samples: list[dict[str, Any]], max_prompt_tokens: int) -> None:
    """Raise, naming the row, when an encoded prompt (image tokens included) is longer than ``max_prompt_tokens``:
    cutting it would leave image tokens without their image features, or a question without its end."""
    lengths = encoded["attention_mask"].sum(-1).tolist()
    types = encoded.get("mm_token_type_ids")
    image_tokens = (types != 0).sum(-1).tolist() if types is not None else [0] * len(lengths)
    for sample, length, images in zip(samples, lengths, image_tokens):
        if length > max_prompt_tokens:
            of_which = f" ({images} of them image tokens)" if images else ""
            raise ValueError(
                f"prompt of row {sample.get('row')} from {sample.get('source')!r} has {length} tokens{of_which}, more "
                f"than sampling.max_prompt_tokens={max_prompt_tokens}; raise the limit, lower model.vision.max_pixels "
                "for images, or set sampling.on_long_prompt: skip"
            )
