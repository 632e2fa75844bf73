"""The rollout seam: what every engine receives (prompts, :class:`SamplingConfig`) and returns (:class:`RolloutBatch`),
the handle :class:`RolloutContext` that is all an engine sees of the run, and the base class :class:`RolloutEngine`
whose hooks the module calls.

An engine turns rendered prompts into ``num_responses`` responses each. The module calls only the hooks below;
how the responses are sampled (the policy's own ``generate``, an inference engine beside it) is the engine's
business. The helpers here (prompt encoding, the rollout layout) keep every engine's rollout the same shape, so
the update, the rewards and the callbacks never see which engine sampled it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from relax_pl.errors import RecipeError
from relax_pl.families import ModelFamily
from relax_pl.vision import VisionConfig, gather_by_prompt, split_by_prompt


@dataclass
class SamplingConfig:
    """How responses are sampled (recipe key ``model.sampling``); every engine honours all of it."""

    num_responses: int = 8  # R responses per prompt (the group size)
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_prompt_tokens: int = 1024  # counted after chat templating, image tokens included
    # "error": a longer prompt fails with a message naming its row; "skip": such rows are left out of the data
    # when the run starts (counted and named in a warning), so every batch stays full and ranks stay in step
    on_long_prompt: Literal["skip", "error"] = "error"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise RecipeError("model.sampling.max_new_tokens", self.max_new_tokens, "a response needs >= 1 token")
        if self.num_responses < 1:
            raise RecipeError("model.sampling.num_responses", self.num_responses, "a group needs >= 1 response")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.temperature must be >= 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}")


@dataclass
class RolloutBatch:
    """The responses of one step, laid out as ``[left-padded prompt | right-padded response]`` per row.

    Rows ``g*R .. g*R + R - 1`` are the R responses of prompt ``g``. Fields after ``rollout_logp`` are filled by
    the module as the step proceeds (rewards, advantages, log-probs).
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
    # (N, P + T) each: the family's token-aligned forward inputs (Qwen-VL: mm_token_type_ids, 1 on image tokens)
    token_inputs: dict[str, Tensor] = field(default_factory=dict)
    # (N, T) the sampling engine's own log-probs of the sampled tokens (after temperature), zero on padding;
    # None when the policy sampled them itself. Their gap to the policy's is what importance sampling corrects.
    rollout_logp: Tensor | None = None
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
            token_inputs={k: v[rows.to(v.device)] for k, v in self.token_inputs.items()},
            rollout_logp=pick(self.rollout_logp),
            rewards=pick(self.rewards),
            reward_components={k: v[rows.to(v.device)] for k, v in self.reward_components.items()},
            advantages=pick(self.advantages),
            old_logp=pick(self.old_logp),
            ref_logp=pick(self.ref_logp),
            ref_logp_of_rows={},  # keyed by the old row numbers
        )

    def forward_inputs(self, rows: Tensor, width: int) -> dict[str, Tensor]:
        """The extra forward inputs of ``rows`` for a forward over their first ``width`` positions: each row's
        prompt's images (repeated for rows of the same prompt) and token-aligned inputs (modality ids)."""
        extra = {}
        if self.model_inputs:
            prompts = self.prompt_index[rows.to(self.prompt_index.device)].tolist()
            extra = gather_by_prompt(self.model_inputs, self.model_input_counts, prompts)
        for key, value in self.token_inputs.items():
            extra[key] = value[rows.to(value.device), :width]
        return extra


class WeightSyncError(RuntimeError):
    """An engine with weights of its own samples from weights other than the policy's (a sync that did not take
    effect): training on its samples would silently be off-policy."""


