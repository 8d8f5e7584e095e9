"""PEFT is the reference: it must load what we save, and we must load what it saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.adapters import inject_lora, load_adapter, lora_layers, save_adapter
from lorakit.adapters.state import adapter_info
from lorakit.errors import LorakitError
from tests.conftest import tiny_model

peft = pytest.importorskip("peft")


def _randomize(model: torch.nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize(
    ("arch", "targets", "rslora"),
    [
        ("llama", ["all-linear"], False),
        ("qwen2", ["q_proj", "v_proj"], True),
        ("gpt2", ["c_attn", "c_proj"], False),
        ("llama", [r"model\.layers\.1\.self_attn\.(k|o)_proj"], False),  # saved as an exact-path regex
    ],
)
def test_peft_loads_what_lorakit_saves(arch, targets, rslora, tmp_path: Path, input_ids) -> None:
    ours = tiny_model(arch)
    inject_lora(ours, targets, r=4, alpha=16, use_rslora=rslora)
    _randomize(ours)
    with torch.no_grad():
        expected = ours(input_ids=input_ids).logits
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=f"tiny-{arch}")
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "adapter")
    with torch.no_grad():
        got = theirs(input_ids=input_ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    # PEFT adapted exactly the layers we did.
    peft_layers = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {}))}
    assert peft_layers == {n for n, _ in lora_layers(ours)}


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_lorakit_loads_what_peft_saves(arch: str, tmp_path: Path, input_ids) -> None:
    from peft import LoraConfig, get_peft_model

    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM",
                     rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4},
                     fan_in_fan_out=arch == "gpt2")
    theirs = get_peft_model(tiny_model(arch), cfg)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=input_ids).logits
    theirs.save_pretrained(tmp_path / "peft-adapter")
    ours = tiny_model(arch)
    info = load_adapter(ours, tmp_path / "peft-adapter")
    with torch.no_grad():
        got = ours(input_ids=input_ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert info.num_params == sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)
    if arch != "gpt2":
        assert {layer.r for n, layer in lora_layers(ours) if n.endswith("down_proj")} == {2}


def test_round_trip_and_metadata(tmp_path: Path, input_ids) -> None:
    model = tiny_model("llama")
    inject_lora(model, ["all-linear"], r=4, alpha=8)
    _randomize(model)
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny", meta={"template": "chatml"})
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == "tiny"
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    info = adapter_info(tmp_path / "a")
    assert info.meta is not None and info.meta.template == "chatml" and len(info.modules) == 14
    fresh = tiny_model("llama")
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_adapter_for_another_model_is_rejected(tmp_path: Path) -> None:
    gpt2 = tiny_model("gpt2")
    inject_lora(gpt2, ["c_attn"], r=2, alpha=2)
    save_adapter(gpt2, tmp_path / "gpt2-adapter", base_model_name_or_path="tiny-gpt2")
    with pytest.raises(LorakitError, match="trained on base model tiny-gpt2"):
        load_adapter(tiny_model("llama"), tmp_path / "gpt2-adapter")


def test_broken_adapter_dirs(tmp_path: Path) -> None:
    model = tiny_model("llama")
    with pytest.raises(LorakitError, match="not found"):
        load_adapter(model, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorakitError, match="adapter_config.json"):
        load_adapter(model, tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(LorakitError, match="not valid JSON"):
        load_adapter(model, tmp_path / "bad")
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(LorakitError, match="DoRA"):
        load_adapter(model, tmp_path / "dora")


def test_save_refuses_to_overwrite_when_asked(tmp_path: Path) -> None:
    model = tiny_model("llama")
    inject_lora(model, ["q_proj"], r=2, alpha=2)
    save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "keep.txt").write_text("user file")
    with pytest.raises(LorakitError, match="already exists"):
        save_adapter(model, tmp_path / "a", overwrite=False)
    assert (tmp_path / "a" / "keep.txt").read_text() == "user file"
