"""Load a model with its linear layers quantized (NF4 / int8), one tensor at a time.

Loading the full-precision model and quantizing afterwards peaks at the full-precision
size, which is what QLoRA exists to avoid. Here the model skeleton is built with its
parameters on the meta device (buffers such as rotary tables are real), every linear
layer but the output head is swapped for an empty NF4Linear / Int8Linear, and the
checkpoint is streamed tensor by tensor: a linear weight is quantized the moment it is
read and its full-precision copy dropped; everything else is cast to the model dtype and
assigned. Peak memory is the quantized model plus one tensor.

The safetensors files are read with plain `readinto` instead of `safetensors.safe_open`:
safe_open memory-maps the file and every page it touches counts toward the process's
resident memory until the mapping closes, so a streamed load through it still peaks at
the file size in RSS. The format is a length-prefixed JSON header followed by raw
little-endian tensors, which takes 40 lines to read correctly.

When the checkpoint's names do not line up with the model's parameters (an architecture
that renames weights while loading, a hub id, a `.bin` checkpoint), we fall back to
transformers' own loading followed by `quantize_model_linears`, which is correct but
peaks at the full-precision size; `QuantizedLoad.streamed` says which path ran.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant.linear import Int8Linear, NF4Linear, QuantizedLinear, is_conv1d, quantize_model_linears

_CHUNK_BYTES = 16 << 20
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class QuantSpec:
    """What to quantize and how (the `quantization:` config section, resolved to torch types)."""

    method: str  # nf4 | fp4 | int8
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype | None = torch.bfloat16


@dataclass
class QuantizedLoad:
    model: nn.Module
    streamed: bool  # True: layer by layer from safetensors; False: full load, then quantized
    quantized_layers: int


# ----------------------------------------------------------------------------- safetensors


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def safetensors_files(directory: Path) -> list[Path] | None:
    """The checkpoint's safetensors files (sharded or not), or None when it has none."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError, AttributeError) as err:
            raise LorakitError(f"{index} is not a valid safetensors index ({type(err).__name__}); "
                               "re-download or re-save the model") from err
        names = set(weight_map.values()) if isinstance(weight_map, dict) else {None}
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in (".", "..")]
        if bad:
            raise LorakitError(f"{index}: weight_map names {bad[0]!r}, not a file in {directory}; the index is damaged")
        return [directory / name for name in sorted(names)]
    single = directory / "model.safetensors"
    return [single] if single.exists() else None


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(tensor entries, byte offset where the data starts), every entry checked against the file size."""
    damaged = f"{path} is not a valid safetensors file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise LorakitError(f"{damaged} (too short); re-download or re-save the model")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise LorakitError(f"{damaged} (header of {n} bytes in a file of {size}); re-download or re-save the model")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise LorakitError(f"{damaged} (header is not JSON: {err}); re-download or re-save the model") from err
    if not isinstance(header, dict):
        raise LorakitError(f"{damaged} (header is not a JSON object); re-download or re-save the model")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for name, entry in header.items():
        problem = _entry_problem(entry, data_bytes)
        if problem:
            raise LorakitError(f"{damaged}: tensor {name!r} {problem}; re-download or re-save the model")
    return header, 8 + n


def _entry_problem(entry: Any, data_bytes: int) -> str | None:
    """Why a header entry cannot be read from a data section of `data_bytes`, or None."""
    if not isinstance(entry, dict):
        return "has no entry object"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"has shape {shape!r}"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        return f"has data_offsets {offsets!r} outside the {data_bytes} data bytes"
    dtype = _ST_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is not None:
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * dtype.itemsize:
            return f"has {offsets[1] - offsets[0]} bytes for shape {shape} of {entry['dtype']}"
    return None


def iter_tensors(
    path: Path, cast: dict[str, torch.dtype] | None = None, transient: set[str] | frozenset[str] = frozenset()
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in file order, each read straight into fresh memory (no mmap).

    A tensor named in `cast` is converted to that dtype 16 MiB at a time through one reused
    buffer, so a large fp32 embedding becomes bf16 without ever holding both copies whole.
    A tensor named in `transient` is read into one buffer shared by all of them and is valid
    only until the next iteration: the quantizing loader drops each full-precision weight
    right away, and reusing one buffer keeps the allocator from leaving a hole per layer.
    """
    header, start = read_header(path)
    cast = cast or {}
    staging: torch.Tensor | None = None
    shared = torch.empty(0, dtype=torch.uint8)
    with open(path, "rb") as f:
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _ST_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise LorakitError(f"{path}: tensor {name} has dtype {entry['dtype']}, which lorakit cannot load")
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            target = cast.get(name, dtype)
            if name in transient and target == dtype:
                nbytes = end - begin
                if shared.numel() < nbytes:
                    shared = torch.empty(0, dtype=torch.uint8)  # drop the old one first
                    shared = torch.empty(nbytes, dtype=torch.uint8)
                _read_into(f, shared[:nbytes], path, name)
                yield name, shared[:nbytes].view(dtype).reshape(entry["shape"])
                continue
            out = torch.empty(entry["shape"], dtype=target)
            if target == dtype:
                _read_into(f, out.view(-1).view(torch.uint8), path, name)
            else:
                if staging is None:
                    staging = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
                flat, step = out.view(-1), _CHUNK_BYTES // dtype.itemsize
                for lo in range(0, flat.numel(), step):
                    hi = min(flat.numel(), lo + step)
                    chunk = staging[: (hi - lo) * dtype.itemsize]
                    _read_into(f, chunk, path, name)
                    flat[lo:hi] = chunk.view(dtype)  # converts to the target dtype
            yield name, out