@dataclass(frozen=True)
class RolloutContext:
    """All an engine sees of the run, handed to :meth:`RolloutEngine.check` (``policy`` still None) and then to
    :meth:`RolloutEngine.setup`. The module builds it; an engine neither reads nor changes anything else.

    ``policy`` is the live model the optimiser updates in place: an engine may run it (no grad) and read its
    weights, never change them. ``max_prompt_tokens`` and ``max_new_tokens`` bound every request the run makes,
    training and validation. ``step`` reads the number of optimiser steps taken so far.
    """

    tokenizer: Any
    policy: nn.Module | None = None
    processor: Any = None  # vision-language models only
    family: ModelFamily | None = None
    pretrained: str = ""  # what the policy was loaded from (engines that read its config or processor files)
    trust_remote_code: bool = False
    vision: VisionConfig = field(default_factory=VisionConfig)
    device: torch.device = torch.device("cpu")  # where the policy runs (it may be moved there after setup)
    dtype: str = "float32"  # what the policy's forward computes in
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    lockstep: bool = False  # the setup's: every rank must run the same forwards (a sharded policy)
    generation: Callable[[], AbstractContextManager] = nullcontext  # the setup's context for generating
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    step: Callable[[], int] = lambda: 0


class RolloutEngine:
    """Base class of the rollout engines (recipe key ``model.rollout``, a ``class_path`` like ``model.setup``).

    The module calls, in order: :meth:`check` (the tokenizer and processor are loaded, no weights yet), :meth:`setup`
    (once the policy is built and sharded; Lightning may move it to its device only afterwards), then
    :meth:`generate` for every training and validation batch, :meth:`policy_updated` after every optimiser step that
    changed the policy and when a checkpoint's weights are loaded into it, and :meth:`verify_rollout` at the end of
    every training step. An engine receives a :class:`RolloutContext`, never the module. A new engine is one new
    subclass in its own file under ``relax_pl/rollout/``.

    ``importance_cap`` is read by the module when a rollout carries ``rollout_logp``: each token's policy loss is
    weighted by ``min(exp(logp_policy - logp_engine), importance_cap)`` (truncated importance sampling,
    :mod:`relax_pl.correction`); None leaves the loss as it is and only logs the gap.
    """

    importance_cap: float | None = None
    context: RolloutContext | None = None

    def check(self, context: RolloutContext) -> None:
        """Raise on settings this engine cannot run, naming the recipe key to change (``context.policy`` is None)."""

    def setup(self, context: RolloutContext) -> None:
        """Start the engine (the policy exists); an override calls ``super().setup(context)`` first."""
        self.context = context

    def generate(
        self, prompts: list[str], samples: list[dict[str, Any]], sampling: SamplingConfig, greedy: bool = False
    ) -> RolloutBatch:
        """``sampling.num_responses`` responses for each rendered prompt (``samples`` are their dataset rows),
        sampled with the current policy weights, greedily when ``greedy``."""
        raise NotImplementedError

    def policy_updated(self) -> None:
        """The policy's weights changed: the next :meth:`generate` must sample from the new ones."""

    def verify_rollout(self, logp_gap: float | None) -> dict[str, float]:
        """Check the step's measured gap between the policy's and the engine's log-probs of the sampled tokens
        (``rollout/logp_abs_diff``; None when the rollout carried none); return metrics of the engine's own."""
        return {}


@dataclass
class EncodedPrompts:
    """A batch of prompts encoded as the policy reads them: left-padded ids, and for vision-language models the
    image tensors kept once per prompt (``vision.split_by_prompt``) and the family's token-aligned inputs."""

    input_ids: Tensor  # (B, P)
    attention_mask: Tensor  # (B, P)
    token_inputs: dict[str, Tensor]  # (B, P) each; none for text models
    model_inputs: dict[str, Tensor]
    counts: dict[str, list[int]]


def encode_prompts(
    tokenizer, processor, prompts: list[str], samples: list[dict[str, Any]], max_prompt_tokens: int,
    device: torch.device, family: ModelFamily | None = None,
) -> EncodedPrompts:
    """Encode rendered prompts with the tokenizer, or for vision-language models with the processor together with
    each sample's ``"images"`` (in order), split by prompt as the model's ``family`` says; raise for a prompt over
    ``max_prompt_tokens``."""
    if processor is None:
        encoded = dict(tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False))
        model_inputs, counts, token_inputs = {}, {}, {}
    else:
        images = [image for sample in samples for image in sample.get("images") or []]
        encoded = dict(processor(text=prompts, images=images or None, return_tensors="pt", padding=True))
        images_per_prompt = [len(sample.get("images") or []) for sample in samples]
        model_inputs, counts = split_by_prompt(encoded, images_per_prompt, family)
        token_inputs = {k: encoded[k] for k in family.token_inputs if k in encoded}
    check_prompt_lengths(encoded, samples, max_prompt_tokens, family)
    return EncodedPrompts(
        input_ids=encoded["input_ids"].to(device),
        attention_mask=encoded["attention_mask"].to(device),
        token_inputs={k: v.to(device) for k, v in token_inputs.items()},
        model_inputs={k: v.to(device) for k, v in model_inputs.items()},
        counts=counts,
    )


