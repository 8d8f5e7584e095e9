"""Shared fixtures: tiny random models built from configs (nothing from a hub)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A 2-layer, hidden-64 causal LM of the given architecture, seeded, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256))
    else:
        raise ValueError(arch)
    return model.eval()


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny Llama saved as a Hugging Face directory (safetensors)."""
    out = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(out)
    return out


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m lorakit ARGS` as a user would; returns the finished process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )
