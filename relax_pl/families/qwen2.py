"""Qwen2 and Qwen2.5 text models (Instruct, Math): transformers' decoder conventions hold (``model.norm``,
``Qwen2DecoderLayer`` blocks), so nothing is overridden."""

from __future__ import annotations

from relax_pl.families.base import ModelFamily


class Qwen2(ModelFamily):
    model_types = ("qwen2",)
