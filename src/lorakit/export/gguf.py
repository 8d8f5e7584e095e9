"""GGUF export (llama.cpp's format) for Llama-family models, written with the `gguf` package.

What llama.cpp's own convert_hf_to_gguf.py does for these architectures, for the subset
lorakit fine-tunes: HF tensor names mapped with gguf's TensorNameMap, Llama's q/k weights
permuted from HF's rotate-half layout to GGML's interleaved one, norms kept in F32, the
rest stored as F16, BF16 or Q8_0 (gguf.quants, blocks of 32 along a row; a tensor whose rows
do not split into whole blocks stays F16). The byte-level BPE tokenizer (vocabulary, token
types, merges, special ids) and the chat template are embedded, so the file runs on its own.

The file is verified by loading it back with transformers' GGUF loader and comparing logits
with the model it came from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.io import publish_file, temp_file

# HF model_type -> GGUF architecture. llama.cpp reads Mistral checkpoints as "llama".
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
PERMUTE_QK = {"llama"}  # architectures whose q/k rows llama.cpp interleaves
TYPES = ("f16", "bf16", "q8_0")
# verification: max |logit diff| / max |logit| and least top-1 agreement, per stored type
TOLERANCE = {"f16": (0.02, 0.95), "bf16": (0.05, 0.9), "q8_0": (0.1, 0.85)}


@dataclass
class GGUFResult:
    path: Path
    arch: str
    tensor_type: str
    tensors: int
    bytes: int
    max_abs_diff: float | None = None
    max_abs_logit: float | None = None
    top1_agreement: float | None = None


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> GGML interleaved rows (llama.cpp's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_exportable(model: nn.Module) -> str:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in ARCHS:
        raise LorakitError(f"GGUF export supports {', '.join(sorted(ARCHS))} models; this one is {model_type}. "
                           "Export a Hugging Face directory with `lorakit merge` instead")
    return ARCHS[model_type]


def _tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """tokens, token types, merges and special ids of a byte-level BPE tokenizer."""
    import gguf

    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise LorakitError("GGUF export needs the model's fast tokenizer (tokenizer.json)")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise LorakitError("GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen / SmolLM style); "
                           f"this tokenizer is {model.get('type', '?')}")
    vocab = tokenizer.get_vocab()
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    special = set(tokenizer.all_special_tokens)
    for added in spec.get("added_tokens", []):
        i = added["id"]
        if i < size:
            tokens[i] = added["content"]
            types[i] = gguf.TokenType.CONTROL if added.get("special") or added["content"] in special \
                else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _tensor_data(w: torch.Tensor, kind: str, name: str = "?") -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) for one tensor in the requested storage; q8_0 rows that are not
    whole 32-blocks are stored f16. Non-finite values, and f16 overflow to inf, are errors naming `name`."""
    import gguf

    arr = w.detach().float().cpu().numpy()
    if not np.isfinite(arr).all():
        raise LorakitError(f"GGUF export: tensor {name} holds NaN/inf values; the model is broken, nothing was written")
    if arr.ndim < 2:
        return arr.astype(np.float32), None  # norms and biases stay F32, as llama.cpp keeps them
    if kind == "f16" or kind == "q8_0" and arr.shape[-1] % 32:
        with np.errstate(over="ignore"):  # overflow is checked just below
            half = arr.astype(np.float16)
        if not np.isfinite(half).all():
            raise LorakitError(f"GGUF export: tensor {name} has values beyond f16's range (largest "
                               f"|w| {float(np.abs(arr).max()):.4g} > 65504); use --type bf16")
        return half, None
    qtype = gguf.GGMLQuantizationType.BF16 if kind == "bf16" else gguf.GGMLQuantizationType.Q8_0
    assert kind == "bf16" or arr.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0  # else stored f16 above
    if kind == "q8_0" and float(np.abs(arr).max()) / 127 > 65504:  # Q8_0's per-block scale is an f16
        raise LorakitError(f"GGUF export: tensor {name} is too large for q8_0's f16 block scales; use --type bf16")
    return gguf.quants.quantize(arr, qtype), qtype


