"""Selective fine-tuning: exactly the base parameters whose names match train (adapter.method: selective).

    adapter.trainable: ['\\.bias$']                      biases only (BitFit, Ben Zaken et al. 2021)
    adapter.trainable: ['norm\\.weight$']                the RMSNorm / LayerNorm weights
    adapter.trainable: ['model\\.layers\\.(2[4-9])\\.']  the last 6 blocks of a 30-block model

Each entry is a regex searched (re.search) in the full parameter name. PEFT has no format for
"these base tensors replaced", so the result is lorakit's own directory:

    selective.safetensors   the trained tensors under their parameter names
    selective.json          the manifest: format, base model + revision, the patterns, and per tensor
                            its shape, dtype, and the sha256 of the base tensor it replaces
    lorakit.json            AdapterMeta, as for every adapter

Loading is base + those tensors; a base whose tensor hash differs from the recorded one (same
dtype) is refused, so the tensors never land on another model. Merging writes the whole model.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lorakit.errors import LorakitError

SELECTIVE_WEIGHTS = "selective.safetensors"
SELECTIVE_MANIFEST = "selective.json"
FORMAT = "lorakit-selective"


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes as stored (its dtype, row-major)."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def select_parameters(model: nn.Module, patterns: list[str]) -> list[str]:
    """The parameter names any pattern finds (re.search), in model order; a pattern finding none is an error
    naming the closest parameter names."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(re.search(pattern, n) for n in names):
            close = difflib.get_close_matches(pattern.replace("\\", ""), names, n=3, cutoff=0.3) or names[:3]
            raise LorakitError(f"adapter.trainable entry {pattern!r} matches no parameter; close names: "
                               f"{', '.join(close)} (a regex searched in the full name, e.g. '\\.bias$')")
    return [n for n in names if any(re.search(p, n) for p in patterns)]


@dataclass
class SelectiveSpec:
    """What selective training trains and the base tensors it replaces (their sha256, taken before training)."""

    patterns: list[str]
    names: list[str]
    base_sha256: dict[str, str]
    base_dtype: dict[str, str]


def prepare_selective(model: nn.Module, patterns: list[str]) -> list[str]:
    """Freeze everything but the matching parameters; remember their base hashes on the model
    (`model.lorakit_selective`) for saving. Returns the trained parameter names."""
    names = select_parameters(model, patterns)
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    model.lorakit_selective = SelectiveSpec(list(patterns), names, {n: tensor_sha256(params[n]) for n in names},
                                            {n: str(params[n].dtype).removeprefix("torch.") for n in names})
    return names


def selective_spec(model: nn.Module) -> SelectiveSpec | None:
    spec = getattr(model, "lorakit_selective", None)
    return spec if isinstance(spec, SelectiveSpec) else None


def save_selective(model: nn.Module, directory: str | Path, base_model: str | None, meta: Any = None,
                   overwrite: bool = True) -> Path:
    """Write the trained tensors and the manifest to `directory`, atomically (meta: AdapterMeta or a mapping)."""
    from lorakit.adapters.state import AdapterMeta, write_adapter_files

    spec = selective_spec(model)
    if spec is None:
        raise LorakitError("the model was not prepared for selective training; nothing to save")
    directory = Path(directory)
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().cpu().contiguous() for n in spec.names}
    meta = meta if meta is None or isinstance(meta, AdapterMeta) else AdapterMeta.from_dict(dict(meta), directory)
    manifest = {
        "format": FORMAT, "version": 1, "base_model": base_model,
        "base_model_revision": meta.base_revision if meta else None, "patterns": spec.patterns,
        "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                        "base_dtype": spec.base_dtype[n], "base_sha256": spec.base_sha256[n]} for n, t in tensors.items()},
    }
    return write_adapter_files(directory, manifest, tensors, meta, overwrite, SELECTIVE_WEIGHTS, SELECTIVE_MANIFEST)


def is_selective_dir(directory: str | Path) -> bool:
    return (Path(directory) / SELECTIVE_MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / SELECTIVE_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LorakitError(f"{path} cannot be read ({err}); the selective fine-tune is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("tensors"), dict):
        raise LorakitError(f"{path} is not a lorakit selective manifest (format {FORMAT}); the directory is damaged")
    return manifest


def read_selective(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, tensors), checked against each other: the same names, shapes and dtypes, all finite."""
    from lorakit.adapters.state import require_finite

    directory = Path(directory)
    manifest = read_manifest(directory)
    try:
        tensors = load_file(str(directory / SELECTIVE_WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise LorakitError(f"{directory / SELECTIVE_WEIGHTS} cannot be read ({err}); the fine-tune is damaged") from None
    if set(tensors) != set(manifest["tensors"]):
        odd = sorted(set(tensors) ^ set(manifest["tensors"]))[0]
        raise LorakitError(f"{directory}: {odd} is in only one of {SELECTIVE_WEIGHTS} and {SELECTIVE_MANIFEST}; "
                           "the directory is damaged")
    for name, t in tensors.items():
        if list(t.shape) != manifest["tensors"][name].get("shape"):
            raise LorakitError(f"{directory}: {name} has shape {list(t.shape)} but the manifest says "
                               f"{manifest['tensors'][name].get('shape')}; the directory is damaged")
    require_finite(tensors, f"cannot use {directory}", "the file is damaged or its training diverged")
    return manifest, tensors


@torch.no_grad()
def load_selective(model: nn.Module, directory: str | Path, trainable: bool = False) -> list[str]:
    """Replace the model's tensors by the fine-tune's (base + those tensors); returns their names.

    Each replaced base tensor must hash as recorded when the model holds it in the recorded dtype
    (a base loaded in another dtype cannot be checked bit for bit; shapes still are).
    """
    directory = Path(directory)
    manifest, tensors = read_selective(directory)
    params = dict(model.named_parameters())
    base = manifest.get("base_model") or "unknown"
    for name, value in tensors.items():
        if name not in params:
            raise LorakitError(f"{directory} replaces {name}, which this model does not have; it was trained on "
                               f"base model {base}: load it on that model")
        p, entry = params[name], manifest["tensors"][name]
        if tuple(p.shape) != tuple(value.shape):
            raise LorakitError(f"{directory}: {name} is {tuple(value.shape)} but the model's is {tuple(p.shape)}; "
                               f"it belongs to base model {base}")
        if str(p.dtype).removeprefix("torch.") == entry.get("base_dtype") and tensor_sha256(p) != entry.get("base_sha256"):
            revision = manifest.get("base_model_revision")
            raise LorakitError(f"{directory}: the model's {name} is not the base tensor it was trained on (sha256 "
                               f"differs); load it on base model {base}{f' at revision {revision}' if revision else ''}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, value in tensors.items():
        params[name].copy_(value.to(params[name].dtype))
        params[name].requires_grad_(trainable)
    if trainable:
        model.lorakit_selective = SelectiveSpec(list(manifest.get("patterns") or []), list(tensors),
                                                {n: e["base_sha256"] for n, e in manifest["tensors"].items()},
                                                {n: e["base_dtype"] for n, e in manifest["tensors"].items()})
    return list(tensors)
