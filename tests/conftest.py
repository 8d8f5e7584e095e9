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


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_TOKENIZER_CACHE: dict[str, object] = {}


def tiny_tokenizer():
    """A byte-level BPE fast tokenizer (~330 tokens) with ChatML specials and template.

    Built from a small corpus with `tokenizers`, nothing downloaded. EOS is <|im_end|>.
    """
    if "tok" in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE["tok"]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog", "what is the capital of france? paris.",
              "user assistant system question answer instruction input output", "hello world, how are you?"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    _TOKENIZER_CACHE["tok"] = fast
    return fast


def tiny_lm_for(tokenizer, arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM whose vocabulary fits `tokenizer`."""
    import transformers as tf

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id,
                  # std 0.2, not 0.02: a frozen 64-wide head with std 0.02 caps logits near 1.3,
                  # so LoRA could not fit anything and "loss falls" tests would prove nothing.
                  initializer_range=0.2)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common)).eval()
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)).eval()
    raise ValueError(arch)


def save_tiny_model_dir(path: Path, arch: str = "llama") -> Path:
    """A tiny model + tokenizer saved as a Hugging Face directory that `lorakit` can load."""
    tok = tiny_tokenizer()
    tiny_lm_for(tok, arch).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tiny_chat_model_dir(tmp_path: Path) -> Path:
    return save_tiny_model_dir(tmp_path / "tiny-chat-llama")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `llamacpp` run real llama.cpp programs: only with LORAKIT_TEST_LLAMACPP=1 (make test-llamacpp)."""
    if os.environ.get("LORAKIT_TEST_LLAMACPP") == "1":
        return
    skip = pytest.mark.skip(reason="runs llama.cpp: `make test-llamacpp` (LORAKIT_TEST_LLAMACPP=1)")
    for item in items:
        if "llamacpp" in item.keywords:
            item.add_marker(skip)