def write_gguf(model: nn.Module, tokenizer: Any, out: Path, kind: str = "f16", name: str | None = None,
               check: Callable[[GGUFResult], Any] | None = None) -> GGUFResult:
    """Write `model` (plain, full precision) and its tokenizer to `out` atomically.

    The file is written under a unique temporary name, `check` (verification) runs on it there,
    and only then is it renamed over `out`: a failed export leaves an existing `out` as it was.
    """
    import gguf

    if kind not in TYPES:
        raise LorakitError(f"--type {kind!r} is not supported; use one of {', '.join(TYPES)}")
    arch = check_exportable(model)
    cfg = model.config
    n_layers, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    gguf_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    names = gguf.get_tensor_name_map(gguf_arch, n_layers)
    fields = _tokenizer_fields(tokenizer, cfg.vocab_size)

    tmp = temp_file(out, suffix=".tmp.gguf")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name or out.stem)
        writer.add_context_length(int(cfg.max_position_embeddings))
        writer.add_embedding_length(int(cfg.hidden_size))
        writer.add_block_count(int(n_layers))
        writer.add_feed_forward_length(int(cfg.intermediate_size))
        writer.add_head_count(int(n_head))
        writer.add_head_count_kv(int(n_kv))
        writer.add_rope_dimension_count(int(head_dim))
        writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or
                                        (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        writer.add_vocab_size(len(fields["tokens"]))
        writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2" if arch == "llama" else "qwen2")
        writer.add_token_list(fields["tokens"])
        writer.add_token_types(fields["types"])
        writer.add_token_merges(fields["merges"])
        for setter, token_id in (("add_bos_token_id", tokenizer.bos_token_id), ("add_eos_token_id", tokenizer.eos_token_id),
                                 ("add_unk_token_id", tokenizer.unk_token_id), ("add_pad_token_id", tokenizer.pad_token_id)):
            if token_id is not None:
                getattr(writer, setter)(int(token_id))
        writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
        if getattr(tokenizer, "chat_template", None):
            writer.add_chat_template(tokenizer.chat_template)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        count = 0
        for hf_name, tensor in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp reuses token_embd
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise LorakitError(f"GGUF export: no GGUF name for tensor {hf_name}; this model variant is not supported")
            w = tensor
            if arch in PERMUTE_QK and hf_name.endswith("q_proj.weight"):
                w = _permute(w, n_head)
            elif arch in PERMUTE_QK and hf_name.endswith("k_proj.weight"):
                w = _permute(w, n_kv)
            data, raw = _tensor_data(w, kind, hf_name)
            writer.add_tensor(new_name, data, raw_dtype=raw)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        result = GGUFResult(tmp, arch, kind, count, tmp.stat().st_size)
        if check is not None:
            check(result)
        publish_file(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    result.path = out
    return result


@torch.no_grad()
def verify_gguf(result: GGUFResult, source: nn.Module, ids: torch.Tensor) -> GGUFResult:
    """Load the file back with transformers' GGUF loader and compare its logits with `source`."""
    import logging
    import warnings

    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        back = AutoModelForCausalLM.from_pretrained(str(result.path.parent), gguf_file=result.path.name,
                                                    dtype=torch.float32)
    back.eval()
    ref = source(input_ids=ids, use_cache=False).logits.float()
    got = back(input_ids=ids, use_cache=False).logits.float()
    result.max_abs_diff = float((ref - got).abs().max())
    result.max_abs_logit = float(ref.abs().max())
    result.top1_agreement = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    tol, agree = TOLERANCE[result.tensor_type]
    # `not x <= tol`, not `x > tol`: a NaN difference fails
    if not result.max_abs_diff <= tol * max(1.0, result.max_abs_logit) or not result.top1_agreement >= agree:
        raise LorakitError(
            f"verification failed: the GGUF model's logits differ from the source by up to {result.max_abs_diff:.4g} "
            f"(largest logit {result.max_abs_logit:.3g}; allowed {tol:g}x) and agree on the top token "
            f"{100 * result.top1_agreement:.1f}% of the time; nothing was written"
        )
    return result


def export_gguf(model_name: str | None, out: str | Path, adapter: str | Path | None = None, kind: str = "f16",
                verify: bool = True, force: bool = False, trust_remote_code: bool = False) -> GGUFResult:
    """`lorakit export gguf`: base (+ adapter merged in fp32) -> one GGUF file."""
    from lorakit.export.merge import AdapterRef, adapter_factors, dequantize_all, merge_factors, probe_batch, read_adapter
    from lorakit.models.load import load_model

    out = Path(out)
    if kind not in TYPES:
        raise LorakitError(f"--type {kind!r} is not supported; use one of {', '.join(TYPES)}")
    if out.suffix != ".gguf":
        raise LorakitError(f"--out {out} should end in .gguf")
    if out.exists() and not force:
        raise LorakitError(f"{out} already exists; choose another --out, or pass --force to replace it")
    if not out.parent.exists():
        raise LorakitError(f"the directory {out.parent} does not exist; create it first")
    ref = read_adapter(AdapterRef(Path(adapter))) if adapter is not None else None
    if model_name is None:
        model_name = ref.config.get("base_model_name_or_path") if ref else None
        if not model_name:
            raise LorakitError("give --model (the adapter does not record its base model)")
    spec = ref.meta.quant_spec(torch.float32) if ref is not None else None  # the training base, in fp32
    loaded = load_model(model_name, "fp32", trust_remote_code=trust_remote_code, quantization=spec)
    model, tokenizer = loaded.model, loaded.tokenizer
    check_exportable(model)
    if spec is not None:
        dequantize_all(model)
    if ref is not None:
        merge_factors(model, adapter_factors(ref))
    ids = probe_batch(model, tokenizer) if verify else None
    check = (lambda result: verify_gguf(result, model, ids)) if verify else None
    return write_gguf(model, tokenizer, out, kind, name=Path(str(model_name)).name, check=check)
