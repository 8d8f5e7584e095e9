"""Measured bytes of a quantized load (models.info) and `lorakit info` reporting them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.models.info import measure_quantized, nf4_bytes
from tests.conftest import run_cli


def _wide_model_dir(tmp_path: Path) -> Path:
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "wide")
    return tmp_path / "wide"


def test_measured_bits_per_parameter(tmp_path):
    path = str(_wide_model_dir(tmp_path))
    dq = measure_quantized(path, "nf4", 64, True)
    assert dq.quantized_layers == 14 and dq.streamed
    assert dq.quantized_params == 2 * (4 * 256 * 256 + 3 * 256 * 512)
    assert dq.bits_per_param == pytest.approx(4.127, abs=0.002)
    assert dq.quantized_bytes == sum(nf4_bytes(n) for n in [256 * 256] * 8 + [256 * 512] * 6)
    assert measure_quantized(path, "nf4", 64, False).bits_per_param == pytest.approx(4.5)
    rows = 4 * 256 + 2 * 512 + 256  # output rows per decoder layer: one fp32 scale each
    assert measure_quantized(path, "int8").bits_per_param == pytest.approx(8 + 32 * rows / (4 * 256 * 256 + 3 * 256 * 512))
    assert dq.quantized_bytes / dq.before() < 0.27


def test_info_cli_reports_measured_bytes(tmp_path):
    path = _wide_model_dir(tmp_path)
    proc = run_cli("info", str(path), "--quantization", "nf4")
    assert proc.returncode == 0, proc.stderr
    assert "bits per quantized parameter: 4.127" in proc.stdout
    assert "quantized linears" in proc.stdout and "0.258x" in proc.stdout
    proc = run_cli("info", str(path), "--quantization", "nf4", "--no-double-quant")
    assert "bits per quantized parameter: 4.500" in proc.stdout
    proc = run_cli("info", str(path), "--quantization", "nf3")
    assert proc.returncode == 2 and "error: --quantization 'nf3' is not a method; use nf4 or int8" in proc.stderr
    assert "Traceback" not in proc.stderr


