"""Merge LoRA adapters into their base model, verify the result, write a Hugging Face directory.

    W' = W + sum_i weight_i * scaling_i * (B_i @ A_i)      (fp32, then stored in --dtype)
    W' = m * (W + s B A) / ||W + s B A||_row               (a DoRA adapter, merged alone)

The merge reads the adapters' A/B matrices straight from their files, so any number of
adapters, a changed alpha or a strength multiplier cost nothing extra. A quantized base
(an adapter trained with QLoRA records it in lorakit.json) is loaded quantized exactly as in
training, then dequantized to fp32 before the update is added: the merged model is full
precision, never re-quantized.

Verification is independent of the merge arithmetic: the reference runs the unmerged base
with forward hooks that add each adapter's x @ A^T @ B^T * scaling to its layer's output (the
way the adapter runs in training), and the merged model must reproduce those logits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.lora import LoRAFactor, lora_scaling, merged_weight
from lorakit.adapters.state import (
    PEFT_PREFIX,
    AdapterMeta,
    adapted_modules,
    adapter_magnitude,
    base_model_of,
    layer_alpha,
    read_adapter_config,
    read_adapter_meta,
    read_config_json,
    read_adapter_weights,
)
from lorakit.dtypes import DTYPES
from lorakit.errors import LorakitError
from lorakit.quant.linear import QuantizedLinear, is_conv1d

# max |logit difference| allowed, as a fraction of the largest |logit|, and the least top-1 agreement
TOLERANCE = {"fp32": (1e-4, 1.0), "bf16": (0.05, 0.9), "fp16": (0.01, 0.95)}


@dataclass
class AdapterRef:
    path: Path
    weight: float = 1.0
    config: dict[str, Any] = field(default_factory=dict)
    meta: AdapterMeta = field(default_factory=AdapterMeta)  # empty for a PEFT-made adapter
    kind: str = "lora"  # lora (LoRA / DoRA), ia3 or selective (adapters.methods.adapter_kind)


@dataclass
class Verification:
    max_abs_diff: float
    max_abs_logit: float
    top1_agreement: float
    adapter_effect: float  # max |logit change| the adapters cause (0: they do nothing)
    tolerance: float
    min_agreement: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance * max(1.0, self.max_abs_logit) and \
            self.top1_agreement >= self.min_agreement


def parse_adapter_arg(text: str) -> AdapterRef:
    """'DIR' or 'DIR:WEIGHT' (the weight is a number; a path may itself contain ':')."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return AdapterRef(Path(text), 1.0)
        if not math.isfinite(value):
            raise LorakitError(f"--adapter {text}: the weight {weight!r} is not a finite number")
        return AdapterRef(Path(path), value)
    return AdapterRef(Path(text), 1.0)


def read_adapter(ref: AdapterRef) -> AdapterRef:
    from lorakit.adapters.methods import adapter_kind
    from lorakit.adapters.selective import read_manifest

    ref.kind = adapter_kind(ref.path)
    if ref.kind == "prompt_tuning":
        raise LorakitError(f"{ref.path} is a prompt-tuning adapter: its virtual tokens are extra inputs, not a change "
                           "to any weight, so it cannot be merged into the model; use it with --adapter in "
                           "lorakit generate / eval / chat")
    ref.config = {"lora": read_adapter_config, "ia3": read_config_json, "selective": read_manifest}[ref.kind](ref.path)
    ref.meta = read_adapter_meta(ref.path) or AdapterMeta()
    return ref


def check_alone(refs: list[AdapterRef], alpha: float | None, scale: float) -> None:
    """An IA3 adapter or a selective fine-tune merges alone, as trained: no other adapter, alpha or scale."""
    other = next((ref for ref in refs if ref.kind != "lora"), None)
    if other is None:
        return
    if len(refs) > 1:
        raise LorakitError(f"{other.path} is {other.kind}; it rescales or replaces weights, so merge it alone")
    if alpha is not None or scale != 1.0 or other.weight != 1.0:
        raise LorakitError(f"{other.path} is {other.kind}, which has no low-rank update to scale; "
                           "merge it without --alpha, --scale or a :WEIGHT")


