"""Per-row adapters: each row of a mixed batch gets exactly its own adapter's (or the base's) output."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.serve.multi_lora import AdapterBank, MultiLoRALinear
from tests.serve.conftest import Served


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_mixed_batch_rows_equal_each_adapter_alone(served: Served) -> None:
    from lorakit.adapters import load_adapter
    from lorakit.models.load import load_model

    ids = torch.randint(0, 300, (5, 9), generator=torch.Generator().manual_seed(3))
    base = load_model(str(served.model), "fp32", with_tokenizer=False).model
    expected = {-1: logits(base, ids)}
    for slot, name in enumerate(["alpha", "beta"]):
        alone = load_model(str(served.model), "fp32", with_tokenizer=False).model
        load_adapter(alone, served.adapters[name])  # lorakit's own LoRALinear, unmerged
        expected[slot] = logits(alone, ids)
    bank = AdapterBank(base)
    for name in ("alpha", "beta"):
        bank.add(name, served.adapters[name])
    assert any(isinstance(m, MultiLoRALinear) for m in base.modules())
    slots = [1, -1, 0, 1, 0]
    bank.rows.set(slots)
    mixed = logits(base, ids)
    for row, slot in enumerate(slots):
        torch.testing.assert_close(mixed[row], expected[slot][row], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0], expected[-1], atol=1e-3)  # the adapters change the output
    bank.rows.set([-1] * 5)
    assert torch.equal(logits(base, ids), expected[-1])  # base rows: the base model, bit for bit
    bank.rows.set([0] * 5)  # one adapter for the whole batch (no row indexing)
    torch.testing.assert_close(logits(base, ids), expected[0], rtol=1e-5, atol=1e-5)
    bank.remove("alpha")
    assert torch.equal(logits(base, ids), expected[-1])  # an unloaded slot adds nothing


def test_adapters_for_another_base_and_pickles_are_refused(served: Served, tmp_path: Path) -> None:
    import transformers as tf

    from lorakit.models.load import load_model
    from tests.conftest import tiny_model

    with pytest.raises(LorakitError, match="does not have"):
        AdapterBank(tiny_model("gpt2")).add("beta", served.adapters["beta"])  # other module names
    narrow = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(LorakitError, match="another base model"):
        AdapterBank(narrow).add("beta", served.adapters["beta"])  # same names, other shapes
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(served.adapters["alpha"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"x")
    bank = AdapterBank(load_model(str(served.model), "fp32", with_tokenizer=False).model)
    with pytest.raises(LorakitError, match="safetensors"):
        bank.add("pickled", pickled)
    bank.add("alpha", served.adapters["alpha"])
    with pytest.raises(LorakitError, match="already served"):
        bank.add("alpha", served.adapters["alpha"])
