"""The quantization: config section (QLoRA implies NF4), its errors, QuantSpec from config."""

from __future__ import annotations

import pytest
import torch

from lorakit.config import load_config
from lorakit.errors import ConfigError
from lorakit.models.load import quant_spec

FP32 = torch.float32


def test_quantization_section_defaults_and_qlora_implies_nf4(tmp_path):
    cfg = load_config(None)
    assert cfg.quantization.method == "none" and cfg.quantization.double_quant and cfg.quantization.blocksize == 64
    assert cfg.quantization.compute_dtype == "bf16"
    cfg = load_config(None, ["adapter.method=qlora"])
    assert cfg.quantization.method == "nf4"
    cfg = load_config(None, ["adapter.method=qlora", "quantization.method=int8"])
    assert cfg.quantization.method == "int8"


def test_quantization_config_errors_are_all_reported():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["quantization.blocksize=100", "quantization.method=nf5", "quantization.double_quant=maybe",
                           "quantization.blocksise=64"])
    text = str(err.value)
    assert "quantization.blocksize: must be 32, 64, 128 or 256, got 100" in text
    assert "quantization.method: must be one of" in text and "did you mean 'nf4'" in text
    assert "quantization.double_quant: expected true or false" in text
    assert "quantization.blocksise: unknown key; did you mean quantization.blocksize?" in text


def test_full_fine_tuning_refuses_a_quantized_base():
    with pytest.raises(ConfigError, match="adapter.method full trains base weights and a quantized base cannot be trained"):
        load_config(None, ["adapter.method=full", "quantization.method=nf4"])


def test_quant_spec_from_config():
    assert quant_spec(load_config(None).quantization) is None
    spec = quant_spec(load_config(None, ["quantization.method=nf4", "quantization.compute_dtype=fp32",
                                         "quantization.blocksize=128", "quantization.double_quant=false"]).quantization)
    assert (spec.method, spec.blocksize, spec.double_quant, spec.compute_dtype) == ("nf4", 128, False, FP32)
    spec = quant_spec(load_config(None, ["adapter.method=qlora", "quantization.method=fp4"]).quantization)
    assert (spec.method, spec.blocksize, spec.double_quant) == ("fp4", 64, True)  # QLoRA on an FP4 base


