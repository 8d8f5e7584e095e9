"""Find target layers, wrap them in LoRALinear, freeze everything else.

Target syntax (one list, entries may be mixed):
- "all-linear": every linear layer except the output head;
- a plain name: the exact module path ("model.layers.0.mlp.up_proj") or a suffix of it on
  a dot boundary ("up_proj", "mlp.up_proj");
- a regex (any entry with regex metacharacters): `re.fullmatch` against the full path.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lorakit.adapters.ia3 import IA3Linear, ia3_defaults, ia3_layers, ia3_merged
from lorakit.adapters.lora import Init, LoRALinear, merged_weight
from lorakit.errors import LorakitError
from lorakit.models import layers
from lorakit.models.layers import describe_linear_names, output_head_names
from lorakit.quant.linear import QuantizedLinear

ALL_LINEAR = "all-linear"
_REGEX_CHARS = set("*+?[](){}|^$\\")


def linear_layer_names(model: nn.Module) -> list[str]:
    """Paths of the layers LoRA or IA3 can target (already-wrapped layers by their wrapper's path)."""
    return layers.linear_layer_names(model, wrapper=(LoRALinear, IA3Linear))


def is_regex(target: str) -> bool:
    return any(c in _REGEX_CHARS for c in target)


def matches(name: str, target: str) -> bool:
    if is_regex(target):
        return re.fullmatch(target, name) is not None
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Module paths selected by `targets`, in model order. Raises with the names available."""
    targets = list(targets)
    for t in targets:
        if is_regex(t):
            try:
                re.compile(t)
            except re.error as err:
                raise LorakitError(f"target_modules entry {t!r} is not a valid regex ({err})") from None
    heads = output_head_names(model)
    candidates = linear_layer_names(model)
    chosen = []
    for name in candidates:
        if ALL_LINEAR in targets and name not in heads:
            chosen.append(name)
        elif any(matches(name, t) for t in targets if t != ALL_LINEAR):
            chosen.append(name)
    if not chosen:
        raise LorakitError(
            f"target_modules {targets} matched no linear layer; this model has: "
            f"{describe_linear_names(candidates)} (or use all-linear)"
        )
    return chosen


def inject_lora(
    model: nn.Module,
    targets: Iterable[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: Init = "kaiming",
    freeze: bool = True,
    use_dora: bool = False,
) -> list[str]:
    """Wrap every target layer in a LoRALinear (with DoRA's magnitude when `use_dora`); freeze the rest.
    Returns the wrapped paths."""
    names = find_targets(model, targets)
    if freeze:
        freeze_base(model)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise LorakitError(f"{name} already has a LoRA adapter; load or inject adapters only once")
        wrap_layer(model, name, LoRALinear(module, r, alpha, dropout, use_rslora, init, use_dora))
    return names


def wrap_layer(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_base(model: nn.Module) -> None:
    """Everything but adapter parameters (LoRA's A, B and DoRA's magnitude; IA3's vectors) stops requiring gradients."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model) + [layer.ia3_l for _, layer in ia3_layers(model)]:
        p.requires_grad_(True)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """The explicit interface to a model's adapters: (module path, layer) pairs."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter parameter: each layer's A and B, and its magnitude when it is a DoRA layer."""
    return [p for _, layer in lora_layers(model) for p in layer.adapter_parameters()]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block every LoRA and IA3 layer computes its base layer alone: the base model, without a second copy."""
    layers: list[LoRALinear | IA3Linear] = [layer for _, layer in lora_layers(model)]
    layers += [layer for _, layer in ia3_layers(model)]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def merge_lora(model: nn.Module) -> None:
    for name, layer in lora_layers(model):
        layer.merge(name)


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def scale_lora(model: nn.Module, scale: float) -> None:
    """Every adapter's update times `scale` (1 = as trained); merged layers are re-merged."""
    for _, layer in lora_layers(model):
        layer.set_scale(scale)


def unwrap_lora(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Merge every adapter and put plain layers back (a normal HF model again).

    A quantized base (QLoRA) is dequantized and merged in fp32 into a new nn.Linear in
    `dtype` (default fp32): re-quantizing the merged weight to 4 bits would round most of
    the adapter's update away, so that never happens silently. Full-precision bases are
    merged in place, in their own dtype.
    """
    for name, layer in list(lora_layers(model)):
        base = layer.base_layer
        if isinstance(base, QuantizedLinear):  # never merged in place (LoRALinear.merge refuses)
            weight = merged_weight(base.dequantized_weight(torch.float32), [layer.factor()], name)  # (out, in)
            wrap_layer(model, name, base.to_linear(dtype or torch.float32, weight))
        else:
            layer.merge(name)
            wrap_layer(model, name, base)


def inject_ia3(model: nn.Module, targets: Iterable[str], feedforward: Iterable[str] | None = None) -> list[str]:
    """Wrap every target layer in an IA3Linear, freeze the rest; returns the wrapped paths.

    `targets` ["all-linear"] (the config's default) and `feedforward` None take PEFT's defaults for the
    architecture (ia3.IA3_DEFAULTS); a layer scales its input when a `feedforward` entry matches it.
    """
    targets = list(targets)
    if targets == [ALL_LINEAR]:
        targets, default_ff = ia3_defaults(model)
    else:
        try:
            default_ff = ia3_defaults(model)[1]
        except LorakitError:  # an architecture PEFT has no table for: no layer scales its input unless named
            default_ff = []
    names = find_targets(model, targets)
    if feedforward is None:  # PEFT's feedforward layers among the chosen targets
        ff_names = {n for n in names if any(matches(n, t) for t in default_ff)}
    else:
        ff_names = set(find_targets(model, feedforward)) if list(feedforward) else set()
        stray = sorted(ff_names - set(names))
        if stray:
            raise LorakitError(f"adapter.feedforward_modules select {stray[0]}, which adapter.target_modules do not; "
                               "every feedforward module must be a target too")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, (LoRALinear, IA3Linear)):
            raise LorakitError(f"{name} already has an adapter; load or inject adapters only once")
        wrap_layer(model, name, IA3Linear(module, name in ff_names))
    freeze_base(model)
    return names


def unwrap_ia3(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Merge every IA3 vector and put plain layers back; a quantized base is dequantized into a new
    nn.Linear in `dtype` (default fp32), never re-quantized (as unwrap_lora)."""
    for name, layer in list(ia3_layers(model)):
        base = layer.base_layer
        if isinstance(base, QuantizedLinear):
            weight, bias = ia3_merged(base.dequantized_weight(torch.float32), base.bias, layer.ia3_l.detach(),
                                      layer.feedforward, name)
            new = base.to_linear(dtype or torch.float32, weight)
            if bias is not None:
                with torch.no_grad():
                    new.bias.copy_(bias.to(new.bias.dtype))
            wrap_layer(model, name, new)
        else:
            layer.merge(name)
            wrap_layer(model, name, base)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total). Quantized weights (buffers) count by their logical size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.in_features * module.out_features
    return trainable, total


def parameter_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"
