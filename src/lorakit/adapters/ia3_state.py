"""IA3 adapters in PEFT's format (peft_type IA3), so PEFT reads what lorakit writes and back.

    adapter_config.json         peft_type IA3, target_modules, feedforward_modules, fan_in_fan_out
    adapter_model.safetensors   base_model.model.<module path>.ia3_l: (out, 1), or (1, in) for a
                                feedforward layer (its input is scaled), fp32
    lorakit.json                AdapterMeta, as for LoRA

Which layers scale their input is read from each vector's shape (PEFT's layout makes it
unambiguous) and checked against feedforward_modules when the config names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapters.ia3 import IA3_KEY, IA3Linear, ia3_layers
from lorakit.adapters.inject import freeze_base, linear_layer_names, wrap_layer
from lorakit.adapters.state import (
    ADAPTER_CONFIG,
    LORAKIT_META,
    PEFT_PREFIX,
    AdapterInfo,
    AdapterMeta,
    peft_target_modules,
    read_adapter_meta,
    read_adapter_weights,
    read_config_json,
    write_adapter_files,
)
from lorakit.errors import LorakitError


def save_ia3(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None,
             meta: AdapterMeta | Mapping[str, Any] | None = None, overwrite: bool = True) -> Path:
    """Write the model's IA3 vectors to `directory` in PEFT's format, atomically."""
    layers = list(ia3_layers(model))
    if not layers:
        raise LorakitError("the model has no IA3 layers to save; inject or load them first")
    names = [n for n, _ in layers]
    ff = [n for n, layer in layers if layer.feedforward]
    config = {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "target_modules": peft_target_modules(model, names),
        "feedforward_modules": peft_target_modules(model, ff) if ff else [],
        "fan_in_fan_out": layers[0][1].fan_in_fan_out, "init_ia3_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }
    directory = Path(directory)
    if meta and not isinstance(meta, AdapterMeta):
        meta = AdapterMeta.from_dict(dict(meta), directory / LORAKIT_META)
    weights = {f"{PEFT_PREFIX}{n}.{IA3_KEY}": layer.ia3_l.detach().cpu().contiguous() for n, layer in layers}
    return write_adapter_files(directory, config, weights, meta, overwrite)


def read_ia3_config(directory: str | Path) -> dict[str, Any]:
    config = read_config_json(directory)
    if str(config.get("peft_type", "")).upper() != "IA3":
        raise LorakitError(f"{Path(directory) / ADAPTER_CONFIG}: peft_type is {config.get('peft_type')!r}, not IA3")
    return config


def ia3_vectors(weights: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    """module path -> its ia3_l; anything else in the file is refused."""
    suffix = f".{IA3_KEY}"
    unknown = [k for k in weights if not (k.startswith(PEFT_PREFIX) and k.endswith(suffix))]
    if unknown:
        raise LorakitError(f"adapter {directory} holds weights lorakit cannot apply (e.g. {unknown[0]}); "
                           "an IA3 adapter holds only <layer>.ia3_l vectors")
    if not weights:
        raise LorakitError(f"adapter {directory} holds no IA3 vectors")
    return {k[len(PEFT_PREFIX): -len(suffix)]: v for k, v in weights.items()}


def _is_feedforward(name: str, vector: torch.Tensor, in_f: int, out_f: int, directory: Path) -> bool:
    shape = tuple(vector.shape)
    if shape == (1, in_f) and shape != (out_f, 1):
        return True
    if shape == (out_f, 1):
        return False
    raise LorakitError(f"adapter {directory}: {name} has an IA3 vector of shape {shape} but the layer needs "
                       f"({out_f}, 1) or (1, {in_f}); the adapter belongs to another base model")


def load_ia3(model: nn.Module, directory: str | Path, trainable: bool = False) -> AdapterInfo:
    """Put the IA3 adapter in `directory` onto `model` (wrapping its layers in IA3Linear)."""
    directory = Path(directory)
    config = read_ia3_config(directory)
    vectors = ia3_vectors(read_adapter_weights(directory), directory)
    present = set(linear_layer_names(model))
    missing = [n for n in vectors if n not in present]
    if missing:
        raise LorakitError(f"adapter {directory} adapts {len(missing)} module(s) this model does not have "
                           f"(e.g. {missing[0]}); it was trained on base model "
                           f"{config.get('base_model_name_or_path') or 'unknown'}: load it on that model")
    for name, vector in vectors.items():
        existing = model.get_submodule(name)
        if isinstance(existing, IA3Linear):
            raise LorakitError(f"{name} already holds an IA3 layer; load IA3 adapters on a plain model, one at a time")
        layer = IA3Linear(existing, feedforward=False)
        ff = _is_feedforward(name, vector, layer.in_features, layer.out_features, directory)
        layer = IA3Linear(existing, feedforward=ff) if ff else layer
        wrap_layer(model, name, layer)
        with torch.no_grad():
            layer.ia3_l.copy_(vector)
    freeze_base(model)
    if not trainable:
        for _, layer in ia3_layers(model):
            layer.ia3_l.requires_grad_(False)
    return ia3_info(directory, config, vectors)


def ia3_info(directory: str | Path, config: dict[str, Any] | None = None,
             vectors: dict[str, torch.Tensor] | None = None) -> AdapterInfo:
    directory = Path(directory)
    config = config if config is not None else read_ia3_config(directory)
    vectors = vectors if vectors is not None else ia3_vectors(read_adapter_weights(directory), directory)
    return AdapterInfo(
        path=directory, base_model=config.get("base_model_name_or_path"), method="ia3", r=0, alpha=0.0, dropout=0.0,
        use_rslora=False, target_modules=config.get("target_modules") or [], modules=list(vectors),
        num_params=sum(v.numel() for v in vectors.values()),
        file_bytes=sum(p.stat().st_size for p in directory.iterdir() if p.is_file()), meta=read_adapter_meta(directory),
        feedforward=[n for n, v in vectors.items() if v.shape[0] == 1 and v.shape[1] != 1],
    )
