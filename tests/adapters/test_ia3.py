"""IA3 (Liu et al. 2022): PEFT's targets, files both ways, merge, NF4 bases, refusals — against PEFT itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.adapters.ia3 import IA3Linear, ia3_layers
from lorakit.adapters.inject import adapters_disabled, inject_ia3, unwrap_ia3
from lorakit.adapters.methods import describe, load_any, save_trained
from lorakit.errors import LorakitError
from tests.conftest import tiny_model

peft = pytest.importorskip("peft")


def randomize(model: nn.Module, seed: int = 3) -> None:
    """Vectors away from 1, so every scale matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in ia3_layers(model):
            layer.ia3_l.copy_(1 + 0.3 * torch.randn(layer.ia3_l.shape, generator=g))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_defaults_files_and_merge_agree_with_peft(arch: str, tmp_path: Path, input_ids) -> None:
    from peft import IA3Config, get_peft_model

    ours = tiny_model(arch)
    names = inject_ia3(ours, ["all-linear"], None)
    theirs = get_peft_model(tiny_model(arch), IA3Config(task_type="CAUSAL_LM"))  # PEFT's own defaults
    peft_layers = {n.removeprefix("base_model.model.").removesuffix(".ia3_l.default"): p.shape
                   for n, p in theirs.named_parameters() if "ia3_l" in n}
    assert {n: layer.ia3_l.shape for n, layer in ia3_layers(ours)} == peft_layers  # same layers, same sides
    assert names == list(peft_layers)
    randomize(ours)
    expected = logits(ours, input_ids)
    assert (expected - logits(tiny_model(arch), input_ids)).abs().max() > 1e-2  # the vectors do something

    save_trained(ours, tmp_path / "ours", None, {"method": "ia3"})
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"]
    loaded = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ours")  # PEFT reads ours
    assert (logits(loaded, input_ids) - expected).abs().max() <= 1e-5

    loaded.save_pretrained(tmp_path / "peft")  # lorakit reads PEFT's
    back = tiny_model(arch)
    info = load_any(back, tmp_path / "peft")
    assert (logits(back, input_ids) - expected).abs().max() <= 1e-5
    assert info.method == "ia3" and len(info.feedforward) == 2 and info.num_params == sum(
        p.numel() for n, p in loaded.named_parameters() if "ia3_l" in n)

    merged_peft = logits(loaded.merge_and_unload(), input_ids)
    unwrap_ia3(back)
    assert not list(ia3_layers(back))
    assert (logits(back, input_ids) - expected).abs().max() <= 1e-5  # merge exact
    assert (logits(back, input_ids) - merged_peft).abs().max() <= 1e-5  # and equal to PEFT's merge


def test_gradients_reach_only_the_vectors_and_switching_off_gives_the_base(input_ids) -> None:
    model = tiny_model("llama")
    base = logits(model, input_ids)
    inject_ia3(model, ["all-linear"], None)
    assert (logits(model, input_ids) - base).abs().max() == 0  # ones: the base exactly
    randomize(model)
    with adapters_disabled(model):
        assert (logits(model, input_ids) - base).abs().max() == 0
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.endswith("ia3_l"), name
    assert all(layer.ia3_l.grad.abs().sum() > 0 for _, layer in ia3_layers(model))


