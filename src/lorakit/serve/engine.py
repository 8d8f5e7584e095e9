"""What the server serves: one base model, its adapters, their prompts, and the scheduler.

Each served model (the base, every adapter) renders prompts the way `lorakit generate` does
for it: the adapter's recorded template and system prompt (`eval.generate.prompt_text`) and
its end-of-turn token as a stop token (`stop_token_ids`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.config import ServeConfig
from lorakit.errors import LorakitError
from lorakit.eval.generate import InferenceModel, prompt_text, stop_token_ids
from lorakit.serve.multi_lora import AdapterBank, ServedAdapter, check_servable
from lorakit.serve.scheduler import Scheduler


@dataclass
class ServedModel:
    id: str
    slot: int  # -1 = the base
    parent: str | None  # the base's id, for an adapter
    root: str
    created: int
    im: InferenceModel  # template + system prompt (the model and tokenizer are shared)
    eos: frozenset[int]


def parse_adapter_args(items: Sequence[str]) -> list[tuple[str, Path]]:
    """--adapter NAME=DIR (repeatable) -> [(name, dir)]; names unique and usable as model ids."""
    out: list[tuple[str, Path]] = []
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path.strip():
            raise LorakitError(f"--adapter {item!r}: expected NAME=DIR, e.g. --adapter handbook=runs/demo/adapter")
        if any(c.isspace() for c in name) or "/" in name:
            raise LorakitError(f"--adapter {item!r}: the name {name!r} has spaces or '/'; use a short model id")
        if name in {n for n, _ in out}:
            raise LorakitError(f"--adapter {item!r}: the name {name} is given twice")
        directory = Path(path)
        if not directory.is_dir():
            raise LorakitError(f"--adapter {item!r}: adapter directory not found: {directory}")
        out.append((name, directory))
    return out


def _quant_spec(meta: Any) -> Any:
    """The quantized base an adapter was trained on (None: a full-precision base or no lorakit.json)."""
    return meta.quant_spec() if meta else None


class UnknownAdapter(LorakitError):
    """Unloading a name that is not a served adapter (HTTP 404)."""


class AdapterBusy(LorakitError):
    """Unloading an adapter that requests are still using (HTTP 409)."""


class Engine:
    def __init__(self, model: str | None, adapters: Sequence[tuple[str, Path]], cfg: ServeConfig,
                 dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False, metrics: Any = None) -> None:
        from lorakit.adapters.state import BaseChoice, base_model_of, read_adapter_config, read_adapter_meta
        from lorakit.models.load import load_model

        self.cfg = cfg
        for name, path in adapters:  # before the base loads: a DoRA adapter is refused at once
            check_servable(name, Path(path))
        metas = {name: read_adapter_meta(path) for name, path in adapters}
        base = base_model_of([path for _, path in adapters], model) if adapters else (BaseChoice(model) if model else None)
        if base is None:
            bases = {read_adapter_config(path).get("base_model_name_or_path") for _, path in adapters}
            raise LorakitError("give --model: the adapters record no base model, or different ones "
                               f"({', '.join(sorted(str(b) for b in bases)) or 'none given'})")
        model = base.name
        specs = {name: _quant_spec(meta) for name, meta in metas.items()}
        if len({repr(s) for s in specs.values()}) > 1:
            kinds = ", ".join(f"{n}: {s.method if s else 'none'}" for n, s in specs.items())
            raise LorakitError(f"the adapters were trained on differently quantized bases ({kinds}); "
                               "serve the ones on one base together")
        self.quant = next(iter(specs.values())) if specs else None
        loaded = load_model(model, dtype, device, trust_remote_code, base.revision, quantization=self.quant,
                            cache_only=base.cache_only)
        self.model, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        self.model.requires_grad_(False)
        _check_cache(self.model, model)
        self.base_id = model
        self.bank = AdapterBank(self.model)
        self.models: dict[str, ServedModel] = {}
        self._add_model(model, -1, None, model, InferenceModel(self.model, self.tokenizer, "auto", None, model))
        for name, path in adapters:
            if name == model:
                raise LorakitError(f"--adapter {name}=...: the name is the base model's id; choose another")
            self._register(self.bank.add(name, path))
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.scheduler = Scheduler(self.model, self.tokenizer, self.bank.rows, cfg.max_batch, cfg.max_queue, metrics)

    def _add_model(self, id: str, slot: int, parent: str | None, root: str, im: InferenceModel) -> ServedModel:
        served = ServedModel(id, slot, parent, root, int(time.time()), im, frozenset(stop_token_ids(im)))
        self.models[id] = served
        return served

    def _register(self, adapter: ServedAdapter) -> ServedModel:
        im = InferenceModel(self.model, self.tokenizer, adapter.template, adapter.system_prompt, self.base_id,
                            str(adapter.path))
        return self._add_model(adapter.name, adapter.slot, self.base_id, str(adapter.path), im)

    def chat_ids(self, served: ServedModel, messages: list[dict[str, str]]) -> list[int]:
        """The prompt `lorakit generate` would give this model for `messages`."""
        text = prompt_text(messages, served.im)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -------------------------------------------------------------- runtime adapters (vLLM's routes)

    def load_adapter(self, name: str, path: str) -> ServedModel:
        """Read an adapter under cfg.adapter_root (safetensors only) and serve it as `name`."""
        from lorakit.adapters.state import read_adapter_meta

        if not self.cfg.adapter_root:
            raise LorakitError("runtime adapters need an adapter root (--adapter-root)")
        root = Path(self.cfg.adapter_root).resolve()
        where = Path(path).resolve()
        if not where.is_relative_to(root):
            raise PermissionError(f"lora_path {path} is outside the adapter root; only adapters under the "
                                  "server's --adapter-root can be loaded")
        if not name or name in self.models:
            raise LorakitError(f"lora_name {name!r} is empty or already served; pick another name")
        if repr(_quant_spec(read_adapter_meta(where))) != repr(self.quant):
            raise LorakitError(f"adapter {where} was trained on a differently quantized base than the served one")
        adapter, factors = self.bank.read(name, where)
        with self.scheduler.model_lock:
            if name in self.models:
                raise LorakitError(f"lora_name {name!r} is already served; pick another name")
            return self._register(self.bank.install(adapter, factors))

    def unload_adapter(self, name: str) -> None:
        served = self.models.get(name)
        if served is None or served.slot < 0:
            raise UnknownAdapter(f"no adapter named {name!r} is served")
        with self.scheduler.model_lock:
            busy = self.scheduler.in_use(served.slot)
            if busy:
                raise AdapterBusy(f"adapter {name} has {busy} request(s) in flight; unload it when they are done")
            self.bank.remove(name)
            del self.models[name]


def _check_cache(model: Any, name: str) -> None:
    """The scheduler joins and cuts KV caches along the batch and sequence: plain full-attention layers only."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = getattr(DynamicCache(config=model.config), "layers", [])
    if any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise LorakitError(f"{name}: its KV cache has {', '.join(kinds)} layers (sliding window or recurrent); "
                           "lorakit serve batches models with full attention only")
