"""What a model is, without loading its weights: built on the meta device from its config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.models.layers import describe_linear_names, linear_layer_names, output_head_names
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


@dataclass
class QuantizedSize:
    """Measured weight memory of a model loaded with its linear layers quantized."""

    method: str
    blocksize: int
    double_quant: bool
    quantized_layers: int
    quantized_params: int
    quantized_bytes: int  # the quantized layers' weight buffers: codes + scales
    other_params: int  # embeddings, norms, biases, the output head (kept in bf16)
    other_bytes: int
    streamed: bool

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.quantized_bytes / self.quantized_params

    def before(self, bytes_per_param: int = 2) -> int:
        """The same linear weights in full precision (bf16 = 2 bytes per parameter)."""
        return self.quantized_params * bytes_per_param


def measure_quantized(
    name: str, method: str = "nf4", blocksize: int = 64, double_quant: bool = True, trust_remote_code: bool = False
) -> QuantizedSize:
    """Load `name` quantized (layer by layer) and count the bytes its tensors really take."""
    from lorakit.models.load import load_model
    from lorakit.models.quantized import QuantSpec
    from lorakit.quant.linear import QuantizedLinear

    spec = QuantSpec(method, blocksize, double_quant, torch.bfloat16)
    loaded = load_model(name, "bf16", trust_remote_code=trust_remote_code, with_tokenizer=False, quantization=spec)
    model = loaded.model
    q_params = q_bytes = layers = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            layers += 1
            q_params += module.in_features * module.out_features
            for buf_name, buf in module.named_buffers(recurse=False):
                if buf is not None and buf_name.startswith("weight_"):  # not the shared decode tables
                    q_bytes += buf.numel() * buf.element_size()
                    seen.add(id(buf))
    other = [p for p in model.parameters()] + [b for n, b in model.named_buffers() if id(b) not in seen
                                                and not n.endswith(("nf4_table", "dq_map", "inv_freq"))]
    unique = {id(t): t for t in other}.values()  # tied embeddings count once
    return QuantizedSize(
        method=method, blocksize=blocksize, double_quant=double_quant, quantized_layers=layers,
        quantized_params=q_params, quantized_bytes=q_bytes,
        other_params=sum(t.numel() for t in unique), other_bytes=sum(t.numel() * t.element_size() for t in unique),
        streamed=bool(loaded.quantization and loaded.quantization["streamed"]),
    )
