"""Many LoRA adapters on one base model, each batch row with its own (or none).

The base model is loaded once and never merged into. Every linear layer some served adapter
targets is replaced by a `MultiLoRALinear` holding that layer's A, B and scaling of each
adapter (keyed by the adapter's slot). Before a forward the scheduler says which slot each
row uses (`RowAdapters.set`, -1 = base); each layer then computes

    y = W x                                   for every row (one GEMM over the batch)
    y[rows of a] += x[rows of a] A_a^T (scaling_a B_a)^T      for each adapter a in the batch

in fp32 like LoRALinear's unmerged path (the scaling folded into B once at load), applied to
each row's own input whatever else shares the batch; a batch of base rows costs nothing extra. Grouping rows
by adapter keeps the extra work at each adapter's own rank (no padded rank, no gathered
per-row weight copies).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.inject import wrap_layer
from lorakit.quant.linear import is_linear
from lorakit.adapters.lora import LoRALinear, linear_dims
from lorakit.errors import LorakitError


class RowAdapters:
    """Which adapter slot each row of the next forward uses, grouped: [(slot, row index or None = all rows)]."""

    def __init__(self) -> None:
        self.groups: list[tuple[int, torch.Tensor | None]] = []
        self.live: set[int] = set()  # slots installed now (AdapterBank keeps it)
        self._slots: list[int] | None = None  # what `groups` was built for

    def set(self, slots: list[int], device: torch.device | str = "cpu") -> None:
        """Group the rows by slot; a decode step whose batch did not change reuses the last grouping."""
        if slots == self._slots:
            return
        self._slots = list(slots)
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot >= 0:
                by_slot.setdefault(slot, []).append(row)
        if len(by_slot) == 1 and len(next(iter(by_slot.values()))) == len(slots):
            self.groups = [(next(iter(by_slot)), None)]  # one adapter for the whole batch: no indexing
        else:
            self.groups = [(slot, torch.tensor(rows, device=device)) for slot, rows in by_slot.items()]


class MultiLoRALinear(nn.Module):
    """A frozen base linear layer plus the LoRA factors of every served adapter that targets it."""

    def __init__(self, base_layer: nn.Module, rows: RowAdapters) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, _ = linear_dims(base_layer)
        self.rows = rows
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> A (r, in), B * scaling (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, in)
        y = self.base_layer(x)  # (B, T, out), a fresh tensor: updated in place below (inference only)
        for slot, index in self.rows.groups:
            factor = self.factors.get(slot)
            if factor is None:
                continue
            a, b = factor
            xs = x if index is None else x.index_select(0, index)  # (b, T, in)
            delta = F.linear(F.linear(xs.to(a.dtype), a), b).to(y.dtype)  # (b, T, out), fp32 as LoRALinear's
            if index is None:
                y.add_(delta)
            else:
                y.index_add_(0, index, delta)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={sorted(self.factors)}"


def check_servable(name: str, path: Path) -> None:
    """Refuse what MultiLoRALinear cannot compute: DoRA's per-row rescaling by m / ||W + s B A|| is not batched,
    IA3 rescales the base's activations for every row of the batch, a selective fine-tune replaces base weights,
    and a prompt-tuning adapter changes no layer (its virtual tokens would need a per-request embedding path)."""
    from lorakit.adapters.methods import adapter_kind
    from lorakit.adapters.state import read_adapter_config

    kind = adapter_kind(path)
    if kind == "prompt_tuning":
        raise LorakitError(f"adapter {name} ({path}): serve does not take prompt-tuning adapters: the engine batches "
                           "per-layer LoRA updates by slot and has no per-request virtual-token path; use lorakit "
                           "generate / chat --adapter")
    if kind == "ia3":
        raise LorakitError(f"adapter {name} ({path}): serve batches LoRA updates added beside a shared base, and IA3 "
                           "rescales the base layer itself; merge it with lorakit merge and serve the merged model")
    if kind == "selective":
        raise LorakitError(f"adapter {name} ({path}) is a selective fine-tune, which replaces base weights and cannot "
                           "share a base with other adapters; merge it with lorakit merge and serve the merged model")
    if read_adapter_config(path).get("use_dora"):
        raise LorakitError(f"adapter {name} ({path}): serve does not batch DoRA adapters yet; merge it with "
                           "lorakit merge and serve the merged model")


@dataclass
class ServedAdapter:
    """An adapter the server answers as a model of its own."""

    name: str
    path: Path
    slot: int
    template: str
    system_prompt: str | None
    base_model: str | None
    layers: int


class AdapterBank:
    """The served adapters of one base model: add / remove, and which layers each one adapts."""

    def __init__(self, model: nn.Module) -> None:
        if any(isinstance(m, LoRALinear) for m in model.modules()):
            raise LorakitError("the base model already holds LoRA layers; serve a plain base model")
        self.model = model
        self.rows = RowAdapters()
        self.adapters: dict[str, ServedAdapter] = {}
        self._targets = {name for name, m in model.named_modules() if name and is_linear(m)}
        self._next_slot = 0

    def read(self, name: str, path: str | Path) -> tuple[ServedAdapter, list[Any]]:
        """Read and check an adapter's files (safetensors only) without touching the model."""
        from lorakit.adapters.state import read_adapter_config, read_adapter_meta
        from lorakit.export.merge import AdapterRef, adapter_factors

        path = Path(path)
        check_servable(name, path)
        config = read_adapter_config(path)
        meta = read_adapter_meta(path)
        factors = adapter_factors(AdapterRef(path, config=config))
        device = next(self.model.parameters()).device
        moved = []
        for f in factors:
            module = self._layer(f.module)
            if module is None:
                base = config.get("base_model_name_or_path") or "unknown"
                raise LorakitError(f"adapter {name} ({path}) adapts {f.module}, which this base model does not have as "
                                   f"a linear layer; it was trained on base model {base}: serve it on that model")
            in_f, out_f, _ = linear_dims(module)
            if tuple(f.A.shape) != (f.A.shape[0], in_f) or tuple(f.B.shape) != (out_f, f.A.shape[0]):
                raise LorakitError(f"adapter {name} ({path}): {f.module} has lora_A {tuple(f.A.shape)} / lora_B "
                                   f"{tuple(f.B.shape)} but the layer is {in_f} -> {out_f}; the adapter belongs to "
                                   "another base model")
            moved.append(replace(f, A=f.A.to(device), B=f.B.to(device)))
        served = ServedAdapter(name, path, -1, (meta.template if meta else None) or "auto",
                               meta.system_prompt if meta else None, config.get("base_model_name_or_path"), len(moved))
        return served, moved

    def install(self, served: ServedAdapter, factors: list[Any]) -> ServedAdapter:
        """Put a read adapter into the model under a new slot (between forwards: the caller holds the model)."""
        if served.name in self.adapters:
            raise LorakitError(f"an adapter named {served.name} is already served; unload it first or pick another name")
        served.slot = self._next_slot
        self._next_slot += 1
        for f in factors:
            module = self.model.get_submodule(f.module)
            if not isinstance(module, MultiLoRALinear):
                module = MultiLoRALinear(module, self.rows)
                wrap_layer(self.model, f.module, module)
            module.factors[served.slot] = (f.A, f.B * float(f.scaling))  # the scaling folded in once, in fp32
        self.adapters[served.name] = served
        self.rows.live.add(served.slot)
        return served

    def add(self, name: str, path: str | Path) -> ServedAdapter:
        return self.install(*self.read(name, path))

    def remove(self, name: str) -> ServedAdapter:
        served = self.adapters.pop(name, None)
        if served is None:
            raise LorakitError(f"no adapter named {name} is served")
        self.rows.live.discard(served.slot)
        for module in self.model.modules():
            if isinstance(module, MultiLoRALinear):
                module.factors.pop(served.slot, None)
        return served

    def _layer(self, name: str) -> nn.Module | None:
        if name not in self._targets:
            return None
        module = self.model.get_submodule(name)
        return module.base_layer if isinstance(module, MultiLoRALinear) else module
