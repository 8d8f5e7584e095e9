"""Load a base model and its tokenizer from any ModelSource.

GGUF files are dequantized by transformers' GGUF loader, which takes ~20 s for a 135M
model and leaves a model that cannot `save_pretrained`. We convert each GGUF once into a
plain safetensors model directory in the cache (~0.3 s to load afterwards), keyed by the
file's path, size and mtime, and load from there. The conversion is atomic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.dtypes import DTYPES
from lorakit.errors import LorakitError
from lorakit.io import atomic_dir
from lorakit.models.resolve import ModelSource, resolve_model

CACHE_VERSION = 1


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: ModelSource
    quantization: dict[str, Any] | None = None  # what load_model quantized, for adapter metadata
    revision: str | None = None  # the hub commit loaded (None for local models), recorded by train


def quant_spec(qcfg: Any, device: torch.device | str = "cpu") -> Any:
    """The `quantization:` config section as a QuantSpec (None when method is none)."""
    from lorakit.models.quantized import QuantSpec

    if qcfg is None or qcfg.method == "none":
        return None
    compute = qcfg.compute_dtype
    if compute == "auto":
        compute_dtype = resolve_dtype("auto", device)
        if torch.device(device).type == "cpu" and cpu_bf16_supported():
            compute_dtype = torch.bfloat16
    else:
        compute_dtype = DTYPES[compute]
    return QuantSpec(qcfg.method, qcfg.blocksize, qcfg.double_quant, compute_dtype)


def cpu_bf16_supported() -> bool:
    """Whether this CPU has bf16 units oneDNN uses (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cache_root() -> Path:
    env = os.environ.get("LORAKIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lorakit"


def resolve_dtype(dtype: str, device: torch.device | str = "cpu") -> torch.dtype:
    """"auto" is bf16 on a CUDA device that supports it, fp32 elsewhere."""
    if dtype == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise LorakitError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick DNS + TCP check, so an offline machine fails in seconds, not after retries."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]
"""What a hub snapshot downloads: configs, safetensors weights, tokenizer files (and remote code,
used only with trust_remote_code). Never `*.bin` / `*.pt` pickles."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable()


def hub_snapshot(source: ModelSource, revision: str | None = None, cache_only: bool = False,
                 patterns: list[str] = HUB_FILES) -> Path:
    """The local snapshot folder of a hub model at `revision` (its name is the commit).

    Downloaded with huggingface_hub (safetensors and configs only) unless `cache_only`, the hub is
    unreachable or HF_HUB_OFFLINE=1: then only what the local cache holds is used.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    revision = revision or source.revision
    local = cache_only or hub_offline()
    try:
        return Path(snapshot_download(source.path, revision=revision, allow_patterns=patterns,
                                      local_files_only=local))
    except LocalEntryNotFoundError:
        at = f" at {revision}" if revision else ""
        if cache_only:
            raise LorakitError(
                f"the base model {source.path}{at} recorded in the adapter is not in the local Hugging Face cache, "
                f"and lorakit does not download what an adapter names; pass --model hf://{source.path}"
                f"{'@' + revision if revision else ''} to download it, or --model DIR"
            ) from None
        raise LorakitError(f"cannot load {source.name} from the Hugging Face hub: it is not in the local cache{at} "
                           "and the hub is unreachable from this machine; give a local directory, a .gguf file "
                           "or the builtin alias smollm2-135m-instruct") from None
    except (HFValidationError, OSError, ValueError) as err:  # unknown repo or revision, HTTP errors
        raise LorakitError(f"cannot load {source.name} from the Hugging Face hub ({_first_line(err)}); "
                           "check the id and revision") from None


def model_directory(source: ModelSource, revision: str | None = None, cache_only: bool = False,
                    config_only: bool = False) -> str:
    """A local directory transformers can load with plain from_pretrained."""
    if source.is_gguf:
        return str(gguf_cache_dir(Path(source.path)))
    if source.kind == "hub":
        return str(hub_snapshot(source, revision, cache_only, ["*.json", "*.py"] if config_only else HUB_FILES))
    return source.path


def require_safetensors(directory: str, name: str) -> None:
    """A model folder must hold safetensors weights: lorakit never unpickles a checkpoint."""
    folder = Path(directory)
    if any(folder.glob("*.safetensors")) or not folder.is_dir():
        return
    pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in folder.glob(ext))
    if pickles:
        raise LorakitError(f"{name} has only pickled weights ({pickles[0]}); lorakit loads safetensors only, since "
                           "unpickling can run code: re-save the model with save_pretrained(..., "
                           "safe_serialization=True), or use a release that ships model.safetensors")


def commit_of(directory: str, source: ModelSource) -> str | None:
    """The hub commit a snapshot folder holds (its name), None for local models."""
    return Path(directory).name if source.kind == "hub" else None


def gguf_cache_dir(gguf_path: Path) -> Path:
    """The converted model directory for a GGUF file, built on first use."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{CACHE_VERSION}|{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    target = cache_root() / "models" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # One converter at a time (torchrun ranks, parallel runs): the others wait, then find it done.
        with _file_lock(target.parent / f".{target.name}.lock"):
            if not (target / "config.json").exists():
                with atomic_dir(target, overwrite=True) as tmp:
                    _convert_gguf(gguf_path, tmp)
    except OSError as err:
        raise LorakitError(
            f"cannot write the converted model to {target} ({err.strerror or err}); "
            "set LORAKIT_CACHE to a writable directory"
        ) from err
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) held for the block; released if the process dies."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sys

    folder, name = str(gguf_path.parent), gguf_path.name
    sys.stderr.write(f"converting {gguf_path.name} to a safetensors model in the cache (once; later loads take a second)\n")
    try:
        with _quiet_transformers():
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        raise LorakitError(f"cannot load GGUF file {gguf_path}: {_first_line(err)}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now
    # A GGUF-loaded model refuses save_pretrained; a fresh model from the config does not.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "lorakit_source.json").write_text(json.dumps({"gguf": str(gguf_path)}) + "\n")


def load_model(
    name: str,
    dtype: str = "auto",
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
    with_tokenizer: bool = True,
    quantization: Any = None,
    cache_only: bool = False,
) -> LoadedModel:
    """Load base model (+ tokenizer) in eval mode on `device`.

    `quantization` (a QuantSpec, see quant_spec) stores every linear layer but the output
    head as NF4 / int8, quantized tensor by tensor while loading (models.quantized).
    A hub model is taken at `revision` (or the one `hf://...@rev` names); `cache_only` (a base
    model named by an adapter, not by the user) never downloads. Weights load from safetensors only.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model(name)
    where = model_directory(source, revision, cache_only)
    require_safetensors(where, source.name)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    quant_meta = None
    try:
        with _quiet_transformers():
            if quantization is None:
                model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
            else:
                from lorakit.models.quantized import load_quantized

                extra = {k: v for k, v in kwargs.items() if k not in ("dtype", "trust_remote_code")}
                q = load_quantized(where, quantization, torch_dtype, device, trust_remote_code, extra)
                model = q.model
                if q.quantized_layers == 0:
                    raise LorakitError(
                        f"quantization.method {quantization.method}: {source.name} has no linear layers besides the "
                        "output head to quantize; set quantization.method: none"
                    )
                quant_meta = {
                    "method": quantization.method, "blocksize": quantization.blocksize,
                    "double_quant": quantization.double_quant,
                    "compute_dtype": str(quantization.compute_dtype).removeprefix("torch."),
                    "quantized_layers": q.quantized_layers, "streamed": q.streamed,
                }
    except LorakitError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers raises many types; all mean "can't load"
        raise _load_error(source, err) from None
    model.to(device)
    model.eval()
    tokenizer = _tokenizer_from(where, source, trust_remote_code) if with_tokenizer else None
    return LoadedModel(model, tokenizer, source, quant_meta, commit_of(where, source))


def load_tokenizer(source: ModelSource | str, trust_remote_code: bool = False, revision: str | None = None,
                   cache_only: bool = False) -> Any:
    if isinstance(source, str):
        source = resolve_model(source)
    return _tokenizer_from(model_directory(source, revision, cache_only), source, trust_remote_code)


def _tokenizer_from(where: str, source: ModelSource, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise LorakitError(f"cannot load the tokenizer of {source.name}: {_first_line(err)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked out by lorakit
    return tokenizer


def load_config(name: str, trust_remote_code: bool = False, revision: str | None = None) -> tuple[Any, ModelSource]:
    """The model's transformers config without loading weights."""
    from transformers import AutoConfig

    source = resolve_model(name)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(model_directory(source, revision, config_only=True), trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise _load_error(source, err) from None
    return config, source


def _load_error(source: ModelSource, err: Exception) -> LorakitError:
    text = str(err)
    if "trust_remote_code" in text:
        return LorakitError(
            f"model {source.name} needs its own Python code to load; if you trust it, set "
            "model.trust_remote_code: true (or pass --trust-remote-code)"
        )
    if source.kind == "hub":
        offline = "" if hub_reachable() else "the hub is unreachable from this machine and it is not in the local cache"
        return LorakitError(
            f"cannot load {source.name} from the Hugging Face hub ({offline or _first_line(err)}); "
            "check the id and your internet connection, or give a local directory, a .gguf file "
            "or the builtin alias smollm2-135m-instruct"
        )
    return LorakitError(f"cannot load model {source.name}: {_first_line(err)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class _quiet_transformers:
    """Silence transformers' progress bars and advisory warnings while loading."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.simplefilter("ignore")
        logging.getLogger("accelerate").setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        self._warn.__exit__(*exc)
        hf_logging.set_verbosity(self._level)
        hf_logging.enable_progress_bar()
