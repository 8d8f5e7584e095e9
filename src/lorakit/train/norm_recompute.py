"""train.recompute_norms: backward recomputes a norm's output from the input the norm keeps anyway.

Every decoder layer has two norms, and each norm's output is the input of the projections after it
(q, k, v; gate and up): those keep it for their weight gradients (LoRA's A, the fused MLP), one copy
of `hidden` values per token and norm, while the norm itself keeps its own input (the residual
stream) and its statistics. On SmolLM2 at 4 x 512 tokens in fp32 that is 270 MiB of the 1657 MiB
autograd keeps (bench/train_memory.py). The output is a few elementwise ops away from the input
that is kept anyway, so this keeps a recipe instead: `torch.autograd.graph.saved_tensors_hooks`
sees every tensor saved for backward during the forward, and one that is exactly a norm's output
(or the compute-dtype copy lora._CastCache made of it) is replaced by (norm, its input); backward
runs the norm again under the forward's autocast state, once per output however many consumers
read it. The same ops on the same input on the same device give the same bits, so the gradients
are unchanged (tests/train/test_norm_recompute.py); the cost is two norms per layer in backward.

Why hooks and not torch.utils.checkpoint around each norm: checkpoint re-runs a region's forward
for the tensors saved *inside* the region, while here the tensor to drop is saved by the
consumers after it; and why not fusing each norm into its consumers: that would mean a custom
q/k/v and MLP Function per norm kind (RMSNorm, Gemma's 1 + w, LayerNorm with bias), where the
hook works with any norm module.

Forward-time bookkeeping: a norm output is known by its storage address and geometry while it is
alive (a weak reference whose callback forgets it), so a later tensor at a reused address is never
taken for it; nothing keeps the output alive, so it is freed as soon as the layer's forward is done
with it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

_active: _Registry | None = None  # the registry of the forward in progress


def is_norm(module: nn.Module) -> bool:
    """RMSNorm of any HF architecture (LlamaRMSNorm, Qwen2RMSNorm, ...) or nn.LayerNorm."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


class _Recipe:
    """A norm's output as (module, input, autocast state, optional cast dtype); the value once recomputed."""

    __slots__ = ("module", "x", "autocast", "dtype", "parent", "value")

    def __init__(self, module, x, autocast, dtype=None, parent=None) -> None:
        self.module, self.x, self.autocast, self.dtype, self.parent = module, x, autocast, dtype, parent
        self.value: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.value is None:
            if self.parent is not None:  # the compute-dtype copy of a norm output
                self.value = self.parent.get().to(self.dtype)
            else:
                enabled, dtype = self.autocast
                with torch.no_grad(), torch.autocast(self.x.device.type, dtype=dtype, enabled=enabled):
                    self.value = self.module.forward(self.x)
        return self.value


def _signature(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype


class _Registry:
    def __init__(self) -> None:
        self.outputs: dict[tuple, tuple[weakref.ref, _Recipe]] = {}  # signature -> (the live output, recipe)

    def add(self, out: torch.Tensor, recipe: _Recipe) -> None:
        key = _signature(out)
        # the entry leaves with the tensor: its storage address may then be reused by another tensor
        self.outputs[key] = (weakref.ref(out, lambda _, key=key: self.outputs.pop(key, None)), recipe)

    def find(self, t: torch.Tensor) -> _Recipe | None:
        try:
            hit = self.outputs.get(_signature(t))
        except (RuntimeError, NotImplementedError):  # a tensor without a plain storage (DTensor, meta, ...)
            return None
        return hit[1] if hit is not None and hit[0]() is not None else None

    def pack(self, t: torch.Tensor):
        recipe = self.find(t)
        return t if recipe is None else recipe

    @staticmethod
    def unpack(saved):
        return saved.get() if isinstance(saved, _Recipe) else saved


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    kind = device.type
    return torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


def _norm_hook(module: nn.Module, args: tuple, out) -> None:
    registry = _active
    if registry is None or not torch.is_grad_enabled() or not isinstance(out, torch.Tensor) or not args:
        return
    x = args[0]
    # out.requires_grad: the norm is in the graph, so its backward keeps x anyway. Not so for the first
    # layer's norm over a frozen embedding: there a recipe would keep x (fp32) instead of out (or its bf16 copy).
    if isinstance(x, torch.Tensor) and out.requires_grad:
        registry.add(out, _Recipe(module, x, _autocast_state(x.device)))


def note_cast(x: torch.Tensor, copy: torch.Tensor) -> None:
    """lora._CastCache made `copy` = x.to(dtype): if x is a norm output, the copy is recomputable too."""
    registry = _active
    if registry is None:
        return
    parent = registry.find(x)
    if parent is not None and copy is not x:
        registry.add(copy, _Recipe(None, None, None, copy.dtype, parent))


def install(model: nn.Module) -> list:
    """Forward hooks on every norm module; returns their handles (remove() to undo)."""
    return [m.register_forward_hook(_norm_hook) for m in model.modules() if is_norm(m)]


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Within: tensors saved for backward that are norm outputs become recipes (see the module docstring)."""
    global _active
    registry, previous = _Registry(), _active
    _active = registry
    try:
        with torch.autograd.graph.saved_tensors_hooks(registry.pack, registry.unpack):
            yield
    finally:
        _active = previous
        registry.outputs.clear()


def wrap(loss_fn: Callable) -> Callable:
    """loss_fn(model, batch) run under `recomputing()`; backward happens after, outside it."""

    def run(model, batch):
        with recomputing():
            return loss_fn(model, batch)

    run.__wrapped__ = loss_fn  # type: ignore[attr-defined]  # bench/train_memory.py accounts around it
    return run


def pack_active(t: torch.Tensor):
    """What the forward in progress would save for `t` (itself, or a recipe): for accounting hooks nested inside."""
    return _active.pack(t) if _active is not None else t


unpack = _Registry.unpack
