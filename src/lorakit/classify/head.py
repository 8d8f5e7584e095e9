"""classification.method head: transformers' AutoModelForSequenceClassification with LoRA on the body.

The head (`score` on decoder models, which classify from the last non-pad token; `classifier` on
BERT-like encoders) is trained in full and saved the way PEFT saves a SEQ_CLS adapter: task_type
SEQ_CLS, `modules_to_save: [<head>]`, the head's tensors under `base_model.model.<head>.weight`
(and `.bias`) next to the LoRA A/B matrices, so `PeftModel.from_pretrained` loads it and lorakit
loads what PEFT saved. Full fine-tuning saves the whole model with save_pretrained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.adapters.inject import find_targets, inject_lora
from lorakit.adapters.state import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, apply_adapter_weights,
                                    read_adapter_config, read_adapter_weights, require_finite, save_adapter)
from lorakit.config import AdapterConfig
from lorakit.errors import LorakitError
from lorakit.io import atomic_dir, atomic_write_text

HEAD_NAMES = ("score", "classifier")
"""The head's attribute on transformers' *ForSequenceClassification models: decoders, encoders."""


def head_name(model: nn.Module) -> str:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise LorakitError(f"{type(model).__name__} has no {' or '.join(HEAD_NAMES)} module; classification.method head "
                       "needs a transformers *ForSequenceClassification model")


def load_sequence_classifier(where: str, labels: list[str], dtype: torch.dtype, pad_token_id: int | None,
                             trust_remote_code: bool = False) -> nn.Module:
    """The model in directory `where` with a fresh len(labels)-way head (seeded by the caller), in eval mode."""
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                              "label2id": {label: i for i, label in enumerate(labels)}}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            where, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise LorakitError(f"cannot load {where} as a sequence classifier: {str(err).splitlines()[0]}") from None
    if pad_token_id is not None:  # decoders find each row's last token by the pad id: the one the tokenizer pads with
        model.config.pad_token_id = pad_token_id
    return model.eval()


def add_lora(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """LoRA on the body's linear layers (cfg.target_modules, never the head); the head trains in full."""
    head = head_name(model)
    names = [n for n in find_targets(model, cfg.target_modules) if n != head and not n.startswith(head + ".")]
    wrapped = inject_lora(model, names, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                          init=cfg.init)
    for p in getattr(model, head).parameters():
        p.requires_grad_(True)
    return wrapped


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's tensors under PEFT's saved names: base_model.model.<head>.<param>."""
    head = head_name(model)
    return {f"{PEFT_PREFIX}{head}.{k}": v.detach().cpu().float().contiguous()
            for k, v in getattr(model, head).state_dict().items()}


def save_head_adapter(model: nn.Module, directory: Path, base_model: str | None, meta: dict[str, Any] | None = None,
                      overwrite: bool = True) -> Path:
    """LoRA + the head in PEFT's SEQ_CLS layout, atomically."""
    head = head_name(model)
    with atomic_dir(Path(directory), overwrite=overwrite) as tmp:
        lora_dir = save_adapter(model, tmp / "lora", base_model, meta)
        config = json.loads((lora_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        config.update(task_type="SEQ_CLS", modules_to_save=[head])
        weights = {**load_file(str(lora_dir / ADAPTER_WEIGHTS)), **head_state(model)}
        require_finite(weights, f"not writing adapter {directory}")
        save_file(weights, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        atomic_write_text(tmp / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
        for extra in lora_dir.iterdir():
            if extra.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                extra.rename(tmp / extra.name)
        for leftover in lora_dir.iterdir():
            leftover.unlink()
        lora_dir.rmdir()
    return Path(directory)


def load_head_adapter(model: nn.Module, directory: str | Path) -> None:
    """Put a SEQ_CLS adapter (lorakit's or PEFT's) on `model`: LoRA layers and the trained head."""
    directory = Path(directory)
    config = read_adapter_config(directory, modules_to_save=True)
    head = head_name(model)
    saved = config.get("modules_to_save") or []
    if config.get("task_type") != "SEQ_CLS" or head not in saved:
        raise LorakitError(f"{directory} is not a sequence-classification adapter for this model (task_type "
                           f"{config.get('task_type')!r}, modules_to_save {saved}); it needs SEQ_CLS with {head!r}")
    weights = read_adapter_weights(directory)
    prefix = f"{PEFT_PREFIX}{head}."
    head_weights = {k[len(prefix):].replace("modules_to_save.default.", ""): v
                    for k, v in weights.items() if k.startswith(prefix)}
    module = getattr(model, head)
    expected = module.state_dict()
    if set(head_weights) != set(expected) or any(head_weights[k].shape != expected[k].shape for k in expected):
        shapes = {k: tuple(v.shape) for k, v in head_weights.items()}
        raise LorakitError(f"{directory}: the saved {head} {shapes} does not fit this model's "
                           f"{ {k: tuple(v.shape) for k, v in expected.items()} }; was it trained with another label set?")
    apply_adapter_weights(model, directory, config, {k: v for k, v in weights.items() if not k.startswith(prefix)})
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(head_weights[k].to(v.dtype))


def head_probabilities(model: nn.Module, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 8,
                       progress: Any = None) -> torch.Tensor:
    """(N, K) softmax of the head's logits; each text truncated to max_length tokens, right-padded."""
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), model.config.num_labels, dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = encode(tokenizer, [texts[i] for i in idx], max_length)
        with torch.no_grad():
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits.double()
        out[idx] = torch.softmax(logits, dim=-1).cpu()
        if progress is not None:
            progress(len(idx))
    return out


def encode(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded, truncated batch with the tokenizer's own special tokens (an encoder's [CLS] / [SEP])."""
    tokenizer.padding_side = "right"
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
