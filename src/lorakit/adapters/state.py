"""Adapter files in PEFT's format, so PEFT, vLLM and llama.cpp read what we write.

    adapter_config.json         peft_type LORA, r, lora_alpha, target_modules, ...
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight / .lora_B.weight
                                (DoRA, use_dora true: also .lora_magnitude_vector, shape (out,))
    lorakit.json                our own metadata (template, quantization, training), optional

Prompt tuning (adapters.prompt_tuning) is PEFT's PROMPT_TUNING format in the same two files:
peft_type PROMPT_TUNING, num_virtual_tokens, token_dim, ... and one tensor `prompt_embeddings`.

When loading, the set of adapted modules and each one's rank are read from the weight
keys and shapes, not from `target_modules`, so PEFT's rank_pattern and any target syntax
load correctly.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.adapters.inject import freeze_base, linear_layer_names, lora_layers, wrap_layer
from lorakit.adapters.lora import LoRALinear
from lorakit.adapters.prompt_tuning import (PEFT_TYPE as PROMPT_TUNING, PROMPT_KEY, check_prompt_weights,
                                            inject_prompt_tuning, peft_prompt_config, prompt_config_problem,
                                            prompt_embedding)
from lorakit.adapters.selective import is_selective_dir, read_manifest
from lorakit.errors import LorakitError
from lorakit.io import atomic_dir, atomic_write_text
from lorakit.models.quantized import QuantSpec

MAGNITUDE_KEY = "lora_magnitude_vector"  # PEFT's DoRA key: base_model.model.<module path>.lora_magnitude_vector
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORAKIT_META = "lorakit.json"
PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterInfo:
    """What an adapter directory holds."""

    path: Path
    base_model: str | None
    method: str  # lora | dora (adapter_config.json's use_dora) | ia3 | selective | prompt_tuning (peft_type PROMPT_TUNING)
    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    target_modules: list[str] | str
    modules: list[str]
    num_params: int
    file_bytes: int
    meta: AdapterMeta | None = None  # lorakit.json; None for a PEFT-made adapter
    feedforward: list[str] = field(default_factory=list)  # ia3: the layers whose input is scaled
    num_virtual_tokens: int = 0  # prompt tuning: the virtual tokens (0 for LoRA)
    token_dim: int = 0  # prompt tuning: their width (the model's hidden size)
    init_text: str | None = None  # prompt tuning: PEFT's prompt_tuning_init_text (None: RANDOM init)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's key names, contiguous and on CPU."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
        if layer.magnitude is not None:
            state[f"{PEFT_PREFIX}{name}.{MAGNITUDE_KEY}"] = layer.magnitude.detach().cpu().contiguous()
    return state


def require_finite(tensors: dict[str, torch.Tensor], what: str,
                   fix: str = "training diverged (lower train.lr and resume from the last checkpoint)") -> None:
    """Refuse `what` (writing a checkpoint or adapter, loading one) when a float tensor holds NaN/inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise LorakitError(f"{what}: {name} has {bad} NaN/inf value(s) of {t.numel()}; {fix}")


