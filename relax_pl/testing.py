"""Offline stand-ins for a real checkpoint: a small tokenizer and a tiny random model saved like a hub model.

Used by tests, benchmarks and CPU demo recipes. Nothing here touches the network.

Example::

    folder = save_tiny_model(tmp_path / "tiny")
    model, tokenizer = load_causal_lm(str(folder)), load_tokenizer(str(folder))

A tiny random vision-language model (for ``recipes/geometry_demo.yaml``) from the command line::

    python -m relax_pl.testing runs/tiny_qwen2_5_vl --kind qwen2_5_vl
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from relax_pl.models import build_tiny_model
from relax_pl.rollout import VLLM

PAD_EOS_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
MAX_VOCAB = 512

# Qwen2.5's template, minus its default system prompt: the rendered text is exactly the messages given.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# CHAT_TEMPLATE plus Qwen2-VL's rendering of content parts: an image part is
# <|vision_start|><|image_pad|><|vision_end|>.
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus(extra_words: list[str]) -> list[str]:
    """Text the BPE merges are learned from: chat roles, reasoning phrases and arithmetic in the boxed format."""
    text = [
        "system user assistant",
        "You are a helpful assistant.",
        "Please reason step by step, and put your final answer within \\boxed{}.",
        "Given the images and the question, please reason step by step.",
        "What is the answer? Let me think. The answer is",
        "Find the value of x in the triangle. The angle, the side, the area, the length.",
    ] * 20
    for a in range(10):
        for b in range(10):
            text.append(f"What is {a} + {b}? {a} + {b} = \\boxed{{{a + b}}}")
            text.append(f"Compute {a} * {b} - {b}: {a} * {b} - {b} = \\boxed{{{a * b - b}}}")
    # Repeated, with and without a leading space, so each word earns its own merges before the budget runs out.
    text += [f"{word} {word}" for word in extra_words for _ in range(50)]
    return text


def build_test_tokenizer(extra_words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of at most 512 tokens with Qwen's special tokens and chat template.

    Byte-level with Qwen2's pre-tokeniser, so every (NFC) string round-trips through encode/decode
    (arithmetic, ``\\boxed{}``, any Unicode) and digits are split one per token. ``<|endoftext|>`` is both
    pad and EOS; ``<|im_start|>`` and ``<|im_end|>`` frame chat turns. Built deterministically from a small
    built-in corpus.

    Args:
        extra_words: words to add to the corpus the merges are learned from, so a task's own vocabulary
            tokenises into few tokens.
    """
    # Qwen2's own normaliser and pre-tokeniser: a folder whose config says qwen2 loads as Qwen2Tokenizer,
    # which installs exactly these, so the saved tokenizer splits text the same way whichever class loads it.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB,
        min_frequency=2,
        special_tokens=[PAD_EOS_TOKEN, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(extra_words or []), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=PAD_EOS_TOKEN,
        pad_token=PAD_EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny_model(
    folder: str | Path, kind: Literal["qwen2", "llama"] = "qwen2", seed: int = 0, **config_args
) -> Path:
    """Write a tiny random model and the test tokenizer to ``folder``, as ``save_pretrained`` would for a hub model.

    The model's vocabulary is the tokenizer's; its generation config stops at ``<|im_end|>`` (the end of an
    assistant turn) or ``<|endoftext|>`` and pads with ``<|endoftext|>``, as Qwen2.5-Instruct's does.
    ``config_args`` change the shape (``models.tiny_model_config``'s arguments). Returns the folder.
    """
    folder = Path(folder)
    tokenizer = build_test_tokenizer()
    model = build_tiny_model(kind, vocab_size=len(tokenizer), seed=seed, **config_args)
    pad_id, im_end_id = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(IM_END)
    model.config.pad_token_id = pad_id
    model.config.eos_token_id = pad_id
    model.generation_config = GenerationConfig(eos_token_id=[im_end_id, pad_id], pad_token_id=pad_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_test_vl_tokenizer() -> PreTrainedTokenizerFast:
    """:func:`build_test_tokenizer` plus Qwen-VL's vision special tokens (``<|vision_start|>``, ``<|vision_end|>``,
    ``<|image_pad|>``, ``<|video_pad|>``, appended after the 512-token vocabulary) and :data:`VL_CHAT_TEMPLATE`."""
    tokenizer = build_test_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END, *VISION_TOKENS]})
    tokenizer.chat_template = VL_CHAT_TEMPLATE
    return tokenizer


def tiny_vl_config(
    kind: Literal["qwen2_5_vl", "qwen2_vl"], tokenizer: PreTrainedTokenizerFast
) -> Qwen2_5_VLConfig | Qwen2VLConfig:
    """A two-layer Qwen2.5-VL / Qwen2-VL config (text width 64, a two-block vision tower of width 32) whose
    vocabulary and vision token ids are ``tokenizer``'s."""
    ids = tokenizer.convert_tokens_to_ids
    pad = tokenizer.pad_token_id
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=4096, bos_token_id=pad, eos_token_id=pad, pad_token_id=pad,
        # 3-D rotary sections (time, height, width) over the 16/2 rotary frequencies of a head
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    tokens = dict(
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    if kind == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1], window_size=112)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    raise ValueError(f"kind={kind!r} is not 'qwen2_5_vl' or 'qwen2_vl'")


def save_tiny_vl_model(
    folder: str | Path,
    kind: Literal["qwen2_5_vl", "qwen2_vl"] = "qwen2_5_vl",
    seed: int = 0,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 64 * 28 * 28,
) -> Path:
    """Write a tiny random Qwen2.5-VL (or Qwen2-VL) model, its tokenizer (:func:`build_test_vl_tokenizer`) and its
    image processor (``preprocessor_config.json``, 4 to 64 image tokens per image by default) to ``folder``, as
    ``save_pretrained`` would for a hub checkpoint. The same seed gives the same weights. Returns the folder."""
    folder = Path(folder)
    tokenizer = build_test_vl_tokenizer()
    config = tiny_vl_config(kind, tokenizer)
    model_class = Qwen2_5_VLForConditionalGeneration if kind == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    pad_id, im_end_id = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config = GenerationConfig(eos_token_id=[im_end_id, pad_id], pad_token_id=pad_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Save a tiny random model with its tokenizer (and image processor).")
    parser.add_argument("folder")
    parser.add_argument("--kind", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen2_vl", "qwen2", "llama"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.kind in ("qwen2", "llama"):
        print(save_tiny_model(args.folder, kind=args.kind, seed=args.seed))
    else:
        print(save_tiny_vl_model(args.folder, kind=args.kind, seed=args.seed))


class StaleVLLM(VLLM):
    """VLLM whose weight and adapter syncs after the first do nothing: the engine keeps sampling from the weights
    it received before the first rollout (the failure of TRL's issue 5312 and verl's 7495). Its sync check must stop
    the run (tests/test_vllm.py, benchmarks/plugins_gpu.py)."""

    def load_weights(self) -> None:
        if not getattr(self, "weights_loaded", False):
            super().load_weights()
        self.weights_loaded = True

    def load_adapter(self) -> None:
        if not getattr(self, "adapter_loaded", False):
            super().load_adapter()
        self.adapter_loaded = True