def test_merge_and_unmerge_round_trip(input_ids) -> None:
    model = tiny_model("gpt2")  # Conv1D weights and biases: the output scale reaches the bias too
    inject_ia3(model, ["all-linear"], None)
    randomize(model)
    expected = logits(model, input_ids)
    layers = [layer for _, layer in ia3_layers(model)]
    for layer in layers:
        layer.merge()
        layer.merge()  # idempotent
    assert (logits(model, input_ids) - expected).abs().max() <= 1e-5
    weights = [layer.base_layer.weight.clone() for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.unmerge()
    assert all(not torch.equal(w, layer.base_layer.weight) for w, layer in zip(weights, layers))
    assert (logits(model, input_ids) - expected).abs().max() <= 1e-5


def test_ia3_on_nf4_equals_ia3_on_the_dequantized_weight(input_ids) -> None:
    from lorakit.export.merge import dequantize_all
    from lorakit.quant.linear import QuantizedLinear, quantize_model_linears

    quantized = tiny_model("llama")
    quantize_model_linears(quantized, "nf4", 64, True, torch.float32)
    inject_ia3(quantized, ["all-linear"], None)
    randomize(quantized)
    assert all(isinstance(layer.base_layer, QuantizedLinear) for _, layer in ia3_layers(quantized))
    plain = tiny_model("llama")
    quantize_model_linears(plain, "nf4", 64, True, torch.float32)
    dequantize_all(plain)  # the same base: the NF4 weights, dequantized once
    inject_ia3(plain, ["all-linear"], None)
    randomize(plain)
    assert (logits(quantized, input_ids) - logits(plain, input_ids)).abs().max() <= 1e-5
    for model in (quantized, plain):
        model.train()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    for (name, q), (_, p) in zip(ia3_layers(quantized), ia3_layers(plain)):
        assert torch.allclose(q.ia3_l.grad, p.ia3_l.grad, atol=1e-5, rtol=1e-4), name
    with pytest.raises(LorakitError, match="quantized base layer"):
        next(ia3_layers(quantized))[1].merge()
    expected = logits(quantized.eval(), input_ids)
    unwrap_ia3(quantized)  # dequantized and merged in fp32 into plain layers
    assert not any(isinstance(m, QuantizedLinear) for m in quantized.modules() if isinstance(m, IA3Linear))
    assert (logits(quantized, input_ids) - expected).abs().max() <= 1e-5


def test_targets_feedforward_and_damaged_files(tmp_path: Path) -> None:
    model = tiny_model("llama")
    names = inject_ia3(model, ["q_proj", "up_proj"], ["up_proj"])
    assert [n.rsplit(".", 1)[1] for n in names] == ["q_proj", "up_proj"] * 2
    assert [layer.feedforward for _, layer in ia3_layers(model)] == [False, True] * 2
    with pytest.raises(LorakitError, match="feedforward_modules select .*down_proj.*which adapter.target_modules do not"):
        inject_ia3(tiny_model("llama"), ["q_proj"], ["down_proj"])
    with pytest.raises(LorakitError, match="already has an adapter"):
        inject_ia3(model, ["q_proj"], None)
    randomize(model)
    save_trained(model, tmp_path / "a", "tiny")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = next(iter(weights))
    weights[key] = torch.ones(3, 1)
    save_file(weights, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(LorakitError, match="IA3 vector of shape \\(3, 1\\).*another base model"):
        load_any(tiny_model("llama"), tmp_path / "a")
    assert describe(tmp_path / "a").method == "ia3"


def test_serve_and_adapter_only_gguf_refuse_ia3_and_adapter_info_shows_it(tmp_path: Path, capsys) -> None:
    from lorakit import cli
    from lorakit.export.gguf import export_gguf
    from lorakit.serve.multi_lora import check_servable

    model = tiny_model("llama")
    inject_ia3(model, ["all-linear"], None)
    save_trained(model, tmp_path / "a", "tiny")
    with pytest.raises(SystemExit) as exc:
        cli.main(["adapter", "info", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "ia3 (PEFT IA3" in out and "2 layers scale their input, 4 their output" in out
    with pytest.raises(LorakitError, match="IA3 rescales the base layer itself; merge it"):
        check_servable("x", tmp_path / "a")
    with pytest.raises(LorakitError, match="is an IA3 adapter; llama.cpp's LoRA GGUF holds LoRA A/B matrices only"):
        export_gguf(None, tmp_path / "a.gguf", adapter=tmp_path / "a", adapter_only=True)
