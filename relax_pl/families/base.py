"""The model-family seam: :class:`ModelFamily`, everything relax_pl needs to know about one family of checkpoints,
found by the checkpoint's ``config.model_type`` (:func:`family_of`).

The defaults follow transformers' conventions for decoder-only language models (the final norm is
``get_decoder().norm``, the blocks to shard are the classes in ``_no_split_modules``, positions count the attention
mask), so a text family whose checkpoints follow them works without an adapter. Whatever has no convention (how a
vision-language model numbers image positions, how its processor expands an image, which rows of ``pixel_values``
belong to which prompt) is a family's own; an unknown family that needs it fails naming the known ones.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

# model_type -> the adapter class that serves it; filled as adapter classes are defined
FAMILIES: dict[str, type[ModelFamily]] = {}
# config keys of token ids that a response must never hold: a vision placeholder has no image features to fill it
VISION_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


class ModelFamily:
    """Base class of the model-family adapters; a subclass names the ``model_types`` it serves and overrides what
    its family does its own way. Defining the subclass registers it (put it in ``relax_pl/families/``, which imports
    every file in it, or import it before the run).

    The module, the setups and the rollout engines call:

    * loading: :attr:`vision_language` (load with the image-text-to-text class and a processor), :meth:`check` (once
      the policy has loaded);
    * forwards: :meth:`final_norm` (its output is what callbacks see as hidden states), :meth:`position_ids`;
    * sharding: :meth:`decoder_blocks` (FSDP's units);
    * vision-language prompts: :attr:`token_inputs`, :meth:`fallback_processor`, :meth:`image_tokens`,
      :meth:`image_rows`, :meth:`count_image_tokens`, :meth:`vision_token_ids`.

    Example (GPT-2 keeps its final norm at ``transformer.ln_f``; its blocks are in ``_no_split_modules``)::

        class GPT2(ModelFamily):
            model_types = ("gpt2",)

            def final_norm(self, model):
                return unwrap(model).transformer.ln_f
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    vision_language: ClassVar[bool] = False
    # processor outputs with one value per token that the forward takes (padded with 0 over the response)
    token_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model_type: str | None) -> None:
        self.model_type = model_type

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for model_type in cls.model_types:
            if model_type in FAMILIES and FAMILIES[model_type].__qualname__ != cls.__qualname__:
                raise ValueError(f"model_type {model_type!r} has two adapters: {FAMILIES[model_type]} and {cls}")
            FAMILIES[model_type] = cls

    # ------------------------------------------------------------------------------------------------ loading
    def model_class(self) -> type:
        """The transformers auto class that loads this family's checkpoints for training and generation."""
        return AutoModelForImageTextToText if self.vision_language else AutoModelForCausalLM

    def check(self, model: nn.Module) -> None:
        """Raise, naming what is missing and the known families, when relax_pl cannot train ``model``; called as soon
        as the policy loads, so that a model without an adapter fails before the first rollout (its final norm,
        which every update forward reads; what only images or FSDP need is checked where it is needed)."""
        self.final_norm(model)

    # ------------------------------------------------------------------------------------------------ forwards
    def final_norm(self, model: nn.Module) -> nn.Module:
        """The module whose output is the final-norm hidden state (what ``hidden_states[-1]`` holds in HF outputs).

        Raises:
            ValueError: no final norm was found; the message names the model class and the known families.
        """
        base = unwrap(model)
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        norm = getattr(decoder, "norm", None)
        if not isinstance(norm, nn.Module):
            raise ValueError(
                f"No final norm found in {type(model).__name__} (looked for get_decoder().norm on "
                f"{type(base).__name__}); {self.needs_adapter('its final norm')}"
            )
        return norm

    def position_ids(self, attention_mask: Tensor, model_inputs: dict[str, Tensor]) -> Tensor | None:
        """The position ids of a forward over left-padded rows, numbered as ``generate()`` numbers them; None lets
        the model derive its own. ``model_inputs`` are the rows' extra inputs (images)."""
        if model_inputs:
            raise ValueError(f"{self.needs_adapter('how it numbers the positions of image inputs')}")
        return (attention_mask.cumsum(-1) - 1).clamp(min=0)

    # ------------------------------------------------------------------------------------------------ sharding
    def decoder_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The modules FSDP shards one at a time: the classes the model lists in ``_no_split_modules`` (its decoder
        layers and, for vision-language models, its vision blocks), else the decoder's ``layers``."""
        names = set(getattr(model, "_no_split_modules", None) or [])
        units = [m for m in model.modules() if type(m).__name__ in names]
        if units:
            return units
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"FSDP found no decoder blocks in {type(model).__name__} (no _no_split_modules, no "
                f"get_decoder().layers); {self.needs_adapter('its decoder blocks')}"
            )
        return list(layers)

    # ------------------------------------------------------------------------------------------------ vision
    def vision_token_ids(self, config: Any) -> list[int]:
        """Token ids a response must never hold (vision placeholders), from the config's conventional keys."""
        return sorted({i for key in VISION_TOKEN_KEYS if isinstance(i := getattr(config, key, None), int)})

    def fallback_processor(self, image_processor: Any, tokenizer: Any) -> Any:
        """A processor for text and images where transformers' own cannot be built (it needs torchvision)."""
        raise ValueError(f"{self.needs_adapter('a processor without torchvision')}; or pip install torchvision")

    def image_tokens(self, image_processor: Any, image: Any) -> int:
        """Tokens one image takes in a prompt at the processor's pixel bounds (no pixels are processed)."""
        raise ValueError(self.needs_adapter("how many tokens an image takes"))

    def image_rows(self, tensors: dict[str, Tensor], images_per_prompt: list[int]) -> dict[str, list[int]]:
        """For each image tensor of a processor's output, how many of its leading rows each prompt owns."""
        raise ValueError(self.needs_adapter("which image rows belong to which prompt"))

    def count_image_tokens(self, encoded: dict[str, Tensor]) -> list[int]:
        """Image tokens in each encoded prompt (for error messages)."""
        return [0] * len(encoded["input_ids"])

    def needs_adapter(self, what: str) -> str:
        known = ", ".join(sorted(FAMILIES))
        return (
            f"relax_pl does not know {what} for model_type {self.model_type!r}: the known families are {known}. "
            "A new family is one file in relax_pl/families/ (README, 'Write a model family')"
        )


def family_of(model_or_config: Any) -> ModelFamily:
    """The adapter of a model or config, by its ``model_type``; a family without one gets :class:`ModelFamily`'s
    conventions, loaded with the class transformers maps its ``model_type`` to."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type](model_type)
    return UnknownFamily(model_type)


class UnknownFamily(ModelFamily):
    """A family relax_pl has no adapter for: transformers' conventions, and its own class map for loading."""

    def model_class(self) -> type:
        if (
            self.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            and self.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        ):
            return AutoModelForImageTextToText
        return AutoModelForCausalLM

    @property
    def vision_language(self) -> bool:  # type: ignore[override]
        return self.model_class() is AutoModelForImageTextToText


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
