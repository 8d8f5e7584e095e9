"""What a model is, without loading its weights: built on the meta device from its config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.adapters.inject import describe_linear_names, linear_layer_names, output_head_names
from lorakit.models.load import load_config


@dataclass
class ModelInfo:
    name: str
    source: str
    architecture: str
    model_type: str
    num_params: int
    num_layers: int | None
    hidden_size: int | None
    vocab_size: int | None
    tied_embeddings: bool
    linear_names: list[str]
    head_names: list[str]
    linear_params: int  # in the layers quantization replaces (all linears but the head)
    weight_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def target_summary(self) -> str:
        return describe_linear_names([n for n in self.linear_names if n not in self.head_names])


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of an NF4 tensor: packed codes + absmax (8-bit + per-256 scales when double-quantized)."""
    blocks = math.ceil(numel / blocksize)
    codes = math.ceil(numel / 2)
    if double_quant:
        return codes + blocks + 4 * math.ceil(blocks / 256) + 4
    return codes + 4 * blocks


def weight_bytes_by_format(model: nn.Module, quantizable: list[str]) -> dict[str, int]:
    """Weight memory at each storage format, from shapes (no weights needed).

    int8 / nf4 quantize the linear layers LoRA can target (not the head, not embeddings);
    everything else stays bf16, as lorakit's quantized loading does.
    """
    total = sum(p.numel() for p in model.parameters())
    linear = [model.get_submodule(n).weight for n in quantizable]
    q_numel = sum(w.numel() for w in linear)
    rest_bf16 = 2 * (total - q_numel)
    return {
        "fp32": 4 * total,
        "bf16": 2 * total,
        "int8": rest_bf16 + sum(w.numel() + 4 * w.shape[0] for w in linear),
        "nf4": rest_bf16 + sum(nf4_bytes(w.numel()) for w in linear),
    }


def describe_model(name: str, trust_remote_code: bool = False) -> ModelInfo:
    from transformers import AutoModelForCausalLM

    config, source = load_config(name, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    linear = linear_layer_names(model)
    heads = sorted(output_head_names(model))
    quantizable = [n for n in linear if n not in heads]
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return ModelInfo(
        name=name,
        source=f"{source.kind}: {source.path}",
        architecture=archs[0],
        model_type=getattr(config, "model_type", "?"),
        num_params=sum(p.numel() for p in model.parameters()),
        num_layers=getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None),
        hidden_size=getattr(config, "hidden_size", None) or getattr(config, "n_embd", None),
        vocab_size=getattr(config, "vocab_size", None),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        linear_names=linear,
        head_names=heads,
        linear_params=sum(model.get_submodule(n).weight.numel() for n in quantizable),
        weight_bytes=weight_bytes_by_format(model, quantizable),
    )