def _read_into(f: Any, dest: torch.Tensor, path: Path, name: str) -> None:
    """Fill the contiguous uint8 tensor `dest` from the file's current position."""
    view, got, nbytes = memoryview(dest.numpy()), 0, dest.numel()
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise LorakitError(f"{path} is truncated (tensor {name}); re-download or re-save the model")
        got += n


# ----------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device and buffers for real (rotary tables need values)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _empty_quantized(linear: nn.Module, spec: QuantSpec) -> nn.Module:
    """An empty NF4Linear / Int8Linear on meta; its buffers arrive with the weight."""
    bias = linear.bias is not None
    if isinstance(linear, nn.Linear):
        in_f, out_f = linear.in_features, linear.out_features
    else:
        in_f, out_f = linear.weight.shape  # GPT-2 Conv1D stores (in, out)
    if spec.method in ("nf4", "fp4"):
        return NF4Linear(in_f, out_f, bias, spec.blocksize, spec.double_quant, spec.compute_dtype, device="meta",
                         quant_type=spec.method)
    return Int8Linear(in_f, out_f, bias, spec.compute_dtype, device="meta")


def quantizable_linears(model: nn.Module) -> list[str]:
    """Paths of the linear layers quantization replaces: all but the output head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return [name for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or is_conv1d(m)) and name and m is not head]


def load_quantized(
    directory: str,
    spec: QuantSpec,
    dtype: torch.dtype,
    device: torch.device | str,
    trust_remote_code: bool,
    load_kwargs: dict[str, Any],
) -> QuantizedLoad:
    """The model in `directory` with every linear but the head quantized; the rest in `dtype`."""
    from transformers import AutoModelForCausalLM

    from lorakit.memory import low_fragmentation

    path = Path(directory)
    files = safetensors_files(path) if path.is_dir() else None
    if files:
        with low_fragmentation():
            loaded = _load_streamed(directory, files, spec, dtype, device, trust_remote_code)
        if loaded is not None:
            return QuantizedLoad(loaded, True, _count_quantized(loaded))
    # fallback: transformers loads it in full precision, then we quantize in place
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 **load_kwargs)
    model.to(device)
    n = quantize_model_linears(model, spec.method, spec.blocksize, spec.double_quant, spec.compute_dtype)  # type: ignore[arg-type]
    return QuantizedLoad(model, False, n)


def _load_streamed(directory: str, files: list[Path], spec: QuantSpec, dtype: torch.dtype,
                   device: torch.device | str, trust_remote_code: bool) -> nn.Module | None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return _stream_into(model, files, spec, dtype, device, bool(getattr(config, "tie_word_embeddings", False)))


def _count_quantized(model: nn.Module) -> int:
    return sum(isinstance(m, QuantizedLinear) for m in model.modules())


def _stream_into(
    model: nn.Module, files: list[Path], spec: QuantSpec, dtype: torch.dtype, device: torch.device | str, tied: bool
) -> nn.Module | None:
    """Fill the meta-parameter `model` from `files`; None when the names do not match (then nothing is read)."""
    targets = set(quantizable_linears(model))
    transposed = {name for name in targets if is_conv1d(model.get_submodule(name))}
    for name in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                _empty_quantized(model.get_submodule(name), spec))
    expected = {f"{t}.weight" for t in targets}
    for key in model.state_dict(keep_vars=True):
        owner, _, leaf = key.rpartition(".")
        if owner not in targets or leaf == "bias":  # a quantized layer's own buffers come from its weight
            expected.add(key)
    present: set[str] = set()
    for file in files:
        present |= set(read_header(file)[0])
    buffers = {name for name, _ in model.named_buffers()}  # e.g. old checkpoints' rotary inv_freq
    head_tied = {k for k in expected - present if tied and _is_head(model, k)}
    if (expected - head_tied) - present or (present - expected) - buffers:
        return None  # names differ (weights renamed while loading, extra keys): let transformers load it
    # floating tensors that are not quantized are converted to the model dtype while reading
    cast = {k: dtype for k in present if k.rpartition(".")[0] not in targets or k.endswith(".bias")}
    for file in files:
        header = read_header(file)[0]
        file_cast = {k: v for k, v in cast.items() if k in header and header[k]["dtype"] in ("F32", "F16", "BF16", "F64")}
        quantized_here = {f"{t}.weight" for t in targets} & set(header)
        for key, tensor in iter_tensors(file, file_cast, quantized_here):
            owner_name, _, leaf = key.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if owner_name in targets and leaf == "weight":
                weight = tensor.to(device)
                if owner_name in transposed:
                    weight = weight.T  # Conv1D (in, out) -> (out, in)
                layer = model.get_submodule(owner_name)
                if isinstance(layer, NF4Linear):
                    from lorakit.quant.nf4 import quantize_4bit

                    layer.set_quantized_weight(quantize_4bit(weight, spec.blocksize, spec.double_quant, spec.method))
                else:
                    from lorakit.quant.int8 import quantize_int8

                    q = quantize_int8(weight)
                    layer.weight_data, layer.weight_scale = q.data, q.scale
                del weight, tensor
                continue
            value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[leaf] = value
    if tied:
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    leftover += [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise LorakitError(f"the checkpoint in {files[0].parent} has no values for {', '.join(leftover[:5])}; "
                           "it is incomplete, re-download or re-save the model")
    for module in model.modules():  # non-persistent buffers (rotary tables) were built on CPU
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != torch.device(device):
                module._buffers[name] = buf.to(device)
    model.eval()
    return model


def _is_head(model: nn.Module, key: str) -> bool:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    owner = key.rpartition(".")[0]
    try:
        return head is not None and model.get_submodule(owner) is head
    except AttributeError:
        return False
