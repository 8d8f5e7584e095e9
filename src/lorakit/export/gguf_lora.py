"""A LoRA adapter as llama.cpp's LoRA GGUF (what llama.cpp's convert_lora_to_gguf.py writes).

`llama-cli --lora F` / `llama-server --lora F` apply it on top of the base model's GGUF. The file holds
`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per adapted weight
`<gguf name>.lora_a` (A: r x in) and `.lora_b` (B: out x r). llama.cpp scales B A x by alpha / r with
one alpha for the whole file, so a layer whose own scaling differs (alpha_pattern, rsLoRA, rank
patterns) has the ratio folded into its B. Llama's q/k rows are permuted as in the base export, so
only B's rows move. No base weights are read: the base model's config is enough.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError
from lorakit.io import publish_file, temp_file

LORA_TYPES = ("f16", "bf16", "f32")


@dataclass
class LoRAGGUFResult:
    path: Path
    arch: str
    tensor_type: str
    layers: int
    rank: int
    alpha: float
    bytes: int
    llamacpp_same: int | None = None  # with --verify llamacpp: greedy answers equal to lorakit's
    llamacpp_asked: int | None = None


def _tensor(w: torch.Tensor, kind: str, name: str) -> tuple[Any, Any]:
    import gguf
    import numpy as np

    arr = w.detach().float().cpu().numpy()
    if not np.isfinite(arr).all():
        raise LorakitError(f"GGUF export: adapter tensor {name} holds NaN/inf values; nothing was written")
    if kind == "bf16":
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if kind == "f16":
        if float(np.abs(arr).max()) > 65504:
            raise LorakitError(f"GGUF export: adapter tensor {name} exceeds f16's range; use --type bf16")
        return arr.astype(np.float16), None
    return arr, None


def check_lora_dir(adapter: Path) -> None:
    if not (adapter / "adapter_config.json").is_file():
        hint = (f"it holds a full model (config.json): export it whole with --model {adapter} and without --adapter-only"
                if (adapter / "config.json").is_file() else "give the directory a LoRA training run wrote (run/adapter)")
        raise LorakitError(f"--adapter-only needs a LoRA adapter directory (adapter_config.json); {adapter} has none; {hint}")
    from lorakit.export.merge import AdapterRef, read_adapter

    read_adapter(AdapterRef(adapter))  # a prompt-tuning adapter is refused here, with its reason


def write_lora_gguf(adapter: Path, config: Any, out: Path, kind: str = "f16", name: str | None = None,
                    check: Callable[[LoRAGGUFResult], Any] | None = None) -> LoRAGGUFResult:
    """Write the adapter at `adapter` for the base model described by `config` (a transformers config);
    `check` runs on the finished temporary file before it is renamed to `out`."""
    import gguf

    from lorakit.export.gguf import PERMUTE_QK, permute_qk, check_exportable, gguf_tensor_name
    from lorakit.export.merge import AdapterRef, adapter_factors, read_adapter

    if kind not in LORA_TYPES:
        raise LorakitError(f"--adapter-only writes the LoRA tensors as {', '.join(LORA_TYPES)}, not {kind!r}; "
                           "quantize the base model's GGUF instead (the adapter stays small either way)")
    check_lora_dir(adapter)
    arch = check_exportable(type("M", (), {"config": config})())
    factors = adapter_factors(read_adapter(AdapterRef(adapter)))
    if not factors:
        raise LorakitError(f"{adapter} holds no LoRA weights")
    if any(f.magnitude is not None for f in factors):
        raise LorakitError(f"{adapter} is a DoRA adapter; llama.cpp's LoRA GGUF has no magnitude vector, so "
                           "--adapter-only cannot write it: export the merged model (lorakit export gguf --adapter "
                           "DIR, without --adapter-only)")
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    gguf_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    names = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
    rank = int(factors[0].A.shape[0])
    alpha = float(factors[0].scaling) * rank  # llama.cpp: scale = alpha / r
    tmp = temp_file(out, suffix=".tmp.gguf")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name or out.stem)
        for f in factors:
            a, b = f.A, f.B * (f.scaling * f.A.shape[0] / alpha)  # (r, in), (out, r); the ratio is 1 unless patterns differ
            module = f.module.rsplit(".", 1)[-1]
            if arch in PERMUTE_QK and module in ("q_proj", "k_proj"):
                b = permute_qk(b, n_head if module == "q_proj" else n_kv)
            base = gguf_tensor_name(names, f"{f.module}.weight")
            for suffix, w in ((".lora_a", a), (".lora_b", b)):
                data, raw = _tensor(w, kind, f"{f.module}{suffix}")
                writer.add_tensor(base + suffix, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        result = LoRAGGUFResult(tmp, arch, kind, len(factors), rank, alpha, tmp.stat().st_size)
        if check is not None:
            check(result)
        publish_file(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    result.path = out
    return result
