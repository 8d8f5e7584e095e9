"""LoRA adapters: the layer, injection into a model, and PEFT-format files."""

from lorakit.adapters.inject import (
    count_parameters,
    find_targets,
    freeze_base,
    inject_lora,
    linear_layer_names,
    lora_layers,
    lora_parameters,
    merge_lora,
    parameter_summary,
    scale_lora,
    unmerge_lora,
    unwrap_lora,
)
from lorakit.adapters.lora import LoRALinear
from lorakit.adapters.state import AdapterInfo, adapter_info, load_adapter, save_adapter

__all__ = [
    "AdapterInfo",
    "LoRALinear",
    "adapter_info",
    "count_parameters",
    "find_targets",
    "freeze_base",
    "inject_lora",
    "linear_layer_names",
    "load_adapter",
    "lora_layers",
    "lora_parameters",
    "merge_lora",
    "parameter_summary",
    "save_adapter",
    "scale_lora",
    "unmerge_lora",
    "unwrap_lora",
]