def apply_other(net: nn.Module, ref: AdapterRef) -> int:
    """Put an IA3 adapter (its IA3Linear layers, the training-time forward) or a selective fine-tune's tensors
    on `net`; the number of layers or tensors it changes."""
    from lorakit.adapters.ia3_state import load_ia3
    from lorakit.adapters.selective import load_selective

    if ref.kind == "ia3":
        return len(load_ia3(net, ref.path).modules)
    return len(load_selective(net, ref.path))


def merge_into(net: nn.Module, refs: list[AdapterRef], alpha: float | None = None, scale: float = 1.0) -> int:
    """Every adapter folded into the plain fp32 `net`, in place (export's merged GGUF); the layers changed."""
    from lorakit.adapters.inject import unwrap_ia3

    check_alone(refs, alpha, scale)
    if refs and refs[0].kind != "lora":
        n = apply_other(net, refs[0])
        unwrap_ia3(net)
        return n
    factors = [f for ref in refs for f in adapter_factors(ref, alpha, scale)]
    merge_factors(net, factors)
    return len({f.module for f in factors})


def adapter_factors(ref: AdapterRef, alpha: float | None = None, scale: float = 1.0) -> list[LoRAFactor]:
    """The adapter's per-layer factors with its scaling (alpha overridden / scaled as asked)."""
    config = ref.config or read_adapter_config(ref.path)
    weights = read_adapter_weights(ref.path)
    use_rslora = bool(config.get("use_rslora", False))
    factors = []
    for name in adapted_modules(weights, ref.path):
        a = weights[f"{PEFT_PREFIX}{name}.lora_A.weight"].float()
        b = weights[f"{PEFT_PREFIX}{name}.lora_B.weight"].float()
        r = int(a.shape[0])
        layer_a = layer_alpha(config, name) if alpha is None else alpha
        scaling = lora_scaling(layer_a, r, use_rslora) * scale * ref.weight  # times the merge scale and weight
        m = adapter_magnitude(weights, name, bool(config.get("use_dora")), b.shape[0], ref.path)  # DoRA's, else None
        factors.append(LoRAFactor(a, b, scaling, adapter=str(ref.path), module=name,
                                  magnitude=None if m is None else m.float()))
    return factors


def _weight_layout(layer: nn.Module) -> tuple[torch.Tensor, bool]:
    """(weight parameter, fan_in_fan_out) of a plain linear layer."""
    if isinstance(layer, nn.Linear):
        return layer.weight, False
    if is_conv1d(layer):
        return layer.weight, True  # GPT-2 stores (in, out)
    raise LorakitError(f"cannot merge into a {type(layer).__name__}; lorakit merges into linear layers")


