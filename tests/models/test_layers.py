"""models/layers.py: a model's linear layers and output head, below adapters (models never import adapters)."""

from __future__ import annotations

import subprocess
import sys

import torch

from lorakit.adapters import LoRALinear, inject_lora, linear_layer_names
from lorakit.models import layers
from lorakit.quant.linear import quantize_model_linears
from tests.conftest import tiny_model


def test_a_wrapper_stands_for_the_layer_it_wraps() -> None:
    model = tiny_model("llama")
    plain = layers.linear_layer_names(model)
    assert "lm_head" in plain and "model.layers.0.self_attn.q_proj" in plain
    inject_lora(model, ["q_proj"], r=2, alpha=4)
    assert linear_layer_names(model) == layers.linear_layer_names(model, wrapper=LoRALinear) == plain
    unwrapped = layers.linear_layer_names(model)  # without the wrapper type the LoRA internals are linears too
    assert "model.layers.0.self_attn.q_proj.base_layer" in unwrapped and "model.layers.0.self_attn.q_proj.lora_A" in unwrapped


def test_gpt2_conv1d_and_quantized_layers_count_and_the_head_is_named() -> None:
    gpt2 = tiny_model("gpt2")
    assert "transformer.h.0.attn.c_attn" in layers.linear_layer_names(gpt2)
    assert layers.output_head_names(gpt2) == {"lm_head"}
    model = tiny_model("llama")
    before = layers.linear_layer_names(model)
    quantize_model_linears(model, "nf4", compute_dtype=torch.float32)
    assert layers.linear_layer_names(model) == before
    assert layers.describe_linear_names(["a.q_proj", "b.q_proj", "lm_head"]) == "q_proj (2), lm_head (1)"


def test_models_do_not_import_adapters() -> None:
    code = ("import sys, lorakit.models.info, lorakit.models.load, lorakit.models.quantized; "
            "print([m for m in sys.modules if m.startswith(('lorakit.adapters', 'lorakit.train', 'lorakit.eval'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