def peft_target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """Target spec for adapter_config.json that selects exactly `names` under PEFT's rules.

    PEFT matches a list by suffix and a string by regex fullmatch. Leaf names are the
    readable choice when they select the same set; otherwise an exact-path regex.
    """
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    by_leaf = {n for n in linear_layer_names(model) if n.rsplit(".", 1)[-1] in leaves}
    if by_leaf == set(names):
        return leaves
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    meta: AdapterMeta | Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write the model's LoRA adapters to `directory` in PEFT's format, atomically.

    `meta` (lorakit.json) may be given as a mapping of its keys; it is checked as reading checks it.
    A prompt-tuned model (adapters.prompt_tuning) is written in PEFT's PROMPT_TUNING format.
    """
    directory = Path(directory)
    if meta and not isinstance(meta, AdapterMeta):
        meta = AdapterMeta.from_dict(dict(meta), directory / LORAKIT_META)
    if prompt_embedding(model) is not None:
        prompt = prompt_embedding(model).prompt_embeddings.detach().cpu().contiguous()
        return write_adapter_files(directory, peft_prompt_config(model, base_model_name_or_path), {PROMPT_KEY: prompt},
                              meta, overwrite)
    layers = list(lora_layers(model))
    if not layers:
        raise LorakitError("the model has no LoRA adapters to save; inject or load one first")
    first = layers[0][1]
    if len({layer.use_dora for _, layer in layers}) > 1:
        raise LorakitError("the model mixes DoRA and plain LoRA layers; PEFT's format holds one kind per adapter")
    ranks = {layer.r for _, layer in layers}
    alphas = {layer.alpha for _, layer in layers}
    names = [name for name, _ in layers]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "target_modules": peft_target_modules(model, names),
        "use_rslora": first.use_rslora,
        "fan_in_fan_out": first.fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": first.use_dora,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if len(ranks) > 1 or len(alphas) > 1:  # per-layer ranks: PEFT's patterns, by exact path
        config["rank_pattern"] = {re.escape(n): layer.r for n, layer in layers if layer.r != first.r}
        config["alpha_pattern"] = {re.escape(n): layer.alpha for n, layer in layers if layer.alpha != first.alpha}
    return write_adapter_files(directory, config, adapter_state_dict(model), meta, overwrite)


def write_adapter_files(directory: Path, config: dict[str, Any], weights: dict[str, torch.Tensor],
                        meta: AdapterMeta | None, overwrite: bool, weights_file: str = ADAPTER_WEIGHTS,
                        config_file: str = ADAPTER_CONFIG) -> Path:
    """The weights (safetensors) + the config JSON (+ lorakit.json), atomically; nothing NaN is written.
    PEFT's adapter_model.safetensors + adapter_config.json by default (selective: its own two names)."""
    require_finite(weights, f"not writing adapter {directory}")
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        save_file(weights, str(tmp / weights_file), metadata={"format": "pt"})
        atomic_write_text(tmp / config_file, json.dumps(config, indent=2) + "\n")
        if meta:
            write_adapter_meta(tmp, meta)
    return directory


def read_adapter_config(directory: str | Path, modules_to_save: bool = False) -> dict[str, Any]:
    """A LoRA (or DoRA) or prompt-tuning adapter's adapter_config.json, validated; other PEFT types are refused
    naming theirs. `modules_to_save` True lets a SEQ_CLS adapter's trained head through (lorakit.classify.head
    loads it)."""
    config = read_config_json(directory, modules_to_save)
    cfg_path = Path(directory) / ADAPTER_CONFIG
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == PROMPT_TUNING:
        problem = prompt_config_problem(config)
        if problem:
            raise LorakitError(f"{cfg_path}: {problem}; the adapter config is damaged or not from a prompt-tuning trainer")
        return config
    if peft_type != "LORA":
        raise LorakitError(f"{cfg_path}: peft_type is {peft_type or 'missing'}; this needs a LORA or PROMPT_TUNING adapter")
    if not isinstance(config.get("use_dora", False), bool):
        raise LorakitError(f"{cfg_path}: use_dora is {config['use_dora']!r}, expected true or false; the adapter config is damaged")
    if config.get("bias", "none") != "none":
        raise LorakitError(f"{cfg_path}: bias={config['bias']!r} is not supported; use bias='none'")
    problem = _config_problem(config)
    if problem:
        raise LorakitError(f"{cfg_path}: {problem}; the adapter config is damaged or not from a LoRA trainer")
    return config


