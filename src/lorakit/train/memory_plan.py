"""train.memory_budget_gb: how many fused MLPs redo their gate and up matmuls in backward to stay under a budget.

Selective activation checkpointing, chosen before the first step from an estimate rather than by
trial: per decoder layer and token, backward keeps (bench/train_memory.py measures it; SmolLM2-135M,
fp32, 4 x 512 tokens: 68 MB per layer before issue 23's changes)

- the residual stream twice (the two norms' inputs), fp32 under autocast too;
- the attention's LoRA input, q, the output (query heads) and k, v (K/V heads), in the compute dtype;
- the MLP's input and its gate and up outputs g and u (2 x intermediate_size), in the compute dtype;
- not the attention's and the MLP's inputs when train.recompute_norms (the default) recomputes them
  from the residual the norms keep (norm_recompute.py).

g and u are the largest part and the cheapest to get back: two of the MLP's three base matmuls,
about a quarter of a layer's backward work. So a budget turns `recompute_mlps` on for as many
layers as it takes, from the first, and no more: every layer recomputed costs time. Rotary and the
activation function keep nothing large already (the fused MLP recomputes silu; SDPA keeps the
rotated q and k it needs anyway).

The estimate: the process's RSS now (model, optimizer state, data) plus the kept activations of a
full batch of max_length rows times TRANSIENT (what backward allocates on top: the gradients in
flight; the loss's logits come in chunks of about 32 MiB, train/loss.py). Measured on SmolLM2 at
4 x 512, fp32: 2474 MB peak, 1032 MB before the step, 1392 MiB kept (norms recomputed): 0.99;
with every MLP recomputed 1765 / 1060 / 672 MiB: 1.00.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

TRANSIENT = 1.05


@dataclass
class MemoryPlan:
    recompute_layers: int  # fused MLPs that redo gate and up in backward
    estimate_mb: float  # the estimated peak RSS with that many
    keep_all_mb: float  # ... and with none


def kept_bytes_per_token(config, compute_bytes: int, norms_recomputed: bool = True) -> tuple[float, float]:
    """(bytes a decoder layer keeps per token, of which the MLP's g and u) for a Llama-style config."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    residual = 2 * hidden * 4
    inputs = 0 if norms_recomputed else 2 * hidden * compute_bytes  # the attention's and the MLP's
    attention = 2 * heads * head_dim * compute_bytes + 2 * kv_heads * head_dim * compute_bytes
    gate_up = 2 * inter * compute_bytes
    return residual + inputs + attention + gate_up, gate_up


def plan(model: nn.Module, fused: int, tokens: int, compute_bytes: int, rss_mb: float, budget_gb: float,
         norms_recomputed: bool = True) -> MemoryPlan:
    """The fewest recomputed MLPs (of the `fused` ones) whose estimate fits `budget_gb`; all of them if none does."""
    per_layer, gate_up = kept_bytes_per_token(model.config, compute_bytes, norms_recomputed)
    layers = model.config.num_hidden_layers
    keep_all = rss_mb + TRANSIENT * layers * per_layer * tokens / 2**20
    saving = TRANSIENT * gate_up * tokens / 2**20  # per recomputed layer
    over = keep_all - budget_gb * 1024
    count = 0 if over <= 0 else min(fused, math.ceil(over / saving))
    return MemoryPlan(count, keep_all - count * saving, keep_all)
