"""Resolve and load base models: builtin alias, local directory, .gguf file, hub id."""

from lorakit.models.info import ModelInfo, describe_model
from lorakit.models.load import LoadedModel, cache_root, load_model, load_tokenizer, resolve_dtype
from lorakit.models.resolve import BUILTINS, ModelSource, resolve_model

__all__ = [
    "BUILTINS",
    "LoadedModel",
    "ModelInfo",
    "ModelSource",
    "cache_root",
    "describe_model",
    "load_model",
    "load_tokenizer",
    "resolve_dtype",
    "resolve_model",
]