def read_config_json(directory: str | Path, modules_to_save: bool = False) -> dict[str, Any]:
    """adapter_config.json as a dict, any peft_type; modules_to_save refused (lorakit trains adapters only)
    unless `modules_to_save` (a SEQ_CLS head)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LorakitError(f"adapter directory not found: {directory}; check the path")
    cfg_path = directory / ADAPTER_CONFIG
    if not cfg_path.exists():
        raise LorakitError(
            f"{directory} has no {ADAPTER_CONFIG}; it is not a LoRA adapter directory "
            "(expected PEFT's adapter_config.json + adapter_model.safetensors)"
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LorakitError(f"{cfg_path} is not valid JSON ({err}); the adapter is damaged") from None
    if not isinstance(config, dict):
        raise LorakitError(f"{cfg_path} holds {type(config).__name__}, not a JSON object; the adapter is damaged")
    if config.get("modules_to_save") and not modules_to_save:
        raise LorakitError(
            f"{cfg_path}: modules_to_save {config['modules_to_save']} is not supported; "
            "train LoRA adapters only"
        )
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise LorakitError(f"{cfg_path}: base_model_name_or_path is {base!r}, expected a string; the adapter config is damaged")
    return config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _config_problem(config: dict[str, Any]) -> str | None:
    """What makes an adapter_config.json unusable (types, finite numbers, compilable patterns), or None."""
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        return f"lora_alpha is {config['lora_alpha']!r}, expected a finite number"
    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        return f"r is {r!r}, expected a positive integer"
    dropout = config.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        return f"lora_dropout is {dropout!r}, expected a number in [0, 1)"
    if not isinstance(config.get("use_rslora", False), bool):
        return f"use_rslora is {config['use_rslora']!r}, expected true or false"
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        return f"base_model_name_or_path is {base!r}, expected a string"
    for key, ok, expected in (("alpha_pattern", _is_number, "a finite number"),
                              ("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                               "a positive integer")):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            return f"{key} is {patterns!r}, expected a mapping of regex to value"
        for pattern, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as err:
                return f"{key} key {pattern!r} is not a valid regex ({err})"
            if not ok(value):
                return f"{key}[{pattern!r}] is {value!r}, expected {expected}"
    return None


_META_TYPES: dict[str, type] = {"max_length": int, "quantization": dict}  # AdapterMeta's other fields are strings


@dataclass
class AdapterMeta:
    """lorakit.json: what reloading an adapter needs beside PEFT's files (its base, template, quantized base).

    Written next to every adapter training saves; a PEFT-made adapter has none (read_adapter_meta
    gives None). The file holds these keys in this order, then `extra` (a checkpoint's step,
    adapter-best's eval_loss or best metric) as written.
    """

    lorakit_version: str | None = None
    base_model: str | None = None
    method: str | None = None  # lora | qlora | full
    template: str | None = None
    system_prompt: str | None = None
    max_length: int | None = None
    quantization: dict[str, Any] | None = None  # what load_model quantized: method, blocksize, double_quant, ...
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> AdapterMeta:
        """Validated: a wrong type or quantization is a one-line error naming `path`, never guessed around."""
        if not isinstance(data, dict):
            raise LorakitError(f"{path} holds {type(data).__name__}, not a JSON object; the adapter's metadata is damaged")
        names = [f.name for f in fields(cls) if f.name != "extra"]
        for key in names:
            want = _META_TYPES.get(key, str)
            if data.get(key) is not None and not isinstance(data[key], want):
                raise LorakitError(f"{path}: {key} is {data[key]!r}, expected {want.__name__}; the metadata is damaged")
        q = data.get("quantization")
        if q is not None and q.get("method") not in ("nf4", "fp4", "int8"):
            raise LorakitError(f"{path}: quantization.method is {q.get('method')!r}, expected nf4, fp4 or int8; "
                               "the metadata is damaged")
        if q is not None and q.get("method") in ("nf4", "fp4") and q.get("blocksize", 64) not in (32, 64, 128, 256):
            raise LorakitError(f"{path}: quantization.blocksize is {q.get('blocksize')!r}, expected 32, 64, 128 or 256")
        revision = data.get("base_model_revision")
        if revision is not None and not isinstance(revision, str):
            raise LorakitError(f"{path}: base_model_revision is {revision!r}, expected a commit string; "
                               "the metadata is damaged")
        return cls(**{k: data.get(k) for k in names}, extra={k: v for k, v in data.items() if k not in names})

    @property
    def base_revision(self) -> str | None:
        """The hub commit of the base model training loaded (None for a local or builtin base)."""
        return self.extra.get("base_model_revision")

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**values, **self.extra}

    def quant_spec(self, compute_dtype: torch.dtype | None = None) -> QuantSpec | None:
        """The quantized base the adapter was trained on, for load_model (None: a full-precision base).

        `compute_dtype` None: the recorded one (bfloat16 / float16, else fp32).
        """
        q = self.quantization
        if not q:
            return None
        if compute_dtype is None:
            compute_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(q.get("compute_dtype"),
                                                                                       torch.float32)
        return QuantSpec(q["method"], int(q.get("blocksize", 64)), bool(q.get("double_quant", True)), compute_dtype)


@dataclass(frozen=True)
class BaseChoice:
    """The base model to load adapters on: what the user named, or what the adapters record."""

    name: str
    revision: str | None = None
    """The hub commit the adapters were trained on (lorakit.json's base_model_revision)."""
    cache_only: bool = False
    """True when the name came from the adapters: a hub model is then taken from the local cache only,
    never downloaded because an adapter file says so."""


def base_model_of(adapters: list[Path] | list[str], model: str | None = None) -> BaseChoice | None:
    """`model` (with the recorded commit when it names the adapters' base), else the one base all the
    adapters record; None when they record none or different ones (the caller asks for --model)."""
    recorded = []
    for adapter in adapters:
        meta = read_adapter_meta(adapter)
        recorded.append((recorded_base(adapter), meta.base_revision if meta else None))
    if model is not None:
        commits = {rev for name, rev in recorded if name == model and rev}
        return BaseChoice(model, commits.pop() if len(commits) == 1 else None, cache_only=False)
    names = {name for name, _ in recorded}
    if len(names) != 1 or None in names:
        return None
    commits = {rev for _, rev in recorded if rev}
    if len(commits) > 1:
        raise LorakitError(f"the adapters were trained on different commits of {recorded[0][0]} "
                           f"({', '.join(sorted(commits))}); load them one at a time, or pass --model")
    return BaseChoice(str(recorded[0][0]), commits.pop() if commits else None, cache_only=True)


def recorded_base(directory: str | Path) -> str | None:
    """The base model an adapter (any PEFT type) or a selective fine-tune records."""
    if is_selective_dir(directory):
        return read_manifest(directory).get("base_model")
    return read_config_json(directory).get("base_model_name_or_path")


def read_adapter_meta(directory: str | Path) -> AdapterMeta | None:
    """The adapter's lorakit.json: None when absent (a PEFT-made adapter); one-line error when damaged.

    A damaged file is never read as absent: that would load a QLoRA adapter onto an unquantized base.
    """
    path = Path(directory) / LORAKIT_META
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # JSON and UTF-8 errors are ValueErrors
        raise LorakitError(f"{path} cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                           "the adapter's metadata is damaged: restore it from the run's checkpoints/ or "
                           "delete it to treat the adapter as a plain PEFT adapter") from err
    return AdapterMeta.from_dict(data, path)


def write_adapter_meta(directory: Path, meta: AdapterMeta) -> None:
    atomic_write_text(directory / LORAKIT_META, json.dumps(meta.to_dict(), indent=2, default=str) + "\n")


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    path = directory / ADAPTER_WEIGHTS
    if not path.exists():
        if (directory / "adapter_model.bin").exists():
            raise LorakitError(
                f"{directory} holds adapter_model.bin (pickle); lorakit only reads safetensors. "
                "Re-save it with PEFT's save_pretrained(safe_serialization=True)"
            )
        raise LorakitError(f"{directory} has no {ADAPTER_WEIGHTS}; the adapter is incomplete")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise LorakitError(f"{path} cannot be read ({err}); the adapter file is damaged") from err
    require_finite(weights, f"cannot use adapter {path}", "the adapter file is damaged or its training diverged")
    return weights


def layer_alpha(config: dict[str, Any], name: str) -> float:
    """The adapter's alpha for layer `name`: PEFT's alpha_pattern (a key matches a path suffix by regex), else lora_alpha."""
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return float(value)
    return float(config.get("lora_alpha", 8))


def load_adapter(model: nn.Module, directory: str | Path, trainable: bool = False) -> AdapterInfo:
    """Put the adapter in `directory` onto `model` (injecting LoRA layers where needed)."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = read_adapter_weights(directory)
    if is_prompt_tuning(config):
        return _load_prompt_tuning(model, directory, config, weights, trainable)
    apply_adapter_weights(model, directory, config, weights, trainable)
    return adapter_info(directory, config, weights)


def apply_adapter_weights(model: nn.Module, directory: Path, config: dict[str, Any], weights: dict[str, torch.Tensor],
                          trainable: bool = False) -> None:
    """Inject (where needed) and fill the LoRA layers `weights` hold (PEFT keys; `directory` names them in errors)."""
    modules = adapted_modules(weights, directory)
    present = set(linear_layer_names(model))
    missing = [m for m in modules if m not in present]
    if missing:
        base = config.get("base_model_name_or_path") or "unknown"
        raise LorakitError(
            f"adapter {directory} adapts {len(missing)} module(s) this model does not have "
            f"(e.g. {missing[0]}); it was trained on base model {base}: load it on that model"
        )
    use_rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))
    dropout = float(config.get("lora_dropout", 0.0)) if trainable else 0.0
    for name in modules:
        a = weights[f"{PEFT_PREFIX}{name}.lora_A.weight"]
        b = weights[f"{PEFT_PREFIX}{name}.lora_B.weight"]
        r = int(a.shape[0])
        existing = model.get_submodule(name)
        if isinstance(existing, LoRALinear):
            layer = existing
            if layer.use_dora != use_dora:
                raise LorakitError(f"adapter {directory} is {'DoRA' if use_dora else 'plain LoRA'} but {name} already "
                                   f"holds a {'DoRA' if layer.use_dora else 'plain LoRA'} layer; load it on a plain model")
        else:
            layer = LoRALinear(existing, r, layer_alpha(config, name), dropout, use_rslora, use_dora=use_dora)
            wrap_layer(model, name, layer)
        expect_a = (layer.r, layer.in_features)
        expect_b = (layer.out_features, layer.r)
        if tuple(a.shape) != expect_a or tuple(b.shape) != expect_b:
            raise LorakitError(
                f"adapter {directory}: {name} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} but the "
                f"model's layer needs {expect_a} / {expect_b}; the adapter belongs to another base model"
            )
        m = adapter_magnitude(weights, name, use_dora, layer.out_features, directory)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
            if layer.magnitude is not None and m is not None:
                layer.magnitude.copy_(m)
    freeze_base(model)
    if not trainable:
        for _, layer in lora_layers(model):
            for p in layer.adapter_parameters():
                p.requires_grad_(False)


def is_prompt_tuning(config: dict[str, Any]) -> bool:
    """adapter_config.json (as read_adapter_config returns it) is PEFT's PROMPT_TUNING."""
    return str(config.get("peft_type", "")).upper() == PROMPT_TUNING


def _load_prompt_tuning(model: nn.Module, directory: Path, config: dict[str, Any], weights: dict[str, torch.Tensor],
                        trainable: bool) -> AdapterInfo:
    if any(True for _ in lora_layers(model)):
        raise LorakitError(f"adapter {directory} is a prompt-tuning adapter but the model already holds LoRA layers; "
                           "load it on a plain model")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    token_dim = int(embedding.weight.shape[1]) if embedding is not None else None
    prompt = check_prompt_weights(weights, config, directory, token_dim)
    layer = inject_prompt_tuning(model, int(prompt.shape[0]), config.get("prompt_tuning_init_text"), prompt=prompt)
    layer.prompt_embeddings.requires_grad_(trainable)
    return adapter_info(directory, config, weights)


def adapter_magnitude(weights: dict[str, torch.Tensor], name: str, use_dora: bool, out_features: int,
               directory: Path) -> torch.Tensor | None:
    """Layer `name`'s DoRA magnitude (out,) from the file, checked against use_dora and the layer's size."""
    m = weights.get(f"{PEFT_PREFIX}{name}.{MAGNITUDE_KEY}")
    if not use_dora:
        if m is not None:
            raise LorakitError(f"adapter {directory}: {name} has a DoRA magnitude but adapter_config.json says "
                               "use_dora false; the adapter is damaged")
        return None
    if m is None:
        raise LorakitError(f"adapter {directory}: use_dora is true but {name} has no {MAGNITUDE_KEY}; "
                           "the adapter file is damaged")
    if tuple(m.shape) != (out_features,):
        raise LorakitError(f"adapter {directory}: {name} has a {MAGNITUDE_KEY} of shape {tuple(m.shape)} but the "
                           f"layer has {out_features} outputs; the adapter belongs to another base model")
    return m


def adapted_modules(weights: dict[str, torch.Tensor], directory: Path) -> list[str]:
    """The module paths an adapter's weights adapt (each with lora_A and lora_B, DoRA's magnitude allowed);
    anything else is refused."""
    modules, unknown = [], []
    for key in weights:
        if key.startswith(PEFT_PREFIX) and key.endswith(".lora_A.weight"):
            name = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
            if f"{PEFT_PREFIX}{name}.lora_B.weight" not in weights:
                raise LorakitError(f"adapter {directory}: {name} has lora_A but no lora_B; the file is damaged")
            modules.append(name)
        elif not (key.startswith(PEFT_PREFIX) and key.endswith((".lora_B.weight", f".{MAGNITUDE_KEY}"))):
            unknown.append(key)
    if unknown:
        raise LorakitError(
            f"adapter {directory} holds weights lorakit cannot apply (e.g. {unknown[0]}); "
            "only LoRA A/B matrices on linear layers are supported"
        )
    if not modules:
        raise LorakitError(f"adapter {directory} holds no LoRA weights")
    return modules


def adapter_info(
    directory: str | Path,
    config: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> AdapterInfo:
    directory = Path(directory)
    config = config if config is not None else read_adapter_config(directory)
    weights = weights if weights is not None else read_adapter_weights(directory)
    meta = read_adapter_meta(directory)
    file_bytes = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    if is_prompt_tuning(config):
        prompt = check_prompt_weights(weights, config, directory)
        return AdapterInfo(path=directory, base_model=config.get("base_model_name_or_path"), method="prompt_tuning",
                           r=0, alpha=0.0, dropout=0.0, use_rslora=False, target_modules=[], modules=[],
                           num_params=prompt.numel(), file_bytes=file_bytes, meta=meta,
                           num_virtual_tokens=int(prompt.shape[0]), token_dim=int(prompt.shape[1]),
                           init_text=config.get("prompt_tuning_init_text"))
    return AdapterInfo(
        path=directory,
        base_model=config.get("base_model_name_or_path"),
        method="dora" if config.get("use_dora") else "lora",
        r=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)),
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=config.get("target_modules") or [],
        modules=adapted_modules(weights, directory),
        num_params=sum(t.numel() for t in weights.values()),
        file_bytes=file_bytes,
        meta=meta,
    )
