"""Layer-by-layer quantized loading (models.quantized): equal to quantizing a loaded model, dtypes, tied
embeddings, fallbacks, shards, the safetensors reader, peak memory."""

from __future__ import annotations

import struct

import pytest
import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.models.info import nf4_bytes
from lorakit.models.load import load_model
from lorakit.models.quantized import QuantSpec, iter_tensors, read_header
from lorakit.quant import Int8Linear, NF4Linear, quantize_model_linears
from tests.conftest import tiny_model

FP32 = torch.float32


def _quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_streamed_load_equals_quantizing_the_loaded_model(tmp_path, arch, method):
    tiny_model(arch).save_pretrained(tmp_path / "m")
    spec = QuantSpec(method, 64, True, FP32)
    loaded = load_model(str(tmp_path / "m"), "fp32", with_tokenizer=False, quantization=spec)
    assert loaded.quantization["streamed"] is True
    reference = tiny_model(arch)
    n = quantize_model_linears(reference, method, 64, True, FP32)
    assert loaded.quantization["quantized_layers"] == n > 0
    got, want = _quant_state(loaded.model), _quant_state(reference)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key  # bit for bit: codes, scales, embeddings, norms
    cls = Int8Linear if method == "int8" else NF4Linear
    assert sum(isinstance(m, cls) for m in loaded.model.modules()) == n
    head = loaded.model.get_output_embeddings()
    assert type(head) is nn.Linear  # the output head stays full precision
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)
        full = tiny_model(arch)(ids).logits
    error = (loaded.model(ids).logits - full).abs().mean() / full.abs().mean()
    assert 0 < float(error) < {"nf4": 0.2, "fp4": 0.3, "int8": 0.02}[method]  # quantized, and still the same model


def test_streamed_load_casts_the_rest_to_the_model_dtype(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "m")  # fp32 checkpoint
    model = load_model(str(tmp_path / "m"), "bf16", with_tokenizer=False, quantization=QuantSpec("nf4")).model
    ref = tiny_model("llama")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight.to(torch.bfloat16))
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)  # real, not meta


def test_tied_embeddings_stay_tied_and_unquantized(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    assert "lm_head.weight" not in read_header(tmp_path / "m" / "model.safetensors")[0]
    model = load_model(str(tmp_path / "m"), "fp32", with_tokenizer=False, quantization=QuantSpec("nf4")).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_checkpoint_with_unknown_names_falls_back_to_a_full_load(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model("llama").save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(path)
    state["model.extra_thing.weight"] = torch.zeros(3)
    save_file(state, path, metadata={"format": "pt"})
    loaded = load_model(str(tmp_path / "m"), "fp32", with_tokenizer=False, quantization=QuantSpec("nf4", compute_dtype=FP32))
    assert loaded.quantization["streamed"] is False  # transformers loaded it, then we quantized
    reference = tiny_model("llama")
    quantize_model_linears(reference, "nf4", 64, True, FP32)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)


def test_sharded_checkpoint_streams(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path / "m", max_shard_size="40KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    loaded = load_model(str(tmp_path / "m"), "fp32", with_tokenizer=False, quantization=QuantSpec("int8", compute_dtype=FP32))
    assert loaded.quantization["streamed"] is True
    reference = tiny_model("qwen2")
    quantize_model_linears(reference, "int8", compute_dtype=FP32)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_reader_matches_safetensors_and_reports_truncation(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4, dtype=torch.int64),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "t.safetensors")
    got = dict(iter_tensors(tmp_path / "t.safetensors"))
    want = load_file(tmp_path / "t.safetensors")
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    cast = dict(iter_tensors(tmp_path / "t.safetensors", {"a": torch.bfloat16}))
    assert cast["a"].dtype == torch.bfloat16 and torch.equal(cast["a"], want["a"].to(torch.bfloat16))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(LorakitError, match="outside the 96 data bytes"):  # a truncated file
        list(iter_tensors(tmp_path / "cut.safetensors"))
    (tmp_path / "short.safetensors").write_bytes(struct.pack("<I", 3))
    with pytest.raises(LorakitError, match="not a valid safetensors file"):
        read_header(tmp_path / "short.safetensors")


def test_load_peak_memory_stays_near_the_quantized_size(tmp_path):
    """A model whose fp32 linears weigh 201 MB loads as NF4 with well under that in extra peak RSS."""
    import subprocess
    import sys

    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=8)
    model = tf.LlamaForCausalLM(cfg)
    linear_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    model.save_pretrained(tmp_path / "m")
    del model
    script = f"""
import resource, sys, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
from lorakit.models.load import load_model
from lorakit.models.quantized import QuantSpec
from lorakit.memory import rss_mb, peak_rss_mb, reset_peak
AutoConfig.from_pretrained({str(tmp_path / 'm')!r})
assert reset_peak()  # imports peak briefly above what they keep
before = rss_mb()
quant = sys.argv[1] == "nf4"
m = load_model({str(tmp_path / 'm')!r}, "fp32", with_tokenizer=False, quantization=QuantSpec("nf4") if quant else None)
sum(float(t.float().sum()) for t in m.model.state_dict().values())  # fault in lazily mapped weights
print(int((peak_rss_mb() - before) * 2**20))
"""
    peaks = {}
    for mode in ("nf4", "fp32"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        peaks[mode] = int(out.stdout.strip().splitlines()[-1])
    nf4_size = nf4_bytes(linear_bytes // 4)
    assert peaks["fp32"] > linear_bytes  # the full-precision model holds every weight
    # quantized load: the NF4 weights plus transients of one layer, far from the fp32 size
    assert peaks["nf4"] < 0.5 * linear_bytes, (peaks, linear_bytes, nf4_size)


