"""From a dataset row to the policy's prompt: the tokenizer and, for a vision-language checkpoint, its processor
(:func:`load_processing`), the chat template applied to the row's messages (:func:`render_prompt`), and the prompt's
length in tokens with each image counted at its size (:func:`prompt_tokens`). No weights are read."""

from __future__ import annotations

from typing import Any

from relax_pl.families import ModelFamily
from relax_pl.models import checkpoint_family, load_tokenizer
from relax_pl.vision import VisionConfig, load_processor


def load_processing(
    pretrained: str, vision: VisionConfig, chat_template: str | None = None, trust_remote_code: bool = False
) -> tuple[Any, ModelFamily | None, Any]:
    """``(tokenizer, family, processor)`` of a checkpoint; the processor is None for a text model, the family None
    for a GGUF file (a text model whose family is read once it is loaded)."""
    tokenizer = load_tokenizer(pretrained, trust_remote_code=trust_remote_code, chat_template=chat_template)
    family = checkpoint_family(pretrained, trust_remote_code)
    processor = None
    if family is not None and family.vision_language:
        processor = load_processor(
            pretrained, tokenizer, family, vision.min_pixels, vision.max_pixels, trust_remote_code
        )
    return tokenizer, family, processor


def render_prompt(tokenizer: Any, processor: Any, sample: dict[str, Any], pretrained: str) -> str:
    """The row's messages through the chat template, ending where the assistant's answer starts.

    Raises:
        ValueError: the row has images but the model reads text only, or the tokenizer has no chat template.
    """
    if sample.get("images") and processor is None:
        raise ValueError(
            f"row {sample.get('row')} from {sample.get('source')!r} has images, but model.pretrained="
            f"{pretrained!r} is a text-only model; use a vision-language model or remove data.image_key"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {pretrained!r} has no chat template; set model.chat_template in the recipe")
    return tokenizer.apply_chat_template(sample["messages"], add_generation_prompt=True, tokenize=False)


def prompt_tokens(
    tokenizer: Any, processor: Any, family: ModelFamily | None, prompt: str, sample: dict[str, Any]
) -> int:
    """Tokens of the rendered ``prompt``, each of the row's images counted at its size after resizing."""
    tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    for image in sample.get("images") or []:  # its one placeholder token becomes the image's tokens
        tokens += family.image_tokens(processor.image_processor, image) - 1
    return tokens
