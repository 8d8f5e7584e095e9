"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", arXiv:2205.05638): learned vectors that rescale activations.

    attention keys / values:   y = (W x + b) * l          l (out,), one scale per output
    the MLP's down projection: y = W (x * l) + b          l (in,), one scale per input ("feedforward")

l starts at ones, so a fresh layer equals its base. Which layers, and which of them scale their
input, follow PEFT's table per architecture (TRANSFORMERS_MODELS_TO_IA3_*_MAPPING, peft 0.21.2);
the vectors are stored as PEFT stores them, (out, 1) or (1, in) in fp32, under the key
`<layer>.ia3_l`, so PEFT reads what lorakit writes and back. The base weight is never touched in
training: on a quantized base (NF4) the layer's own forward runs and only its input or output
is scaled. Merging multiplies the weight's rows (and the bias) or columns by l, in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lorakit.adapters.lora import linear_dims
from lorakit.errors import LorakitError
from lorakit.quant.linear import QuantizedLinear

# PEFT's defaults (peft.utils.constants, 0.21.2): model_type -> (target modules, feedforward modules)
IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
}
IA3_KEY = "ia3_l"  # PEFT's parameter name: base_model.model.<layer>.ia3_l


def ia3_defaults(model: nn.Module) -> tuple[list[str], list[str]]:
    """(targets, feedforward) for `model`'s architecture, from PEFT's table; an error naming the fix otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in IA3_DEFAULTS:
        raise LorakitError(f"IA3 has no default targets for model type {model_type!r}; set adapter.target_modules "
                           "and adapter.feedforward_modules (e.g. [k_proj, v_proj, down_proj] and [down_proj])")
    targets, feedforward = IA3_DEFAULTS[model_type]
    return list(targets), list(feedforward)


@torch.no_grad()
def ia3_merged(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, feedforward: bool,
               name: str, fan_in_fan_out: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) with the IA3 vector folded in, in fp32: the one IA3 merge.

    `weight` is (out, in), or (in, out) for GPT-2's Conv1D (fan_in_fan_out); `scale` is PEFT's
    (out, 1) or (1, in). An output scale multiplies the weight's output rows and the bias; an input
    scale the weight's input columns only. NaN/inf in the result is refused, naming the layer.
    """
    l = scale.float().flatten().to(weight.device)  # (out,) or (in,)
    w = weight.float()
    scales_rows = not feedforward  # the output dimension
    dim = (0 if scales_rows else 1) if not fan_in_fan_out else (1 if scales_rows else 0)
    if w.shape[dim] != l.numel():
        raise LorakitError(f"{name}: the IA3 vector has {l.numel()} entries but the layer has {w.shape[dim]} "
                           f"{'outputs' if scales_rows else 'inputs'}; the adapter belongs to another model")
    merged = w * (l[:, None] if dim == 0 else l[None, :])
    new_bias = bias.float() * l if bias is not None and scales_rows else (bias.float() if bias is not None else None)
    if not torch.isfinite(merged).all() or (new_bias is not None and not torch.isfinite(new_bias).all()):
        raise LorakitError(f"merging IA3 into {name} gives NaN/inf; the adapter is broken "
                           "(check its training run for a diverged loss)")
    return merged, new_bias


class IA3Linear(nn.Module):
    """A frozen linear layer (nn.Linear, GPT-2 Conv1D or quantized) whose output or input is scaled by a learned vector."""

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__()
        in_f, out_f, fan_in_fan_out = linear_dims(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = in_f, out_f, fan_in_fan_out
        self.feedforward = feedforward
        shape = (1, in_f) if feedforward else (out_f, 1)  # PEFT's shapes
        device = next((t.device for t in list(base_layer.parameters()) + list(base_layer.buffers())), None)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device))
        self.merged = False
        self.disabled = False  # True: the base alone (the KL anchor's reference pass)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.ia3_l]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            if self.merged and self.disabled:
                raise LorakitError("cannot switch off a merged IA3 layer; unmerge it first")
            return self.base_layer(x)
        l = self.ia3_l.flatten()  # (in,) or (out,), fp32
        if self.feedforward:  # as PEFT: scale in fp32, back to the input's dtype for the base matmul
            return self.base_layer((x.to(l.dtype) * l).to(x.dtype))
        y = self.base_layer(x)  # (..., out)
        return (y * l).to(y.dtype)

    def merge(self, name: str = "this IA3 layer") -> None:
        """Fold l into the base weight (and bias). Safe to call twice; a quantized base is refused."""
        if self.merged:
            return
        base = self._plain_base("merge")
        weight, bias = ia3_merged(base.weight.data, getattr(base, "bias", None), self.ia3_l.detach(), self.feedforward,
                                  name, self.fan_in_fan_out)
        self._write(base, weight, bias)
        self.merged = True

    def unmerge(self) -> None:
        """Divide l back out (exact up to fp32 rounding while no entry of l is 0). Safe to call twice."""
        if not self.merged:
            return
        base = self._plain_base("unmerge")
        inverse = 1.0 / self.ia3_l.detach().float()
        weight, bias = ia3_merged(base.weight.data, getattr(base, "bias", None), inverse, self.feedforward,
                                  "this IA3 layer", self.fan_in_fan_out)
        self._write(base, weight, bias)
        self.merged = False

    @staticmethod
    def _write(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        base.weight.data.copy_(weight.to(base.weight.dtype))
        if bias is not None:
            base.bias.data.copy_(bias.to(base.bias.dtype))

    def _plain_base(self, what: str) -> nn.Module:
        if isinstance(self.base_layer, QuantizedLinear):
            raise LorakitError(f"cannot {what} IA3 into a quantized base layer in place; "
                               "use `lorakit merge`, which dequantizes and writes full precision")
        return self.base_layer

    def extra_repr(self) -> str:
        side = f"input ({self.in_features})" if self.feedforward else f"output ({self.out_features})"
        return f"scales {side}, merged={self.merged}"


def ia3_layers(model: nn.Module) -> Iterator[tuple[str, IA3Linear]]:
    """The explicit interface to a model's IA3 layers: (module path, layer) pairs."""
    for name, module in model.named_modules():
        if isinstance(module, IA3Linear):
            yield name, module
