"""quantize_model_linears on a tiny seeded Llama: what is replaced, what runs, what is freed."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant import Int8Linear, NF4Linear, quantize_model_linears

transformers = pytest.importorskip("transformers")


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config)


IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("method", "cls", "max_err"), [("nf4", NF4Linear, 0.3), ("int8", Int8Linear, 0.05)])
def test_replaces_all_linears_but_the_head_and_still_trains(method, cls, max_err):
    model = tiny_llama()
    with torch.no_grad():
        before = model(IDS).logits
    q_proj_weight = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)

    count = quantize_model_linears(model, method)

    assert count == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert q_proj_weight() is None  # the full-precision weight is gone
    assert type(model.lm_head) is nn.Linear
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears == ["lm_head"]
    assert sum(isinstance(m, cls) for m in model.modules()) == count

    out = model(IDS, labels=IDS)
    assert (out.logits - before).abs().max().item() < max_err
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # gradient crossed every quantized layer


def test_skip_by_last_name_or_full_name():
    model = tiny_llama()
    count = quantize_model_linears(model, "nf4", skip={"down_proj", "model.layers.0.self_attn.q_proj"})
    assert count == 14 - 2 - 1
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(model.model.layers[1].self_attn.q_proj) is NF4Linear


def test_options_reach_the_layers():
    model = tiny_llama()
    quantize_model_linears(model, "nf4", blocksize=128, double_quant=False, compute_dtype=torch.float32)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.blocksize == 128 and not layer.double_quant and layer.compute_dtype == torch.float32


def test_lora_layers_and_plain_modules():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.lora_A = nn.Linear(8, 2, bias=False)

    block = Block()
    assert quantize_model_linears(block, "int8") == 1  # no get_output_embeddings: nothing else skipped
    assert type(block.lora_A) is nn.Linear and type(block.proj) is Int8Linear


def test_bad_arguments():
    with pytest.raises(LorakitError, match="method 'nf8'.*nf4, fp4 or int8"):
        quantize_model_linears(nn.Linear(4, 4), "nf8")  # type: ignore[arg-type]
    with pytest.raises(LorakitError, match="blocksize 100"):
        quantize_model_linears(tiny_llama(), "nf4", blocksize=100)


def test_each_weight_is_freed_before_the_next_layer_is_quantized(monkeypatch):
    model = tiny_llama()
    layers = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    refs = [weakref.ref(m.weight) for m in layers]
    del layers
    alive_at_each_call = []
    original = NF4Linear.from_linear.__func__

    def spy(cls, linear, *args, **kwargs):
        alive_at_each_call.append(sum(r() is not None for r in refs))
        return original(cls, linear, *args, **kwargs)

    monkeypatch.setattr(NF4Linear, "from_linear", classmethod(spy))
    quantize_model_linears(model, "nf4")
    assert alive_at_each_call == list(range(14, 0, -1))
    assert all(r() is None for r in refs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_cuda_memory_stays_near_the_model_size():
    model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(16)]).cuda()
    full = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    assert quantize_model_linears(model, "nf4") == 16
    assert torch.cuda.max_memory_allocated() < 1.5 * full  # one layer's temporaries, never a 2nd model
    assert torch.cuda.memory_allocated() < full / 6  # ~4.1 of 32 bits left
    model(torch.randn(2, 1024, device="cuda")).sum()


def test_a_linear_shared_by_two_parents_is_replaced_in_both():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    assert quantize_model_linears(model, "nf4", compute_dtype=torch.float32) == 1
    assert model[0][0] is model[1][0] and isinstance(model[0][0], NF4Linear)
    model(torch.randn(2, 8))
