"""Generation metrics while training: answers to the first rows of the eval split, scored.

The training loop calls `generation_eval` every `eval.every` steps and at the end, and logs
the result as a `gen_eval` event in metrics.jsonl (the report plots it). The model is asked
exactly as `lorakit generate` would ask the saved adapter: the same template and system
prompt, greedy decoding. With `train.early_stop` the loop stops on one of these metrics
(train/early_stop.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.eval.generate import GenerationSettings, InferenceModel, Message, generate
from lorakit.eval.metrics import Target, aggregate, score_example
from lorakit.eval.runner import split_conversation


def generation_rows(cfg: Any, examples: Sequence[Any]) -> list[tuple[list[Message], Target]]:
    """(prompt, target) of the eval rows generation_eval asks: the first cfg.eval.max_examples with messages."""
    rows = [e for e in examples if getattr(e, "messages", None)][: cfg.eval.max_examples]
    return [s for e in rows if (s := split_conversation(e.messages, getattr(e, "meta", None) or {}))]


def generation_eval(model: nn.Module, tokenizer: Any, cfg: Any, examples: Sequence[Any]) -> dict[str, Any] | None:
    """{"n", "metrics"} over up to cfg.eval.max_examples eval rows with messages (None when there are none)."""
    splits = generation_rows(cfg, examples)
    if not splits:
        return None
    prompts, targets = [p for p, _ in splits], [t for _, t in splits]
    im = InferenceModel(model, tokenizer, cfg.data.template, cfg.data.system_prompt)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = generate(im, prompts, GenerationSettings(cfg.eval.max_new_tokens), batch_size=cfg.eval.batch_size)
    finally:
        model.train(was_training)
    per_example = [score_example(cfg.eval.metrics, o, t) for o, t in zip(outputs, targets)]
    return {"n": len(prompts), "metrics": aggregate(cfg.eval.metrics, outputs, targets, per_example),
            "sample": {"prompt": prompts[0][-1]["content"], "output": outputs[0]}}
