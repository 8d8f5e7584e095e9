"""Which modules of a model are its linear layers and which is its output head (from the module tree alone).

Below adapters on purpose: `lorakit info` describes a model's LoRA targets without importing them.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from lorakit.quant.linear import is_linear


def output_head_names(model: nn.Module) -> set[str]:
    """Module paths of the output head (lm_head), which "all-linear" leaves alone."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def linear_layer_names(model: nn.Module,
                       wrapper: type[nn.Module] | tuple[type[nn.Module], ...] | None = None) -> list[str]:
    """Paths of the linear layers (nn.Linear, GPT-2 Conv1D, lorakit quantized), in model order.

    A `wrapper` instance (adapters pass LoRALinear and IA3Linear) stands for the layer it wraps: it is listed at
    its own path, and nothing inside it is.
    """
    names: list[str] = []
    inside = None  # the path prefix of the wrapper being walked through
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if wrapper is not None and isinstance(module, wrapper):
            names.append(name)
            inside = name + "."
        elif is_linear(module):
            names.append(name)
    return names


def describe_linear_names(names: list[str]) -> str:
    """Compact list of leaf names with counts, e.g. 'q_proj (30), lm_head (1)'."""
    counts = Counter(n.rsplit(".", 1)[-1] for n in names)
    return ", ".join(f"{leaf} ({n})" for leaf, n in counts.items())
