"""A classifier to predict with: an untuned LM (zero-shot), an lm_label or head adapter, or a fully tuned model.

What the weights are is read from classification.json beside them (TaskSpec); an untuned model
takes the spec from the caller (the config's classification section and label set).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.classify.data import TaskSpec
from lorakit.errors import LorakitError


@dataclass
class Classifier:
    name: str
    spec: TaskSpec
    model: nn.Module
    tokenizer: Any

    def probabilities(self, texts: list[str], batch_size: int = 8, progress: Any = None) -> torch.Tensor:
        """(N, K) probabilities over spec.labels."""
        if self.spec.method == "head":
            from lorakit.classify.head import head_probabilities

            return head_probabilities(self.model, self.tokenizer, texts, self.spec.max_length, batch_size, progress)
        from lorakit.classify.lm_label import label_probabilities

        return label_probabilities(self.model, self.tokenizer, self.spec, texts, batch_size, progress)


def load_classifier(model: str | None, adapter: Path | None, spec: TaskSpec | None = None, dtype: str = "auto",
                    name: str | None = None) -> Classifier:
    """`adapter` (an adapter/ or model/ directory with classification.json), or `model` untuned with `spec`."""
    where = adapter if adapter is not None else Path(model) if model and Path(model).is_dir() else None
    saved = TaskSpec.read(where) if where is not None else None
    if saved is None and adapter is not None:
        raise LorakitError(f"{adapter} has no classification.json; it is not a classifier lorakit trained "
                           "(train one with task: classification)")
    spec = saved or spec
    if spec is None:
        raise LorakitError("the model is untuned and no label set is given; pass --config with task: classification "
                           "(its classification section and data.train give the labels and the prompt)")
    label = name or str(adapter or model)
    if spec.method == "head":
        return Classifier(label, spec, *_head_model(model, adapter, spec, dtype))
    from lorakit.eval.generate import load_for_inference

    if adapter is not None and not (adapter / "adapter_config.json").exists():  # a fully tuned model/ directory
        model, adapter = str(adapter), None
    im = load_for_inference(model or spec.base_model, adapter, dtype)
    return Classifier(label, spec, im.model, im.tokenizer)


def _head_model(model: str | None, adapter: Path | None, spec: TaskSpec, dtype: str) -> tuple[nn.Module, Any]:
    from lorakit.classify.head import load_head_adapter, load_sequence_classifier
    from lorakit.models.load import load_tokenizer, model_directory, resolve_dtype
    from lorakit.models.resolve import resolve_model

    if adapter is not None and not (adapter / "adapter_config.json").exists():  # a fully tuned model/ directory
        tokenizer = load_tokenizer(str(adapter))
        return load_sequence_classifier(str(adapter), spec.labels, resolve_dtype(dtype), tokenizer.pad_token_id), tokenizer
    base = model or spec.base_model
    if base is None:
        raise LorakitError("give --model (the classifier does not record its base model)")
    tokenizer = load_tokenizer(base)
    net = load_sequence_classifier(model_directory(resolve_model(base)), spec.labels, resolve_dtype(dtype),
                                   tokenizer.pad_token_id)
    if adapter is not None:
        load_head_adapter(net, adapter)
    return net.eval(), tokenizer
