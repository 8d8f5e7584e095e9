"""One setting of the quantization report, measured in a process of its own.

`lorakit quantize report` starts `python -m lorakit.experiments.quant_measure JOB RESULT` once
per setting, so each load starts from an empty heap and its peak RSS is that setting's alone
(a second load in the same process would reuse, or be hidden by, the first one's memory).
JOB is a JSON file (model directory, setting, token windows, prompt, threads); RESULT gets
the measured numbers and the model's next-token predictions, which the parent compares
with fp32's.

What is measured, and how:
- bytes: every tensor the model stores (parameters and persistent buffers, a tied weight
  once), split into the quantizable linear layers (all but the output head) and the rest;
  bits per parameter = 8 * bytes / parameters of the original model.
- load peak RSS: the process's high-water mark (VmHWM) right after loading and reading
  every stored tensor once (transformers may leave fp32 weights memory-mapped from the
  safetensors file, resident only once touched; the read makes every setting pay for its
  weights, as its first forward would).
- perplexity: exp(mean next-token cross-entropy) over the windows, each a separate
  sequence (as eval's text perplexity computes it), logits in fp32.
- predictions: argmax of the logits at every position but the last of each window.
- generation: greedy decoding of `gen_tokens` tokens after the prompt (end of text
  suppressed), timed after a warm-up; tokens/s = gen_tokens / seconds.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FULL_PRECISION = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}  # method -> load dtype
QUANTIZED = ("int8", "nf4", "nf4-dq", "fp4", "fp4-dq")
METHODS = (*FULL_PRECISION, *QUANTIZED)
BLOCKED = ("nf4", "nf4-dq", "fp4", "fp4-dq")  # the methods a blocksize applies to


@dataclass(frozen=True)
class Setting:
    """One row of the report: a method, and a blocksize where the method has blocks."""

    method: str
    blocksize: int | None = None

    @property
    def label(self) -> str:
        return self.method if self.blocksize is None else f"{self.method}/{self.blocksize}"

    def quant_spec(self) -> Any:
        """The QuantSpec to load with (None for fp32/bf16/fp16); quantized layers compute in bf16."""
        from lorakit.models.quantized import QuantSpec

        if self.method in FULL_PRECISION:
            return None
        base, _, dq = self.method.partition("-")
        return QuantSpec(base, self.blocksize or 64, dq == "dq", torch.bfloat16)

    @property
    def load_dtype(self) -> str:
        """The dtype of everything not quantized: the method's own, bf16 beside quantized layers."""
        return FULL_PRECISION.get(self.method, "bf16")


@dataclass
class Bytes:
    linear_params: int
    linear_bytes: int
    other_params: int
    other_bytes: int

    @property
    def linear_bits(self) -> float:
        return 8 * self.linear_bytes / self.linear_params

    @property
    def model_bits(self) -> float:
        return 8 * (self.linear_bytes + self.other_bytes) / (self.linear_params + self.other_params)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The quantizable linear layers by name (quantized or not): every linear but the output head."""
    from lorakit.quant.linear import QuantizedLinear, is_conv1d

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name: m for name, m in model.named_modules()
            if name and m is not head and (isinstance(m, (nn.Linear, QuantizedLinear)) or is_conv1d(m))}


def measure_bytes(model: nn.Module) -> Bytes:
    """Stored bytes and original parameter counts of the linear layers' weights and of everything else."""
    stored = model.state_dict(keep_vars=True)  # parameters + persistent buffers (no decode tables, no rotary)
    linears = linear_layers(model)
    seen: set[int] = set()
    linear_params = linear_bytes = other_params = other_bytes = 0
    for name, tensor in stored.items():
        if id(tensor) in seen:
            continue  # a tied weight counts once
        seen.add(id(tensor))
        owner, _, leaf = name.rpartition(".")
        nbytes = tensor.numel() * tensor.element_size()
        if owner in linears and leaf.startswith("weight"):  # weight, or weight_data / weight_absmax / ...
            linear_bytes += nbytes
        else:
            other_bytes += nbytes
            other_params += tensor.numel() if isinstance(tensor, nn.Parameter) else 0
    for m in linears.values():
        linear_params += m.in_features * m.out_features if hasattr(m, "in_features") else m.weight.numel()
    return Bytes(linear_params, linear_bytes, other_params, other_bytes)


@torch.no_grad()
def score_windows(model: nn.Module, windows: list[list[int]]) -> tuple[list[float], list[list[int]]]:
    """Per window: the summed next-token NLL (nats) and the argmax predictions (len(window) - 1)."""
    nll, predictions = [], []
    for window in windows:
        ids = torch.tensor([window])  # (1, T)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # (T-1, V)
        nll.append(float(F.cross_entropy(logits, ids[0, 1:], reduction="sum")))
        predictions.append(logits.argmax(-1).tolist())
    return nll, predictions


@torch.no_grad()
def generation_speed(model: nn.Module, prompt: list[int], tokens: int, eos: int | None) -> tuple[float, list[int]]:
    """(tokens/s, the generated ids) of greedy decoding with the KV cache, after a short warm-up."""
    ids = torch.tensor([prompt])
    kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": eos if eos is not None else 0}
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up: allocations, first-call paths
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
    seconds = time.perf_counter() - start
    return tokens / seconds, out[0, len(prompt):].tolist()


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Load the job's setting and measure it (see the module docstring)."""
    from lorakit.memory import peak_rss_mb, rss_mb
    from lorakit.models.load import load_model

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    setting = Setting(job["method"], job.get("blocksize"))
    rss_before = rss_mb()
    start = time.perf_counter()
    loaded = load_model(job["model_dir"], setting.load_dtype, with_tokenizer=False, quantization=setting.quant_spec())
    model = loaded.model.eval()
    for tensor in model.state_dict().values():
        tensor.sum()  # read every weight once: memory-mapped pages become resident, as the first forward would
    load_s = time.perf_counter() - start
    load_peak = peak_rss_mb()
    b = measure_bytes(model)
    start = time.perf_counter()
    nll, predictions = score_windows(model, job["windows"])
    score_s = time.perf_counter() - start
    tokens = sum(len(w) - 1 for w in job["windows"])
    speed, generated = generation_speed(model, job["prompt"], int(job["gen_tokens"]), job.get("eos"))
    return {
        "setting": setting.label, "method": setting.method, "blocksize": setting.blocksize,
        **asdict(b), "linear_bits": b.linear_bits, "model_bits": b.model_bits,
        "rss_before_load_mb": rss_before, "load_peak_rss_mb": load_peak, "load_s": load_s,
        "streamed": bool(loaded.quantization and loaded.quantization["streamed"]),
        "window_nll": nll, "scored_tokens": tokens, "perplexity": math.exp(sum(nll) / tokens),
        "score_tokens_per_s": tokens / score_s, "gen_tokens_per_s": speed, "generated": generated,
        "run_peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(), "predictions": predictions,
    }


def main(argv: list[str]) -> None:
    job_path, result_path = Path(argv[0]), Path(argv[1])
    result = measure(json.loads(job_path.read_text(encoding="utf-8")))
    result_path.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
