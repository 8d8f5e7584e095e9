"""One entry point per operation for every kind of trained result: LoRA / DoRA, IA3, selective, prompt tuning.

The loop, checkpoints, inference, merge and `adapter info` call these instead of one kind's
functions, so each kind's files stay in its own module (state.py, ia3_state.py, selective.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapters.ia3 import ia3_layers
from lorakit.adapters.ia3_state import ia3_info, load_ia3, save_ia3
from lorakit.adapters.inject import lora_layers, unwrap_ia3, unwrap_lora
from lorakit.adapters.prompt_tuning import PEFT_TYPE as PROMPT_TUNING, prompt_embedding
from lorakit.adapters.selective import (
    is_selective_dir,
    load_selective,
    read_selective,
    save_selective,
    selective_spec,
)
from lorakit.adapters.state import (
    AdapterInfo,
    AdapterMeta,
    adapter_info,
    load_adapter,
    read_adapter_meta,
    read_config_json,
    save_adapter,
)
from lorakit.errors import LorakitError


def adapter_kind(directory: str | Path) -> str:
    """lora (LoRA or DoRA), ia3, prompt_tuning or selective, from the directory's files; another PEFT type
    is refused by name."""
    if is_selective_dir(directory):
        return "selective"
    peft_type = str(read_config_json(directory).get("peft_type", "")).upper()
    if peft_type in ("LORA", "IA3", PROMPT_TUNING):
        return peft_type.lower()
    raise LorakitError(f"{Path(directory) / 'adapter_config.json'}: peft_type is {peft_type or 'missing'}; "
                       "lorakit loads LORA (and DoRA), IA3 and PROMPT_TUNING adapters and its own selective fine-tunes")


def has_adapter(model: nn.Module) -> bool:
    """Whether the model carries something save_trained writes (LoRA / IA3 layers, virtual tokens, selective tensors)."""
    return any(True for _ in lora_layers(model)) or any(True for _ in ia3_layers(model)) or \
        prompt_embedding(model) is not None or selective_spec(model) is not None


def save_trained(model: nn.Module, directory: str | Path, base_model: str | None,
                 meta: AdapterMeta | Mapping[str, Any] | None = None, overwrite: bool = True) -> Path:
    """Write what the model trains, in its kind's format (PEFT LoRA / IA3 / PROMPT_TUNING, or lorakit's selective)."""
    if any(True for _ in ia3_layers(model)):
        return save_ia3(model, directory, base_model, meta, overwrite)
    if selective_spec(model) is not None:
        return save_selective(model, directory, base_model, meta, overwrite)
    return save_adapter(model, directory, base_model, meta, overwrite)


def load_any(model: nn.Module, directory: str | Path, trainable: bool = False) -> AdapterInfo:
    """Apply the adapter or selective fine-tune in `directory` to `model`."""
    kind = adapter_kind(directory)
    if kind == "ia3":
        return load_ia3(model, directory, trainable)
    if kind == "selective":
        load_selective(model, directory, trainable)
        return describe(directory)
    return load_adapter(model, directory, trainable)


def describe(directory: str | Path) -> AdapterInfo:
    """What an adapter directory holds, whatever its kind (`lorakit adapter info`)."""
    directory = Path(directory)
    kind = adapter_kind(directory)
    if kind == "ia3":
        return ia3_info(directory)
    if kind in ("lora", "prompt_tuning"):
        return adapter_info(directory)
    manifest, tensors = read_selective(directory)
    return AdapterInfo(
        path=directory, base_model=manifest.get("base_model"), method="selective", r=0, alpha=0.0, dropout=0.0,
        use_rslora=False, target_modules=list(manifest.get("patterns") or []), modules=list(tensors),
        num_params=sum(t.numel() for t in tensors.values()),
        file_bytes=sum(p.stat().st_size for p in directory.iterdir() if p.is_file()), meta=read_adapter_meta(directory),
    )


def unwrap_all(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Fold every LoRA / IA3 layer into its base and put plain layers back (selective tensors already are)."""
    unwrap_lora(model, dtype)
    unwrap_ia3(model, dtype)
