"""Vision-language inputs: the processor and the image tensors of a batch of prompts, whatever the family.

A processor's ``pixel_values`` and image grids are not indexed by prompt (Qwen-VL: one row per patch of *all* images
of the batch), hence :func:`split_by_prompt`, which asks the checkpoint's family (:mod:`relax_pl.families`) which
rows belong to which prompt, and :func:`gather_by_prompt`, which picks them out again for any rows of a rollout.

Example::

    processor = load_processor("Qwen/Qwen2.5-VL-7B-Instruct", tokenizer, family, max_pixels=1024 * 28 * 28)
    batch = processor(text=[chat_text], images=[figure], return_tensors="pt", padding=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import AutoImageProcessor, AutoProcessor, PreTrainedTokenizerBase
from transformers.utils import is_torchvision_available

from relax_pl.families import ModelFamily, family_of
from relax_pl.models import resolve_model_source


@dataclass
class VisionConfig:
    """How images are resized for a vision-language policy (recipe key ``model.vision``; unused for text models).

    Qwen2-VL / Qwen2.5-VL turn every 28x28 pixels into one image token: 512x512 is 334 tokens, 2048x2048 5,350.
    None keeps the checkpoint's own bound (Qwen2.5-VL: 3,136 to 12,845,056 pixels).
    """

    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 28 * 28:
                raise ValueError(f"model.vision.{name} must be at least 784 (one 28x28 image token), got {value}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"model.vision.min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}")


def load_processor(
    name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    family: ModelFamily,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The processor of a vision-language checkpoint, around the already configured ``tokenizer``.

    ``AutoProcessor`` where torchvision is installed (transformers needs it for the video half of Qwen-VL's
    processor); otherwise the family's own (:meth:`~relax_pl.families.ModelFamily.fallback_processor`; Qwen-VL:
    ``ImageTextProcessor``, which gives the same outputs for images and text).
    Either way the image processor comes from the checkpoint's ``preprocessor_config.json`` with the recipe's
    pixel bounds, and the tokenizer's chat template falls back to the processor's.
    """
    source, _ = resolve_model_source(name_or_path)
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **bounds)
    if is_torchvision_available():
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        processor.image_processor, processor.tokenizer = image_processor, tokenizer
    else:
        processor = family.fallback_processor(image_processor, tokenizer)
    if not getattr(tokenizer, "chat_template", None) and getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    return processor


def vision_token_ids(model: Any) -> list[int]:
    """The vision placeholder token ids of a model (none for a text model): a response must never hold one."""
    return family_of(model).vision_token_ids(getattr(model, "config", None))


def split_by_prompt(
    encoded: dict[str, Tensor], images_per_prompt: list[int], family: ModelFamily
) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
    """The processor's non-token outputs and, for each, how many of its leading rows each prompt owns.

    The family says it for its image tensors (:meth:`~relax_pl.families.ModelFamily.image_rows`; Qwen-VL:
    ``image_grid_thw`` one row per image, ``pixel_values`` one per patch); any other tensor must have one row per
    prompt. Token-aligned outputs (ids, masks, the family's ``token_inputs``) are not included.

    Raises:
        ValueError: an output whose rows cannot be assigned to prompts.
    """
    token_aligned = {"input_ids", "attention_mask", "token_type_ids", *family.token_inputs}
    prompts = len(images_per_prompt)
    tensors = {k: v for k, v in encoded.items() if k not in token_aligned and isinstance(v, Tensor)}
    counts = family.image_rows(tensors, images_per_prompt) if tensors else {}
    for key, value in tensors.items():
        if key in counts:
            continue
        if value.shape[0] != prompts:
            raise ValueError(
                f"processor output {key!r} has {value.shape[0]} rows for {prompts} prompts; cannot tell which "
                "prompt each row belongs to"
            )
        counts[key] = [1] * prompts
    return tensors, counts


def gather_by_prompt(tensors: dict[str, Tensor], counts: dict[str, list[int]], prompts: list[int]) -> dict[str, Tensor]:
    """The rows of ``prompts`` (repeats allowed, in order) of every tensor split by :func:`split_by_prompt`."""
    out = {}
    for key, value in tensors.items():
        sizes = counts[key]
        starts = [0]
        for size in sizes[:-1]:
            starts.append(starts[-1] + size)
        index = [i for p in prompts for i in range(starts[p], starts[p] + sizes[p])]
        if index:  # prompts without images get no (empty) image inputs: the model then takes them for text
            out[key] = value[torch.tensor(index, dtype=torch.long, device=value.device)]
    return out
