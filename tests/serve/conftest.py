"""A tiny chat model and two tiny adapters on it, made once per session, for the serve tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import save_tiny_model_dir

PROMPTS = ["hello world", "what is the capital of france?", "the quick brown fox", "how are you?",
           "tell me about the lazy dog", "question: what is the answer?"]


@dataclass
class Served:
    model: Path
    adapters: dict[str, Path]


def make_adapter(model_dir: Path, out: Path, seed: int, targets: list[str], r: int, system_prompt: str | None) -> Path:
    """A random LoRA adapter (B not zero, so it changes answers) saved in PEFT's format with lorakit.json."""
    from lorakit.adapters import inject_lora
    from lorakit.adapters.inject import lora_layers
    from lorakit.adapters.state import save_adapter
    from lorakit.models.load import load_model

    loaded = load_model(str(model_dir), "fp32", with_tokenizer=False)
    torch.manual_seed(seed)
    inject_lora(loaded.model, targets, r=r, alpha=2 * r)
    with torch.no_grad():
        for _, layer in lora_layers(loaded.model):
            layer.lora_B.weight.normal_(0, 0.3)
    meta = {"template": "auto", "base_model": str(model_dir)}
    if system_prompt:
        meta["system_prompt"] = system_prompt
    return save_adapter(loaded.model, out, str(model_dir), meta)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    root = tmp_path_factory.mktemp("serve")
    model = save_tiny_model_dir(root / "model")
    adapters = {
        "alpha": make_adapter(model, root / "adapters" / "alpha", 1, ["q_proj", "v_proj", "down_proj"], 4, None),
        "beta": make_adapter(model, root / "adapters" / "beta", 2, ["all-linear"], 8, "answer briefly"),
    }
    return Served(model, adapters)
