"""Llama and the checkpoints built on it (SmolLM2, the embedded quickstart model; Llama 2 and 3): transformers'
decoder conventions hold (``model.norm``, ``LlamaDecoderLayer`` blocks), so nothing is overridden."""

from __future__ import annotations

from relax_pl.families.base import ModelFamily


class Llama(ModelFamily):
    model_types = ("llama",)
