"""Offline stand-ins for a real checkpoint: a small tokenizer and a tiny random model saved like a hub model.

Used by tests, benchmarks and CPU demo recipes. Nothing here touches the network.

Example::

    folder = save_tiny_model(tmp_path / "tiny")
    model, tokenizer = load_causal_lm(str(folder)), load_tokenizer(str(folder))
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from relax_pl.models import build_tiny_model

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


def save_tiny_model(folder: str | Path, kind: Literal["qwen2", "llama"] = "qwen2", seed: int = 0) -> Path:
    """Write a tiny random model and the test tokenizer to ``folder``, as ``save_pretrained`` would for a hub model.

    The model's vocabulary is the tokenizer's; its generation config stops at ``<|im_end|>`` (the end of an
    assistant turn) or ``<|endoftext|>`` and pads with ``<|endoftext|>``, as Qwen2.5-Instruct's does.
    Returns the folder.
    """
    folder = Path(folder)
    tokenizer = build_test_tokenizer()
    model = build_tiny_model(kind, vocab_size=len(tokenizer), seed=seed)
    pad_id, im_end_id = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(IM_END)
    model.config.pad_token_id = pad_id
    model.config.eos_token_id = pad_id
    model.generation_config = GenerationConfig(eos_token_id=[im_end_id, pad_id], pad_token_id=pad_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