def build_rollout(
    encoded: EncodedPrompts,
    responses: Tensor,
    response_mask: Tensor,
    tokenizer,
    samples: list[dict[str, Any]],
    group_size: int,
    rollout_logp: Tensor | None = None,
) -> RolloutBatch:
    """The :class:`RolloutBatch` of ``group_size`` responses per encoded prompt: ``responses`` ``(N, T)`` in prompt
    order, ``response_mask`` True up to and including each one's first stop token (positions after it are
    overwritten with the pad token)."""
    device = encoded.input_ids.device
    prompt_index = torch.arange(len(samples), device=device).repeat_interleave(group_size)
    responses = responses.to(device).masked_fill(~response_mask.to(device), tokenizer.pad_token_id)
    response_mask = response_mask.to(device)
    token_inputs = {  # response tokens are text: 0
        k: torch.cat([v[prompt_index], torch.zeros_like(responses, dtype=v.dtype)], dim=1)
        for k, v in encoded.token_inputs.items()
    }
    return RolloutBatch(
        input_ids=torch.cat([encoded.input_ids[prompt_index], responses], dim=1),
        attention_mask=torch.cat([encoded.attention_mask[prompt_index], response_mask.long()], dim=1),
        response_mask=response_mask,
        prompt_length=encoded.input_ids.shape[1],
        completions=tokenizer.batch_decode(responses, skip_special_tokens=True),
        samples=[s for s in samples for _ in range(group_size)],
        group_size=group_size,
        model_inputs=encoded.model_inputs,
        model_input_counts=encoded.counts,
        prompt_index=prompt_index,
        token_inputs=token_inputs,
        rollout_logp=None if rollout_logp is None else rollout_logp.to(device) * response_mask,
    )


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus the checkpoint's own stop tokens (Qwen2.5-Instruct stops on ``<|im_end|>``
    and ``<|endoftext|>``)."""
    ids = [tokenizer.eos_token_id]
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += model_eos if isinstance(model_eos, list) else [model_eos]
    return sorted({i for i in ids if i is not None})


def response_mask_from_tokens(responses: Tensor, eos_token_id: int | list[int]) -> Tensor:
    """True on each response's tokens up to and including its first EOS; False after it.

    Generation pads finished rows with ``pad_token_id``, which may equal EOS, so only the first EOS counts.
    """
    eos_ids = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=responses.device)
    is_eos = torch.isin(responses, eos_ids)
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return ~after_eos


def check_prompt_lengths(
    encoded: dict[str, Tensor], samples: list[dict[str, Any]], max_prompt_tokens: int, family: ModelFamily | None
) -> None:
    """Raise, naming the row, when an encoded prompt (image tokens included) is longer than ``max_prompt_tokens``:
    cutting it would leave image tokens without their image features, or a question without its end."""
    lengths = encoded["attention_mask"].sum(-1).tolist()
    image_tokens = family.count_image_tokens(encoded) if family is not None else [0] * len(lengths)
    for sample, length, images in zip(samples, lengths, image_tokens):
        if length > max_prompt_tokens:
            of_which = f" ({images} of them image tokens)" if images else ""
            raise ValueError(
                f"prompt of row {sample.get('row')} from {sample.get('source')!r} has {length} tokens{of_which}, more "
                f"than sampling.max_prompt_tokens={max_prompt_tokens}; raise the limit, lower model.vision.max_pixels "
                "for images, or set sampling.on_long_prompt: skip"
            )
