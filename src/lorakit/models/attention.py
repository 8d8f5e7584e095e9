"""Training attention for transformers' SDPA models: grouped K/V heads kept grouped, one mask for all layers.

transformers' `sdpa` path, given a 4D mask (lorakit's shared-prefix packing passes one; plain
packing and padded batches get one built from position_ids or the 2D mask), expands the K/V
heads of grouped-query attention to the query heads with `repeat_kv` and hands SDPA a boolean
mask. Both cost memory that backward keeps: SDPA saves its K and V inputs (on SmolLM2-135M,
3 K/V heads copied to 9: 2 x 4.7 MB per layer for a 4 x 512 batch in fp32 instead of
2 x 1.6 MB) and, on CPU, converts the boolean mask to a float one of its own in every layer
(4 MB per layer at 4 x 512 x 512 in fp32) and saves that.

`gqa_sdpa_attention` calls SDPA with `enable_gqa=True` (the CPU flash kernel and the CUDA ones
index the shared K/V head themselves) and turns a boolean mask into the additive form once per
forward: every layer gets, and saves, the same tensor. The arithmetic is SDPA's own on the same
inputs (an additive 0 / -inf mask is what SDPA makes of a boolean one), so losses do not change
(tests/models/test_attention.py). Cases it does not cover (a KV cache offset, position biases,
soft-capping, no mask) go to transformers' own function.

`gqa_attention(model)` switches an SDPA model to it for training; the returned callable switches
it back.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NAME = "lorakit_gqa_sdpa"


class _MaskCache:
    """The additive form of the last boolean mask seen, while both tensors are alive (weak references only)."""

    def __init__(self) -> None:
        self._key: tuple[weakref.ref, torch.dtype, int] | None = None
        self._value: weakref.ref | None = None

    def additive(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """mask (B, 1, T, S) bool, True = attend -> 0 where True, -inf elsewhere, in `dtype`."""
        key = self._key
        if key is not None and key[0]() is mask and key[1] == dtype and key[2] == mask._version:
            cached = self._value() if self._value is not None else None
            if cached is not None:
                return cached
        out = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        self._key, self._value = (weakref.ref(mask), dtype, mask._version), weakref.ref(out)
        return out


_MASKS = _MaskCache()


def gqa_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns ((B, T, H, D), None)."""
    # query (B, H, T, D); key, value (B, Hkv, S, D); attention_mask (B, 1, T, S) or None
    ours = (attention_mask is not None and attention_mask.dim() == 4 and query.shape[2] == key.shape[2]
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None and kwargs.get("cache") is None)
    if not ours:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    device = query.device.type  # under autocast SDPA runs in autocast's dtype (rotary may hand it fp32 q and k)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    if attention_mask.dtype == torch.bool:
        attention_mask = _MASKS.additive(attention_mask, dtype)
    elif attention_mask.dtype != dtype:
        attention_mask = attention_mask.to(dtype)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, gqa_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # masks built exactly as for "sdpa"


def gqa_attention(model: nn.Module) -> Callable[[], None] | None:
    """Run `model`'s attention through `gqa_sdpa_attention` when it uses transformers' sdpa; returns the undo, or None."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    _register()
    config._attn_implementation = NAME

    def undo() -> None:
        config._attn_implementation = "sdpa"

    return undo
