"""Apply the `adapter:` config section to a loaded model."""

from __future__ import annotations

from typing import Any

from torch import nn

from lorakit.adapters.inject import inject_ia3, inject_lora
from lorakit.adapters.prompt_tuning import inject_prompt_tuning
from lorakit.adapters.selective import prepare_selective
from lorakit.config import AdapterConfig


def prepare_model(model: nn.Module, cfg: AdapterConfig, tokenizer: Any = None) -> list[str]:
    """Make the parameters named by `cfg` trainable; return the adapted module paths.

    lora / qlora: wrap the targets in LoRALinear and freeze everything else.
    dora: the same with DoRA's magnitude (on a quantized base too: QDoRA).
    ia3: wrap the targets in IA3Linear (PEFT's per-architecture layers for all-linear).
    selective: the parameters adapter.trainable matches train (their names are returned); nothing is wrapped.
    full: every parameter trains (for comparison with LoRA); nothing is wrapped.
    prompt_tuning: the input embedding gains num_virtual_tokens trained rows (TEXT init from
    prompt_tuning_init_text needs `tokenizer`); everything else is frozen, no module is adapted.
    """
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return []
    if cfg.method == "prompt_tuning":
        inject_prompt_tuning(model, cfg.num_virtual_tokens, cfg.prompt_tuning_init_text, tokenizer)
        return []
    if cfg.method == "ia3":
        return inject_ia3(model, cfg.target_modules, cfg.feedforward_modules)
    if cfg.method == "selective":
        return prepare_selective(model, cfg.trainable)
    return inject_lora(
        model,
        cfg.target_modules,
        r=cfg.r,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        init=cfg.init,
        use_dora=cfg.method == "dora",
    )
