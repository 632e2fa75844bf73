"""Qwen2-VL and Qwen2.5-VL: a prompt holds one ``<|image_pad|>`` token per image in its chat text; the processor
resizes each image to between ``min_pixels`` and ``max_pixels`` (a multiple of 28 pixels per side), cuts it into
14x14 patches and repeats the pad token once per 2x2 patches, so a prompt's length depends on its images' sizes.
``pixel_values`` holds the patches of *all* images of a batch, one row per patch, and ``image_grid_thw`` one
``(t, h, w)`` row per image; ``mm_token_type_ids`` marks the image tokens, from which (with the grids) the model
derives its 3-D (time, height, width) rotary positions itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from relax_pl.families.base import ModelFamily

IMAGE_TOKEN = "<|image_pad|>"


class Qwen2VL(ModelFamily):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    vision_language = True
    token_inputs = ("mm_token_type_ids",)

    def position_ids(self, attention_mask: Tensor, model_inputs: dict[str, Tensor]) -> Tensor | None:
        # with images the model numbers its rotary positions from mm_token_type_ids and the grids, as generate() did
        return None if "image_grid_thw" in model_inputs else super().position_ids(attention_mask, {})

    def fallback_processor(self, image_processor: Any, tokenizer: PreTrainedTokenizerBase) -> ImageTextProcessor:
        return ImageTextProcessor(image_processor, tokenizer)

    def image_tokens(self, image_processor: Any, image: Any) -> int:
        width, height = image.size
        patches = image_processor.get_number_of_image_patches(height, width, {})
        return patches // image_processor.merge_size**2

    def image_rows(self, tensors: dict[str, Tensor], images_per_prompt: list[int]) -> dict[str, list[int]]:
        """``image_grid_thw``: one row per image; ``pixel_values``: one row per patch, ``t * h * w`` per image."""
        if "image_grid_thw" not in tensors:
            return {}
        patches = tensors["image_grid_thw"].prod(-1).tolist()
        per_prompt, start = [], 0
        for n in images_per_prompt:
            per_prompt.append(int(sum(patches[start : start + n])))
            start += n
        return {"image_grid_thw": list(images_per_prompt), "pixel_values": per_prompt}

    def count_image_tokens(self, encoded: dict[str, Tensor]) -> list[int]:
        types = encoded.get("mm_token_type_ids")
        return (types != 0).sum(-1).tolist() if types is not None else super().count_image_tokens(encoded)


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
