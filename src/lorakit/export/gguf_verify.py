"""Checks a GGUF passes before it replaces anything: transformers' loader (logits) or llama.cpp (answers).

transformers' GGUF loader reads the tensors but not llama.cpp's tokenizer keys (it accepted a file
whose pre-tokenizer llama.cpp refuses), so `--verify llamacpp` asks the real consumer: llama.cpp's
greedy answers to a few prompts, rendered with the training template and system prompt, against
lorakit's own greedy answers from the model the file was written from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.export import llamacpp

if TYPE_CHECKING:
    from lorakit.eval.generate import InferenceModel
    from lorakit.export.gguf import GGUFResult

VERIFY_MODES = ("transformers", "llamacpp", "none")
# transformers check: max |logit diff| / max |logit| and least top-1 agreement, per stored type
TOLERANCE = {"f16": (0.02, 0.95), "bf16": (0.05, 0.9), "q8_0": (0.1, 0.85), "q4_0": (0.5, 0.6),
             "q4_k_m": (0.5, 0.6), "q5_k_m": (0.3, 0.7), "q6_k": (0.2, 0.8)}
# llama.cpp check: least share of greedy answers identical to lorakit's. The quantized types change
# answers by design (measured in bench/BENCHMARKS.md); for them the file must load and answer.
SAME_ANSWERS = {"f16": 0.75, "bf16": 0.5, "q8_0": 0.5}
VERIFY_PROMPTS = 8
VERIFY_TOKENS = 32


def check_mode(mode: str) -> None:
    if mode not in VERIFY_MODES:
        raise LorakitError(f"--verify {mode!r} is not a check lorakit has; use one of {', '.join(VERIFY_MODES)}")
    if mode == "llamacpp":
        llamacpp.find_tool("llama-simple-lora")


def verify_prompts(n: int = VERIFY_PROMPTS) -> list[str]:
    """An even sample of lorakit's general prompts (package data), one per stretch of the list."""
    text = resources.files("lorakit.synth").joinpath("prompts/general.jsonl").read_text(encoding="utf-8")
    prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    return prompts[:: max(1, len(prompts) // n)][:n]


@torch.no_grad()
def verify_transformers(result: GGUFResult, source: nn.Module, ids: torch.Tensor) -> GGUFResult:
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


@dataclass
class AnswerCheck:
    same: int
    asked: int
    first_difference: tuple[str, str, str] | None  # (prompt, lorakit's answer, llama.cpp's)


def compare_answers(im: InferenceModel, prompts: list[str], model: Path, lora: Path | None = None,
                    tokens: int = VERIFY_TOKENS) -> AnswerCheck:
    """lorakit's greedy answers against llama.cpp's (llama-simple, or llama-simple-lora with a LoRA GGUF)."""
    from lorakit.eval.generate import GenerationSettings, generate, prompt_text

    ours = generate(im, prompts, GenerationSettings(max_new_tokens=tokens), batch_size=len(prompts))
    same, first = 0, None
    for prompt, mine in zip(prompts, ours):
        text = prompt_text(prompt, im)
        got = llamacpp.simple(model, text, tokens, lora=lora, threads=1).text  # 1: no spin-waiting on a busy box
        if got.strip() == mine:
            same += 1
        elif first is None:
            first = (prompt, mine, got.strip())
    return AnswerCheck(same, len(prompts), first)


def verify_llamacpp(result: GGUFResult, im: InferenceModel, prompts: list[str] | None = None) -> GGUFResult:
    """Fail when llama.cpp cannot load the file, or its answers differ from lorakit's more than the type allows."""
    check = compare_answers(im, prompts or verify_prompts(), result.path)
    result.llamacpp_same, result.llamacpp_asked = check.same, check.asked
    need = SAME_ANSWERS.get(result.tensor_type, 0.0)
    if check.same < need * check.asked:
        prompt, mine, got = check.first_difference or ("", "", "")
        raise LorakitError(f"verification against llama.cpp failed: {check.same} of {check.asked} greedy answers equal "
                           f"lorakit's ({result.tensor_type} needs {need:.0%}); first difference on {prompt!r}: lorakit "
                           f"{mine[:60]!r}, llama.cpp {got[:60]!r}; nothing was written")
    return result
