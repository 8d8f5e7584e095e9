"""GGUF export (llama.cpp's format) for Llama-family models, written with the `gguf` package.

What llama.cpp's own convert_hf_to_gguf.py does for these architectures, for the subset
lorakit fine-tunes: HF tensor names mapped with gguf's TensorNameMap, Llama's q/k weights
permuted from HF's rotate-half layout to GGML's interleaved one, norms kept in F32, the
rest stored as F16, BF16, Q8_0 or Q4_0 (gguf.quants, blocks of 32 along a row; a tensor whose
rows do not split into whole blocks stays F16). The k-quants (q4_k_m, q5_k_m, q6_k), which the
gguf package cannot write, are made by llama.cpp's llama-quantize from an f16 file. The
tokenizer (gguf_vocab.py: llama.cpp's pre-tokenizer name) and the chat template are embedded,
so the file runs on its own.

The file is verified before it replaces anything (gguf_verify.py): by transformers' GGUF loader
(logits compared with the model it came from) or by llama.cpp itself (greedy answers compared).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.export import llamacpp
from lorakit.export.gguf_vocab import add_vocab, vocab_fields
from lorakit.io import atomic_write_text, publish_file, temp_file

# HF model_type -> GGUF architecture. llama.cpp reads Mistral checkpoints as "llama".
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
PERMUTE_QK = {"llama"}  # architectures whose q/k rows llama.cpp interleaves
GGUF_PY_TYPES = ("f16", "bf16", "q8_0", "q4_0")  # written by the gguf package
LLAMA_QUANTIZE = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}  # written by llama-quantize
TYPES = GGUF_PY_TYPES + tuple(LLAMA_QUANTIZE)
FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


@dataclass
class GGUFResult:
    path: Path
    arch: str
    tensor_type: str
    tensors: int
    bytes: int
    quantize_s: float | None = None  # llama-quantize's time, for the k-quants
    max_abs_diff: float | None = None
    max_abs_logit: float | None = None
    top1_agreement: float | None = None
    llamacpp_same: int | None = None  # greedy answers llama.cpp gave identical to lorakit's
    llamacpp_asked: int | None = None


def check_type(kind: str) -> None:
    if kind not in TYPES:
        raise LorakitError(f"--type {kind!r} is not supported; use one of {', '.join(TYPES)}")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> GGML interleaved rows (llama.cpp's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_exportable(model: nn.Module) -> str:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in ARCHS:
        raise LorakitError(f"GGUF export supports {', '.join(sorted(ARCHS))} models; this one is {model_type}. "
                           "Export a Hugging Face directory with `lorakit merge` instead")
    return ARCHS[model_type]


def _tensor_data(w: torch.Tensor, kind: str, name: str = "?") -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) for one tensor in the requested storage; q8_0 / q4_0 rows that are
    not whole 32-blocks are stored f16. Non-finite values, and f16 overflow to inf, are errors naming `name`."""
    import gguf

    arr = w.detach().float().cpu().numpy()
    if not np.isfinite(arr).all():
        raise LorakitError(f"GGUF export: tensor {name} holds NaN/inf values; the model is broken, nothing was written")
    if arr.ndim < 2:
        return arr.astype(np.float32), None  # norms and biases stay F32, as llama.cpp keeps them
    if kind == "f16" or kind != "bf16" and arr.shape[-1] % 32:
        with np.errstate(over="ignore"):  # overflow is checked just below
            half = arr.astype(np.float16)
        if not np.isfinite(half).all():
            raise LorakitError(f"GGUF export: tensor {name} has values beyond f16's range (largest "
                               f"|w| {float(np.abs(arr).max()):.4g} > 65504); use --type bf16")
        return half, None
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    assert kind == "bf16" or arr.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0  # else stored f16 above
    if kind != "bf16" and float(np.abs(arr).max()) / (127 if kind == "q8_0" else 8) > 65504:  # f16 block scales
        raise LorakitError(f"GGUF export: tensor {name} is too large for {kind}'s f16 block scales; use --type bf16")
    return gguf.quants.quantize(arr, qtype), qtype


