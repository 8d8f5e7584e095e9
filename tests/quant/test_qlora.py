"""QLoRA end to end: config, layer-by-layer quantized loading, info, training, adapters, merge."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lorakit.adapters import inject_lora, load_adapter, lora_layers, unwrap_lora
from lorakit.config import load_config
from lorakit.errors import ConfigError, LorakitError
from lorakit.models.info import measure_quantized, nf4_bytes
from lorakit.models.load import load_model, quant_spec
from lorakit.models.quantized import QuantSpec, iter_tensors, read_header
from lorakit.quant import Int8Linear, NF4Linear, quantize_model_linears
from tests.conftest import run_cli, save_tiny_model_dir, tiny_model
from tests.train.test_train_cli import train_losses, write_chat_data

FP32 = torch.float32


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------- config


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
    with pytest.raises(ConfigError, match="adapter.method full trains every weight"):
        load_config(None, ["adapter.method=full", "quantization.method=nf4"])


def test_quant_spec_from_config():
    assert quant_spec(load_config(None).quantization) is None
    spec = quant_spec(load_config(None, ["quantization.method=nf4", "quantization.compute_dtype=fp32",
                                         "quantization.blocksize=128", "quantization.double_quant=false"]).quantization)
    assert (spec.method, spec.blocksize, spec.double_quant, spec.compute_dtype) == ("nf4", 128, False, FP32)


# ----------------------------------------------------------------------------- loading


def _quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", ["nf4", "int8"])
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
    cls = NF4Linear if method == "nf4" else Int8Linear
    assert sum(isinstance(m, cls) for m in loaded.model.modules()) == n
    head = loaded.model.get_output_embeddings()
    assert type(head) is nn.Linear  # the output head stays full precision
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)
        full = tiny_model(arch)(ids).logits
    error = (loaded.model(ids).logits - full).abs().mean() / full.abs().mean()
    assert 0 < float(error) < (0.2 if method == "nf4" else 0.02)  # quantized, and still the same model


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


# ----------------------------------------------------------------------------- info


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


# ----------------------------------------------------------------------------- adapters and merge


def test_merge_of_a_qlora_adapter_dequantizes_into_fp32():
    model = tiny_model("llama")
    quantize_model_linears(model, "nf4", compute_dtype=FP32)
    inject_lora(model, ["all-linear"], r=4, alpha=8)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.05)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        before = model(ids).logits
    name, layer = next(lora_layers(model))
    with pytest.raises(LorakitError, match="quantized base layer"):
        layer.merge()  # never silently back into 4 bits
    unwrap_lora(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules() if m is not model.lm_head)
    merged = model.get_submodule(name)
    assert type(merged) is nn.Linear and merged.weight.dtype == FP32
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4)


def test_qlora_training_through_the_cli(tmp_path):
    """A tiny model trained with QLoRA: loss goes down, the adapter records the quantization and round-trips."""
    save_tiny_model_dir(tmp_path / "model")
    write_chat_data(tmp_path / "train.jsonl")
    cfg = write_yaml(tmp_path / "qlora.yaml", {
        "model": {"name": str(tmp_path / "model"), "dtype": "fp32"},
        "adapter": {"method": "qlora", "r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"compute_dtype": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 64, "eval_ratio": 0.25},
        "train": {"max_steps": 30, "batch_size": 4, "lr": 2e-2, "log_every": 1, "precision": "fp32", "warmup_steps": 2},
        "output_dir": str(tmp_path / "run"),
    })
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "quantized 14 linear layers to nf4" in proc.stdout
    losses = train_losses(tmp_path / "run")
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < 0.7 * first, (first, last)
    meta = json.loads((tmp_path / "run" / "adapter" / "lorakit.json").read_text())
    assert meta["method"] == "qlora"
    assert meta["quantization"]["method"] == "nf4" and meta["quantization"]["blocksize"] == 64
    assert meta["quantization"]["double_quant"] is True
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["quantization"]["method"] == "nf4"

    # the adapter loads onto a freshly quantized base and reproduces the trained model's eval loss
    from lorakit.config import load_config as lc
    from lorakit.data import build_datasets, make_batches, pack_examples
    from lorakit.train.loop import evaluate
    from lorakit.train.loss import fast_loss_sum

    run_cfg = lc(tmp_path / "run" / "config.yaml")
    loaded = load_model(str(tmp_path / "model"), "fp32", quantization=quant_spec(run_cfg.quantization))
    load_adapter(loaded.model, tmp_path / "run" / "adapter")
    data = build_datasets(run_cfg.data, loaded.tokenizer, run_cfg.seed)
    items = pack_examples(data.eval, run_cfg.data.max_length, run_cfg.seed)
    batches = make_batches(items, 4, loaded.tokenizer.pad_token_id, run_cfg.seed, 0, shuffle=False)
    import contextlib

    loss = evaluate(loaded.model, fast_loss_sum, batches, contextlib.nullcontext)
    recorded = json.loads((tmp_path / "run" / "eval.json").read_text())["eval_loss"]
    assert loss == pytest.approx(recorded, rel=1e-5)
    # and onto the full-precision base, where it still helps (the base differs by the quantization error)
    full = load_model(str(tmp_path / "model"), "fp32").model
    base_loss = evaluate(full, fast_loss_sum, batches, contextlib.nullcontext)
    load_adapter(full, tmp_path / "run" / "adapter")
    assert evaluate(full, fast_loss_sum, batches, contextlib.nullcontext) < base_loss


def test_qlora_errors(tmp_path):
    save_tiny_model_dir(tmp_path / "model")
    write_chat_data(tmp_path / "train.jsonl")
    cfg = write_yaml(tmp_path / "bad.yaml", {
        "model": {"name": str(tmp_path / "model")},
        "adapter": {"method": "full"},
        "quantization": {"method": "nf4"},
        "data": {"train": str(tmp_path / "train.jsonl")},
        "output_dir": str(tmp_path / "run"),
    })
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "a quantized base cannot be trained" in proc.stderr
    assert not (tmp_path / "run").exists()
