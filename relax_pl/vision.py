"""Vision-language inputs (Qwen2-VL, Qwen2.5-VL): the processor, image-token accounting and the image tensors of
a batch of prompts.

A Qwen-VL prompt holds one ``<|image_pad|>`` token per image in its chat text; the processor resizes each image
to between ``min_pixels`` and ``max_pixels`` (a multiple of 28 pixels per side), cuts it into 14x14 patches and
repeats the pad token once per 2x2 patches, so a prompt's length depends on its images' sizes. ``pixel_values``
holds the patches of *all* images of a batch, one row per patch, and ``image_grid_thw`` one ``(t, h, w)`` row
per image: neither is indexed by prompt, hence :func:`split_by_prompt`.

Example::

    processor = load_processor("Qwen/Qwen2.5-VL-7B-Instruct", tokenizer, max_pixels=1024 * 28 * 28)
    batch = processor(text=[chat_text], images=[figure], return_tensors="pt", padding=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedTokenizerBase,
)
from transformers.utils import is_torchvision_available

from relax_pl.models import _auto_class, resolve_model_source

IMAGE_TOKEN = "<|image_pad|>"
# Token ids a response must never hold: an image placeholder in a response has no image features to fill it.
VISION_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


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


def is_vision_language(name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the checkpoint loads as an image-text-to-text model (reads only its config)."""
    source, gguf_file = resolve_model_source(name_or_path)
    if gguf_file is not None:
        return False
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    return _auto_class(config) is AutoModelForImageTextToText


def load_processor(
    name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The processor of a vision-language checkpoint, around the already configured ``tokenizer``.

    ``AutoProcessor`` where torchvision is installed (transformers needs it for the video half of Qwen-VL's
    processor); otherwise :class:`ImageTextProcessor`, which gives the same outputs for images and text.
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
        processor = ImageTextProcessor(image_processor, tokenizer)
    if not getattr(tokenizer, "chat_template", None) and getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    return processor


class ImageTextProcessor:
    """Qwen2-VL / Qwen2.5-VL's processor for text and images, without the video half (and so without torchvision).

    Each ``<|image_pad|>`` of ``text`` is repeated once per image token of its image (``h * w / merge_size**2``
    of the image's patch grid), in order; returns what ``Qwen2_5_VLProcessor`` returns for the same inputs:
    ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (1 on image tokens), ``pixel_values`` and
    ``image_grid_thw``.
    """

    def __init__(
        self, image_processor: Any, tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def __call__(
        self, text: list[str], images: list | None = None, return_tensors: str = "pt", padding: bool = True
    ) -> dict[str, Tensor]:
        vision: dict[str, Tensor] = {}
        if images:
            vision = {k: torch.as_tensor(v) for k, v in self.image_processor(images).items()}
            tokens_per_image = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
            text = expand_image_tokens(text, tokens_per_image, self.image_token)
        elif any(self.image_token in t for t in text):
            raise ValueError(f"the text holds {self.image_token} placeholders but no images were given")
        encoded = dict(self.tokenizer(text, return_tensors=return_tensors, padding=padding, add_special_tokens=False))
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).long()
        return {**encoded, **vision}


def expand_image_tokens(texts: list[str], tokens_per_image: list[int], image_token: str = IMAGE_TOKEN) -> list[str]:
    """Repeat the ``k``-th ``image_token`` of ``texts`` (counted across all texts) ``tokens_per_image[k]`` times.

    Raises:
        ValueError: the texts hold a different number of placeholders than there are images.
    """
    found = sum(t.count(image_token) for t in texts)
    if found != len(tokens_per_image):
        raise ValueError(f"the prompts hold {found} {image_token} placeholders for {len(tokens_per_image)} images")
    counts = iter(tokens_per_image)
    out = []
    for text in texts:
        pieces = text.split(image_token)
        out.append(pieces[0] + "".join(image_token * next(counts) + piece for piece in pieces[1:]))
    return out


def image_token_count(image_processor: Any, image: Any) -> int:
    """Image tokens one image takes in a prompt at the processor's pixel bounds (no pixels are processed)."""
    width, height = image.size
    patches = image_processor.get_number_of_image_patches(height, width, {})
    return patches // image_processor.merge_size**2


def vision_token_ids(model: Any) -> list[int]:
    """The vision placeholder token ids of a vision-language model's config (none for a text model)."""
    config = getattr(model, "config", None)
    return sorted({i for key in VISION_TOKEN_KEYS if isinstance(i := getattr(config, key, None), int)})


def split_by_prompt(
    encoded: dict[str, Tensor], images_per_prompt: list[int]
) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
    """The processor's non-token outputs and, for each, how many of its leading rows each prompt owns.

    ``image_grid_thw`` has one row per image; ``pixel_values`` one row per patch (``t * h * w`` of each image's
    grid); any other tensor must have one row per prompt. Token-aligned outputs (ids, masks, modality ids) are
    not included.

    Raises:
        ValueError: an output whose rows cannot be assigned to prompts.
    """
    token_aligned = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"}
    prompts = len(images_per_prompt)
    tensors = {k: v for k, v in encoded.items() if k not in token_aligned and isinstance(v, Tensor)}
    counts: dict[str, list[int]] = {}
    if "image_grid_thw" in tensors:
        counts["image_grid_thw"] = list(images_per_prompt)
        patches = tensors["image_grid_thw"].prod(-1).tolist()
        per_prompt, start = [], 0
        for n in images_per_prompt:
            per_prompt.append(int(sum(patches[start : start + n])))
            start += n
        counts["pixel_values"] = per_prompt
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