def _add_hparams(writer: Any, cfg: Any, arch: str, name: str, vocab_size: int, kind: str) -> None:
    """The model's shape keys (what llama.cpp reads to build the graph)."""
    import gguf

    n_head = cfg.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or n_head))
    writer.add_rope_dimension_count(int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head))
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or
                                    (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))


def gguf_tensor_name(names: Any, hf_name: str) -> str:
    new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new_name is None:
        raise LorakitError(f"GGUF export: no GGUF name for tensor {hf_name}; this model variant is not supported")
    return new_name


def _add_tensors(writer: Any, model: nn.Module, arch: str, kind: str) -> int:
    """Every weight under its GGUF name (q/k rows permuted for Llama); returns the count."""
    import gguf

    cfg = model.config
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    gguf_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    names = gguf.get_tensor_name_map(gguf_arch, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    count = 0
    for hf_name, w in model.state_dict().items():
        if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
            continue  # llama.cpp reuses token_embd for a tied head
        if arch in PERMUTE_QK and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute_qk(w, n_head if hf_name.endswith("q_proj.weight") else n_kv)
        data, raw = _tensor_data(w, kind, hf_name)
        writer.add_tensor(gguf_tensor_name(names, hf_name), data, raw_dtype=raw)
        count += 1
    return count


def _write_file(model: nn.Module, tokenizer: Any, path: Path, kind: str, name: str, pre: str | None) -> int:
    """One GGUF file at `path` in a type the gguf package writes itself; returns the tensor count."""
    import gguf

    arch = check_exportable(model)
    vocab = vocab_fields(tokenizer, model.config.vocab_size, pre)
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        _add_hparams(writer, model.config, arch, name, len(vocab.tokens), kind)
        add_vocab(writer, tokenizer, vocab)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        count = _add_tensors(writer, model, arch, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return count


def write_gguf(model: nn.Module, tokenizer: Any, out: Path, kind: str = "f16", name: str | None = None,
               check: Callable[[GGUFResult], Any] | None = None, pre: str | None = None) -> GGUFResult:
    """Write `model` (plain, full precision) and its tokenizer to `out` atomically.

    The file is written under a unique temporary name, `check` (verification) runs on it there,
    and only then is it renamed over `out`: a failed export leaves an existing `out` as it was.
    k-quants are written as f16 first and quantized by llama.cpp's llama-quantize.
    """
    check_type(kind)
    arch = check_exportable(model)
    tmp = temp_file(out, suffix=".tmp.gguf")
    f16 = temp_file(out, suffix=".f16.tmp.gguf") if kind in LLAMA_QUANTIZE else None
    try:
        count = _write_file(model, tokenizer, f16 or tmp, "f16" if f16 else kind, name or out.stem, pre)
        seconds = llamacpp.quantize(f16, tmp, LLAMA_QUANTIZE[kind]) if f16 else None
        result = GGUFResult(tmp, arch, kind, count, tmp.stat().st_size, quantize_s=seconds)
        if check is not None:
            check(result)
        publish_file(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if f16 is not None:
            f16.unlink(missing_ok=True)
    result.path = out
    return result


def _check_out(path: Path, force: bool, what: str = "--out") -> None:
    if path.is_dir():
        raise LorakitError(f"{path} is a folder; {what} must name a file, not a folder")
    if path.exists() and not force:
        raise LorakitError(f"{path} already exists; choose another {what}, or pass --force to replace it")


def _inference_model(model: nn.Module, tokenizer: Any, meta: Any) -> Any:
    """What lorakit generates with: the adapter's template and system prompt (its AdapterMeta; None: defaults)."""
    from lorakit.eval.generate import InferenceModel

    return InferenceModel(model, tokenizer, getattr(meta, "template", None) or "auto", getattr(meta, "system_prompt", None))


def _load_merged(base: Any, ref: Any, trust_remote_code: bool) -> tuple[nn.Module, Any]:
    """The base (a BaseChoice) in fp32 (a QLoRA base dequantized) with the adapter, if any, merged in fp32."""
    from lorakit.export.merge import dequantize_all, merge_into
    from lorakit.models.load import load_model

    spec = ref.meta.quant_spec(torch.float32) if ref is not None else None  # the training base, in fp32
    loaded = load_model(base.name, "fp32", trust_remote_code=trust_remote_code, revision=base.revision,
                        quantization=spec, cache_only=base.cache_only)
    check_exportable(loaded.model)
    if spec is not None:
        dequantize_all(loaded.model)
    if ref is not None:
        merge_into(loaded.model, [ref])  # LoRA / DoRA factors, IA3 vectors or selective tensors
    return loaded.model, loaded.tokenizer


def export_gguf(model_name: str | None, out: str | Path, adapter: str | Path | None = None, kind: str = "f16",
                verify: bool | str = True, force: bool = False, trust_remote_code: bool = False,
                adapter_only: bool = False, pre: str | None = None, modelfile: bool = True) -> Any:
    """`lorakit export gguf`: base (+ adapter merged in fp32) -> one GGUF file (+ an Ollama Modelfile);
    with `adapter_only`, the adapter alone as llama.cpp's LoRA GGUF."""
    from lorakit.export.gguf_verify import check_mode
    from lorakit.export.merge import AdapterRef, read_adapter

    out = Path(out)
    mode = ("transformers" if verify else "none") if isinstance(verify, bool) else verify
    check_mode(mode)
    if out.suffix != ".gguf":
        raise LorakitError(f"--out {out} should end in .gguf")
    _check_out(out, force)
    if not out.parent.exists():
        raise LorakitError(f"the directory {out.parent} does not exist; create it first")
    if adapter_only:
        return _export_adapter(model_name, out, adapter, kind, mode, trust_remote_code)
    check_type(kind)
    if kind in LLAMA_QUANTIZE:
        llamacpp.find_tool("llama-quantize")
    card = out.with_suffix(".Modelfile")
    if modelfile:
        _check_out(card, force, "--out (its Modelfile is written beside it)")
    ref = read_adapter(AdapterRef(Path(adapter))) if adapter is not None else None
    base = _base(model_name, adapter)
    model_name = base.name
    model, tokenizer = _load_merged(base, ref, trust_remote_code)
    im = _inference_model(model, tokenizer, ref.meta if ref else None)
    text = _modelfile(out, tokenizer, im, model) if modelfile else None  # refused before anything is written
    result = write_gguf(model, tokenizer, out, kind, name=Path(str(model_name)).name, check=_checker(mode, im), pre=pre)
    if text is not None:
        atomic_write_text(card, text)
    return result


def _base(model_name: str | None, adapter: str | Path | None) -> Any:
    """The base to export on: --model, or the one the adapter records (at its commit, from the cache only)."""
    from lorakit.adapters.state import BaseChoice, base_model_of

    base = base_model_of([Path(adapter)], model_name) if adapter is not None else (
        BaseChoice(model_name) if model_name else None)
    if base is None:
        raise LorakitError("give --model (the adapter does not record its base model)")
    return base


def _modelfile(out: Path, tokenizer: Any, im: Any, model: nn.Module) -> str:
    from lorakit.export.modelfile import modelfile_text

    return modelfile_text(out.name, tokenizer, im.template, im.system_prompt,
                          min(4096, int(getattr(model.config, "max_position_embeddings", 2048))))


def _checker(mode: str, im: Any) -> Callable[[GGUFResult], Any] | None:
    from lorakit.export.gguf_verify import verify_llamacpp, verify_transformers
    from lorakit.export.merge import probe_batch

    if mode == "transformers":
        ids = probe_batch(im.model, im.tokenizer)
        return lambda result: verify_transformers(result, im.model, ids)
    if mode == "llamacpp":
        return lambda result: verify_llamacpp(result, im)
    return None


def _refuse_non_lora(adapter: Path) -> None:
    """--adapter-only writes llama.cpp's LoRA GGUF: an IA3, prompt-tuning or selective result has no A/B to put there."""
    from lorakit.adapters.methods import adapter_kind
    from lorakit.adapters.selective import is_selective_dir

    if not ((adapter / "adapter_config.json").is_file() or is_selective_dir(adapter)):
        return  # check_lora_dir says what the directory lacks
    kind = adapter_kind(adapter)
    if kind == "prompt_tuning":
        from lorakit.export.merge import AdapterRef, read_adapter

        read_adapter(AdapterRef(adapter))  # refuses it with merge's reason (virtual tokens are no weight change)
    if kind != "lora":
        raise LorakitError(f"{adapter} is {'an IA3 adapter' if kind == 'ia3' else 'a selective fine-tune'}; llama.cpp's "
                           "LoRA GGUF holds LoRA A/B matrices only, so --adapter-only cannot write it: export the merged "
                           "model (lorakit export gguf --adapter DIR, without --adapter-only)")


def _export_adapter(model_name: str | None, out: Path, adapter: str | Path | None, kind: str, mode: str,
                    trust_remote_code: bool) -> Any:
    """--adapter-only: the LoRA GGUF; `--verify llamacpp` applies it to a temporary f16 base GGUF."""
    from lorakit.adapters.state import read_adapter_meta
    from lorakit.export.gguf_lora import LORA_TYPES, check_lora_dir, write_lora_gguf
    from lorakit.models.load import load_config

    if adapter is None:
        raise LorakitError("--adapter-only needs --adapter DIR (the LoRA adapter to write)")
    adapter = Path(adapter)
    _refuse_non_lora(adapter)
    check_lora_dir(adapter)
    if kind not in LORA_TYPES:
        raise LorakitError(f"--adapter-only writes the LoRA tensors as {', '.join(LORA_TYPES)}, not {kind!r}; "
                           "quantize the base model's GGUF instead (the adapter stays small either way)")
    base = _base(model_name, adapter)
    if mode != "llamacpp":
        config, _ = load_config(base.name, trust_remote_code, base.revision)
        return write_lora_gguf(adapter, config, out, kind)
    from lorakit.export.gguf_verify import compare_answers, verify_prompts
    from lorakit.export.merge import AdapterRef, read_adapter

    model, tokenizer = _load_merged(base, None, trust_remote_code)
    base_file = temp_file(out, suffix=".base.tmp.gguf")
    try:
        _write_file(model, tokenizer, base_file, "f16", "base", None)
        from lorakit.export.merge import adapter_factors, merge_factors

        merge_factors(model, adapter_factors(read_adapter(AdapterRef(adapter))))
        im = _inference_model(model, tokenizer, read_adapter_meta(adapter))

        def check(result: Any) -> None:
            answers = compare_answers(im, verify_prompts(), base_file, lora=result.path)
            result.llamacpp_same, result.llamacpp_asked = answers.same, answers.asked
            if answers.same < 0.75 * answers.asked:
                prompt, mine, got = answers.first_difference or ("", "", "")
                raise LorakitError(f"verification against llama.cpp failed: with the LoRA GGUF on the base, {answers.same} "
                                   f"of {answers.asked} greedy answers equal lorakit's; first difference on {prompt!r}: "
                                   f"lorakit {mine[:60]!r}, llama.cpp {got[:60]!r}; nothing was written")

        return write_lora_gguf(adapter, model.config, out, kind, check=check)
    finally:
        base_file.unlink(missing_ok=True)