def dequantize_all(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every lorakit quantized linear by a plain nn.Linear holding its dequantized weight."""
    n = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear) and name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.to_linear(dtype))
            n += 1
    return n


@torch.no_grad()
def merge_factors(model: nn.Module, factors: list[LoRAFactor]) -> None:
    """Add every factor into its layer's weight, in fp32, in place (the model must be plain fp32)."""
    for name, group in by_module(factors).items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise LorakitError(f"adapter {group[0].adapter} adapts {name}, which this model does not have; "
                               "merge it into the base model it was trained on") from None
        weight, fan_in_fan_out = _weight_layout(layer)
        weight.copy_(merged_weight(weight.detach().float(), group, name, fan_in_fan_out).to(weight.dtype))


def by_module(factors: list[LoRAFactor]) -> dict[str, list[LoRAFactor]]:
    """The factors grouped by the layer they update, in first-seen order."""
    groups: dict[str, list[LoRAFactor]] = {}
    for f in factors:
        groups.setdefault(f.module, []).append(f)
    return groups


@contextmanager
def adapters_as_hooks(model: nn.Module, factors: list[LoRAFactor]) -> Iterator[None]:
    """Run the base with the adapters added to each layer's output, as LoRA does in training.

    A DoRA factor (alone on its layer) follows PEFT's forward: out + (m/n - 1) * (W x) + (m/n) * (B A x) * s.
    """
    handles = []

    def hook_for(group: list[LoRAFactor]):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x = inputs[0].float()
            extra = sum(F.linear(F.linear(x, f.A.to(x.device)), f.B.to(x.device)) * f.scaling for f in group)
            if group[0].magnitude is not None:
                weight, fan_in_fan_out = _weight_layout(module)
                scale = group[0].dora_scale(weight.detach().float().T if fan_in_fan_out else weight.detach().float())
                bias = getattr(module, "bias", None)
                base = output.float() - (bias.float() if bias is not None else 0.0)  # W x
                extra = (scale - 1) * base + scale * extra
            return output + extra.to(output.dtype)

        return hook

    for name, group in by_module(factors).items():
        handles.append(model.get_submodule(name).register_forward_hook(hook_for(group)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def probe_batch(model: nn.Module, tokenizer: Any, seed: int = 0) -> torch.Tensor:
    """(2, 48) token ids: a chat prompt rendered with the model's template, and seeded random tokens."""
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (48,), generator=g)]
    if tokenizer is not None:
        try:
            from lorakit.data.templates import render_prompt

            text = render_prompt([{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
                                 "auto", tokenizer)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:48]
            ids = ids + rows[0][: 48 - len(ids)].tolist()
            rows.insert(0, torch.tensor(ids))
        except Exception:  # noqa: BLE001 - the probe text is a nicety; random tokens still verify
            pass
    return torch.stack(rows)


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def compare(reference: torch.Tensor, merged: torch.Tensor, base: torch.Tensor, dtype: str) -> Verification:
    tol, agree = TOLERANCE[dtype]
    return Verification(
        max_abs_diff=float((reference - merged).abs().max()),
        max_abs_logit=float(reference.abs().max()),
        top1_agreement=float((reference.argmax(-1) == merged.argmax(-1)).float().mean()),
        adapter_effect=float((reference - base).abs().max()),
        tolerance=tol,
        min_agreement=agree,
    )


@dataclass
class MergeResult:
    out: Path
    base_model: str
    adapters: list[AdapterRef]
    merged_layers: int
    dequantized_layers: int
    dtype: str
    verification: Verification | None
    scale: float
    alpha: float | None


def merge(
    adapters: list[AdapterRef],
    out: str | Path,
    model: str | None = None,
    alpha: float | None = None,
    scale: float = 1.0,
    dtype: str = "bf16",
    verify: bool = True,
    force: bool = False,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Merge `adapters` into `model` (default: the adapters' recorded base) and write `out`."""
    from lorakit.io import atomic_dir
    from lorakit.models.load import load_model

    out = Path(out)
    if dtype not in DTYPES:
        raise LorakitError(f"--dtype {dtype!r} is not supported; use bf16, fp16 or fp32")
    if not adapters:
        raise LorakitError("give at least one --adapter DIR")
    if out.exists() and not force:
        raise LorakitError(f"{out} already exists; choose another --out, or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise LorakitError(f"{out} is a file; --out must be a directory")
    refs = [read_adapter(ref) for ref in adapters]
    base = base_model_of([ref.path for ref in refs], model)  # recorded: its commit, from the cache only
    if base is None:
        raise LorakitError("the adapters do not record one base model; pass --model")
    model = base.name
    quantized = [ref.meta for ref in refs if ref.meta.quantization]
    if len({json.dumps(meta.quantization, sort_keys=True) for meta in quantized}) > 1:
        raise LorakitError("the adapters were trained on differently quantized bases; merge them one at a time")
    # the base exactly as in training (same quantization), computed in fp32 for the reference
    spec = quantized[0].quant_spec(torch.float32) if quantized else None
    loaded = load_model(model, "fp32", trust_remote_code=trust_remote_code, revision=base.revision, quantization=spec,
                        cache_only=base.cache_only)
    net, tokenizer = loaded.model, loaded.tokenizer
    dequantized = dequantize_all(net, torch.float32) if spec is not None else 0
    layers, check = merge_verified(net, tokenizer, refs, model, alpha, scale, dtype, verify)
    result = MergeResult(out, model, refs, layers, dequantized, dtype, check, scale, alpha)
    cfg = getattr(net, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with atomic_dir(out, overwrite=force) as tmp:
        net.save_pretrained(tmp, max_shard_size="2GB")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(result), encoding="utf-8")
        (tmp / "lorakit_merge.json").write_text(json.dumps(merge_record(result), indent=2) + "\n", encoding="utf-8")
    return result


def merge_verified(net: nn.Module, tokenizer: Any, refs: list[AdapterRef], model: str, alpha: float | None,
                   scale: float, dtype: str, verify: bool) -> tuple[int, Verification | None]:
    """Merge `refs` into the plain fp32 `net`, cast it to `dtype`, and check its logits against base + adapter
    computed the way training computes them (LoRA: forward hooks; IA3: its layers; selective: the tensors in
    place, so there the check covers the cast). Returns (layers changed, verification)."""
    from lorakit.adapters.inject import unwrap_ia3

    check_alone(refs, alpha, scale)
    ids = probe_batch(net, tokenizer) if verify else None
    base_logits = logits_of(net, ids) if ids is not None else None
    reference = None
    if refs[0].kind != "lora":
        layers = apply_other(net, refs[0])
        reference = logits_of(net, ids) if ids is not None else None
        unwrap_ia3(net)
    else:
        factors = [f for ref in refs for f in adapter_factors(ref, alpha, scale)]
        missing = sorted({f.module for f in factors} - {n for n, _ in net.named_modules()})
        if missing:
            raise LorakitError(f"the adapter adapts {missing[0]} (and {len(missing) - 1} more), which {model} does not "
                               "have; merge it into the base model it was trained on")
        if ids is not None:
            with adapters_as_hooks(net, factors):
                reference = logits_of(net, ids)
        merge_factors(net, factors)
        layers = len({f.module for f in factors})
    net.to(DTYPES[dtype])
    if ids is None or reference is None or base_logits is None:
        return layers, None
    check = compare(reference, logits_of(net, ids), base_logits, dtype)
    if not check.ok:
        raise LorakitError(
            f"verification failed: the merged model's logits differ from base+adapter by up to "
            f"{check.max_abs_diff:.4g} (allowed {check.tolerance:g} x {max(1.0, check.max_abs_logit):.3g}) and agree "
            f"on the top token {100 * check.top1_agreement:.1f}% of the time; nothing was written. "
            "Try --dtype fp32, or report the adapter"
        )
    return layers, check


def merge_record(result: MergeResult) -> dict[str, Any]:
    from lorakit import __version__

    v = result.verification
    return {
        "lorakit_version": __version__,
        "base_model": result.base_model,
        "adapters": [{"path": str(a.path), "kind": a.kind, "weight": a.weight, "r": a.config.get("r"),
                      "lora_alpha": a.config.get("lora_alpha"),
                      "use_dora": bool(a.config.get("use_dora")), "quantization": a.meta.quantization}
                     for a in result.adapters],
        "alpha_override": result.alpha,
        "scale": result.scale,
        "dtype": result.dtype,
        "merged_layers": result.merged_layers,
        "dequantized_layers": result.dequantized_layers,
        "verification": None if v is None else {
            "max_abs_logit_diff": v.max_abs_diff, "max_abs_logit": v.max_abs_logit,
            "top1_agreement": v.top1_agreement, "adapter_effect": v.adapter_effect,
        },
    }


def model_card(result: MergeResult) -> str:
    kind = result.adapters[0].kind if result.adapters else "lora"
    how = ("LoRA", "W' = W + scale x alpha/r x B A, computed in fp32") if kind == "lora" else (
        "IA3" if kind == "ia3" else "selective",
        "IA3: each scaled layer's output rows (and bias) or input columns times its vector" if kind == "ia3" else
        "selective: the trained tensors in place of the base's")
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [lorakit, {kind}, merged]",
        "---",
        "",
        f"# {result.out.name}",
        "",
        f"A {how[0]} fine-tune of `{result.base_model}`, merged into full weights by lorakit "
        f"({how[1]}; stored as {result.dtype}).",
        "",
        "| adapter | r | lora_alpha | weight | base quantization |",
        "|---|---:|---:|---:|---|",
    ]
    for a in result.adapters:
        q = a.meta.quantization
        qtext = f"{q['method']} (dequantized to fp32 before merging)" if q else "none"
        lines.append(f"| `{a.path}` | {a.config.get('r')} | {a.config.get('lora_alpha')} | {a.weight:g} | {qtext} |")
    alpha = f"alpha overridden to {result.alpha:g}; " if result.alpha is not None else ""
    lines += ["", f"Merge: {alpha}scale {result.scale:g}; {result.merged_layers} layers changed."]
    v = result.verification
    if v is not None:
        lines += ["", f"Verified on a probe batch: max |logit difference| to base+adapter {v.max_abs_diff:.3g} "
                      f"(largest logit {v.max_abs_logit:.3g}), top-1 agreement {100 * v.top1_agreement:.1f}%; the adapters "
                      f"change the base's logits by up to {v.adapter_effect:.3g}."]
    else:
        lines += ["", "Not verified (--no-verify)."]
    return "\n".join(lines) + "\n"
