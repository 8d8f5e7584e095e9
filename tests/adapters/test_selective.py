"""Selective fine-tuning: exactly the matched parameters train, the files round-trip, the base is checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.adapters.methods import describe, has_adapter, load_any, save_trained
from lorakit.adapters.selective import SELECTIVE_MANIFEST, prepare_selective, tensor_sha256
from lorakit.config import load_config
from lorakit.errors import ConfigError, LorakitError
from tests.conftest import tiny_model

LAST_BLOCK = r"model\.layers\.1\."


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def test_a_train_step_changes_exactly_the_matched_parameters(input_ids) -> None:
    model = tiny_model("qwen2")  # q/k/v have biases: BitFit has something to train
    names = prepare_selective(model, [r"\.bias$", r"norm\.weight$"])
    assert names and all(n.endswith(".bias") or n.endswith("norm.weight") for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in names), name  # no gradient anywhere else
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names)


def test_save_load_round_trip_and_manifest(tmp_path: Path, input_ids) -> None:
    model = tiny_model("llama")
    base_hash = tensor_sha256(model.get_parameter("model.layers.1.mlp.up_proj.weight"))
    names = prepare_selective(model, [LAST_BLOCK])
    with torch.no_grad():
        for n in names:
            model.get_parameter(n).add_(0.01 * torch.randn_like(model.get_parameter(n)))
    expected = logits(model, input_ids)
    assert has_adapter(model)
    save_trained(model, tmp_path / "s", "tiny-base", {"method": "selective", "base_model_revision": "abc123"})
    manifest = json.loads((tmp_path / "s" / SELECTIVE_MANIFEST).read_text())
    entry = manifest["tensors"]["model.layers.1.mlp.up_proj.weight"]
    assert entry == {"shape": [128, 64], "dtype": "float32", "base_dtype": "float32", "base_sha256": base_hash}
    assert manifest["base_model"] == "tiny-base" and manifest["base_model_revision"] == "abc123"
    assert set(manifest["tensors"]) == set(names) and manifest["patterns"] == [LAST_BLOCK]

    fresh = tiny_model("llama")
    assert sorted(load_any(fresh, tmp_path / "s").modules) == sorted(names)
    assert torch.equal(logits(fresh, input_ids), expected)
    assert not any(p.requires_grad for p in fresh.parameters())
    info = describe(tmp_path / "s")
    assert info.method == "selective" and info.num_params == sum(model.get_parameter(n).numel() for n in names)

    with pytest.raises(LorakitError, match="is not the base tensor it was trained on .* at revision abc123"):
        load_any(tiny_model("llama", seed=4), tmp_path / "s")  # another base
    with pytest.raises(LorakitError, match="which this model does not have"):
        load_any(tiny_model("gpt2"), tmp_path / "s")


def test_patterns_that_match_nothing_and_config_errors() -> None:
    with pytest.raises(LorakitError, match=r"adapter.trainable entry .*lyers.* matches no parameter; close names: "
                                           r".*model\.layers\.1\.self_attn\.q_proj\.weight"):
        prepare_selective(tiny_model("llama"), [r"lyers\.1\.q_proj"])
    with pytest.raises(ConfigError) as err:
        load_config(None, ["adapter.method=selective"])
    assert "adapter.trainable" in str(err.value) and "is empty" in str(err.value)
    with pytest.raises(ConfigError, match="use adapter.method: selective"):
        load_config(None, [r"adapter.trainable=['\.bias$']"])
    with pytest.raises(ConfigError, match="not a valid regex"):
        load_config(None, ["adapter.method=selective", "adapter.trainable=['(']"])
    with pytest.raises(ConfigError, match="trains base weights and a quantized base cannot be trained"):
        load_config(None, ["adapter.method=selective", r"adapter.trainable=['\.bias$']", "quantization.method=nf4"])
    cfg = load_config(None, ["adapter.method=selective", r"adapter.trainable=['\.bias$', 'norm\.weight$']"])
    assert cfg.adapter.trainable == [r"\.bias$", r"norm\.weight$"]


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    prepare_selective(model, [r"norm\.weight$"])
    save_trained(model, tmp_path / "s", "tiny")
    weights = load_file(str(tmp_path / "s" / "selective.safetensors"))
    weights.pop(next(iter(weights)))
    save_file(weights, str(tmp_path / "s" / "selective.safetensors"))
    with pytest.raises(LorakitError, match="is in only one of selective.safetensors and selective.json"):
        load_any(tiny_model("llama"), tmp_path / "s")
    (tmp_path / "s" / SELECTIVE_MANIFEST).write_text("{}")
    with pytest.raises(LorakitError, match="not a lorakit selective manifest"):
        load_any(tiny_model("llama"), tmp_path / "s")


def test_serve_refuses_a_selective_fine_tune(tmp_path: Path) -> None:
    from lorakit.serve.multi_lora import check_servable

    model = tiny_model("llama")
    prepare_selective(model, [r"norm\.weight$"])
    save_trained(model, tmp_path / "s", "tiny")
    with pytest.raises(LorakitError, match="is a selective fine-tune, which replaces base weights"):
        check_servable("s", tmp_path / "s")
