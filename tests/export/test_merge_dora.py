"""`lorakit merge` of DoRA adapters: verified, equal to PEFT's merge_and_unload, QDoRA into the dequantized base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.adapters import inject_lora, load_adapter, lora_layers, save_adapter
from lorakit.errors import LorakitError
from lorakit.export.merge import AdapterRef, merge
from lorakit.models.load import load_model
from lorakit.models.quantized import QuantSpec
from tests.conftest import run_cli, save_tiny_model_dir

IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))


def make_dora_adapter(model_dir: Path, out: Path, seed: int, targets=("all-linear",), quantization=None) -> Path:
    loaded = load_model(str(model_dir), "fp32", with_tokenizer=False, quantization=quantization)
    inject_lora(loaded.model, list(targets), r=4, alpha=8, use_dora=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(loaded.model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
            layer.magnitude.mul_(1 + 0.1 * torch.randn(layer.magnitude.shape, generator=g))
    meta = {"method": "dora", "quantization": {"method": "nf4", "blocksize": 64, "double_quant": True}} if quantization else None
    save_adapter(loaded.model, out, str(model_dir), meta)
    return out


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("merge-dora")
    save_tiny_model_dir(root / "model")
    make_dora_adapter(root / "model", root / "d", seed=1)
    return root


def test_dora_merge_is_verified_and_equals_peft(ws: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = merge([AdapterRef(ws / "d")], tmp_path / "ours", dtype="fp32")
    assert result.verification.ok and result.verification.max_abs_diff < 1e-4 and result.verification.adapter_effect > 0.1
    assert json.loads((tmp_path / "ours" / "lorakit_merge.json").read_text())["adapters"][0]["use_dora"] is True
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws / "model"), ws / "d").merge_and_unload()
    theirs = peft_merged.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.allclose(value, theirs[key], atol=1e-5), key
    adapted = load_model(str(ws / "model"), "fp32", with_tokenizer=False).model
    load_adapter(adapted, ws / "d")
    assert (logits(ours) - logits(adapted)).abs().max() < 1e-4


def test_gpt2_dora_merge_equals_peft(tmp_path: Path) -> None:
    import transformers as tf
    from peft import PeftModel

    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        tmp_path / "gpt2")
    make_dora_adapter(tmp_path / "gpt2", tmp_path / "ga", seed=4, targets=("c_attn", "c_fc"))
    result = merge([AdapterRef(tmp_path / "ga")], tmp_path / "gm", dtype="fp32")
    assert result.verification.ok
    ours = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "gm").state_dict()
    theirs = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2"),
                                       tmp_path / "ga").merge_and_unload().state_dict()
    for key, value in ours.items():
        assert torch.allclose(value, theirs[key], atol=1e-5), key


def test_qdora_adapter_is_merged_into_the_dequantized_base(ws: Path, tmp_path: Path) -> None:
    spec = QuantSpec("nf4", 64, True, torch.float32)
    make_dora_adapter(ws / "model", tmp_path / "qd", seed=3, quantization=spec)
    result = merge([AdapterRef(tmp_path / "qd")], tmp_path / "qm", dtype="fp32")
    assert result.verification.ok and result.dequantized_layers == 14
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "qm")
    qbase = load_model(str(ws / "model"), "fp32", with_tokenizer=False, quantization=spec).model
    load_adapter(qbase, tmp_path / "qd")
    assert (logits(merged) - logits(qbase)).abs().max() < 1e-4


def test_dora_is_merged_alone(ws: Path, tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="DoRA adapter"):
        merge([AdapterRef(ws / "d"), AdapterRef(ws / "d")], tmp_path / "two", dtype="fp32")


def test_cli_adapter_info_shows_dora(ws: Path) -> None:
    proc = run_cli("adapter", "info", str(ws / "d"))
    assert proc.returncode == 0, proc.stderr
    assert "method" in proc.stdout and "dora" in proc.stdout


def test_gguf_export_merges_dora_and_adapter_only_refuses_it(ws: Path, tmp_path: Path) -> None:
    from lorakit.export.gguf import export_gguf

    with pytest.raises(LorakitError, match="DoRA adapter; llama.cpp's LoRA GGUF has no magnitude vector"):
        export_gguf(None, tmp_path / "a.gguf", adapter=ws / "d", adapter_only=True)
    assert not (tmp_path / "a.gguf").exists()
    result = export_gguf(None, tmp_path / "m.gguf", adapter=ws / "d", kind="f16", pre="gpt-2")  # merged, verified
    assert (tmp_path / "m.gguf").exists() and result is not None
