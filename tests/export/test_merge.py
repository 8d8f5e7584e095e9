"""`lorakit merge`: fp32 math, verified, PEFT-equal, scalable, multi-adapter, QLoRA bases, safe writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.adapters import inject_lora, lora_layers, save_adapter
from lorakit.errors import LorakitError
from lorakit.export.merge import AdapterRef, merge, parse_adapter_arg
from lorakit.models.load import load_model
from tests.conftest import run_cli, save_tiny_model_dir, tiny_lm_for, tiny_tokenizer


def make_adapter(model_dir: Path, out: Path, seed: int, targets=("all-linear",), r: int = 4, alpha: float = 8.0,
                 meta: dict | None = None, quantization=None) -> Path:
    loaded = load_model(str(model_dir), "fp32", with_tokenizer=False, quantization=quantization)
    inject_lora(loaded.model, list(targets), r=r, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(loaded.model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    save_adapter(loaded.model, out, str(model_dir), meta)
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("merge")
    save_tiny_model_dir(root / "model")
    make_adapter(root / "model", root / "a", seed=1)
    make_adapter(root / "model", root / "b", seed=2, targets=("q_proj", "v_proj"), r=2, alpha=4)
    return root


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))


def adapted(ws: Path, *adapters: str) -> nn.Module:
    from lorakit.adapters import load_adapter

    model = load_model(str(ws / "model"), "fp32", with_tokenizer=False).model
    for a in adapters:
        load_adapter(model, ws / a)
    return model


def test_fp32_merge_equals_base_plus_adapter_and_loads_with_plain_transformers(ws: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = merge([AdapterRef(ws / "a")], tmp_path / "merged", dtype="fp32")
    assert result.base_model == str(ws / "model") and result.merged_layers == 14
    assert result.verification.ok and result.verification.max_abs_diff < 1e-4
    assert result.verification.adapter_effect > 0.1
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(plain, IDS) - logits(adapted(ws, "a"), IDS)).abs().max() < 1e-4
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "generation_config.json", "README.md", "tokenizer.json", "lorakit_merge.json"} <= files
    assert any(name.endswith(".safetensors") for name in files)
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.chat_template == tiny_tokenizer().chat_template
    card = (tmp_path / "merged" / "README.md").read_text()
    assert str(ws / "model") in card and "| 4 | 8" in card and "scale 1" in card


def test_bf16_merge_is_within_tolerance(ws: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    result = merge([AdapterRef(ws / "a")], tmp_path / "m16", dtype="bf16")
    assert result.verification.ok and result.verification.top1_agreement >= 0.9
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m16")
    assert plain.dtype == torch.bfloat16
    ref = logits(adapted(ws, "a"), IDS)
    agree = (logits(plain, IDS).argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.9


def test_equals_peft_merge_and_unload(ws: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merge([AdapterRef(ws / "a")], tmp_path / "ours", dtype="fp32")
    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws / "model"), ws / "a").merge_and_unload()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    theirs = peft_merged.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.allclose(value, theirs[key], atol=1e-6), key


def test_scale_is_linear_and_zero_gives_the_base(ws: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(ws / "model").state_dict()
    merge([AdapterRef(ws / "a")], tmp_path / "s0", dtype="fp32", scale=0.0)
    zero = AutoModelForCausalLM.from_pretrained(tmp_path / "s0").state_dict()
    assert all(torch.equal(zero[k], base[k]) for k in base)
    merge([AdapterRef(ws / "a")], tmp_path / "s1", dtype="fp32", scale=1.0)
    merge([AdapterRef(ws / "a")], tmp_path / "s2", dtype="fp32", scale=2.0)
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "s1").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "s2").state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(two[key] - base[key], 2 * (one[key] - base[key]), atol=1e-6)
    # --alpha replaces lora_alpha: alpha 4 on an r=4 adapter trained with alpha 8 is half the update
    merge([AdapterRef(ws / "a")], tmp_path / "a4", dtype="fp32", alpha=4.0)
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "a4").state_dict()
    assert torch.allclose(half[key] - base[key], 0.5 * (one[key] - base[key]), atol=1e-6)


def test_weighted_merge_of_two_adapters(ws: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(ws / "model").state_dict()
    result = merge([parse_adapter_arg(f"{ws / 'a'}:0.7"), parse_adapter_arg(f"{ws / 'b'}:0.3")], tmp_path / "ab",
                   dtype="fp32")
    assert result.verification.ok and result.merged_layers == 14
    merge([AdapterRef(ws / "a")], tmp_path / "only_a", dtype="fp32")
    merge([AdapterRef(ws / "b")], tmp_path / "only_b", dtype="fp32")
    ab, a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / n).state_dict() for n in ("ab", "only_a", "only_b"))
    for key in ("model.layers.1.self_attn.v_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        expect = base[key] + 0.7 * (a[key] - base[key]) + 0.3 * (b[key] - base[key])
        assert torch.allclose(ab[key], expect, atol=1e-6), key


def test_qlora_adapter_is_merged_into_the_dequantized_base(ws: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lorakit.models.quantized import QuantSpec

    q = {"method": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "bfloat16"}
    make_adapter(ws / "model", tmp_path / "qa", seed=3, meta={"quantization": q},
                 quantization=QuantSpec("nf4", 64, True, torch.float32))
    result = merge([AdapterRef(tmp_path / "qa")], tmp_path / "qm", dtype="fp32")
    assert result.dequantized_layers == 14 and result.verification.ok
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "qm")
    assert all(type(m) is not __import__("lorakit").quant.NF4Linear for m in merged.modules())
    # the merged model is the NF4 base + adapter (what was trained), not the fp32 base + adapter
    from lorakit.adapters import load_adapter

    qbase = load_model(str(ws / "model"), "fp32", with_tokenizer=False,
                       quantization=QuantSpec("nf4", 64, True, torch.float32)).model
    load_adapter(qbase, tmp_path / "qa")
    assert torch.allclose(logits(merged, IDS), logits(qbase, IDS), atol=1e-4)
    assert json.loads((tmp_path / "qm" / "lorakit_merge.json").read_text())["dequantized_layers"] == 14


def test_gpt2_conv1d_merge_equals_peft(tmp_path: Path) -> None:
    import transformers as tf
    from peft import PeftModel

    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        tmp_path / "gpt2")
    make_adapter(tmp_path / "gpt2", tmp_path / "ga", seed=4, targets=("c_attn", "c_fc"))
    merge([AdapterRef(tmp_path / "ga")], tmp_path / "gm", dtype="fp32")
    ours = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "gm").state_dict()
    theirs = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2"),
                                       tmp_path / "ga").merge_and_unload().state_dict()
    for key, value in ours.items():
        assert torch.allclose(value, theirs[key], atol=1e-6), key


def test_nan_adapter_aborts_naming_adapter_and_layer(ws: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    import shutil

    shutil.copytree(ws / "a", tmp_path / "bad")
    weights = load_file(tmp_path / "bad" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    weights[key][0, 0] = float("nan")
    save_file(weights, tmp_path / "bad" / "adapter_model.safetensors")
    # refused when the adapter is read, naming the file and the layer's tensor (before any merge arithmetic)
    with pytest.raises(LorakitError, match=r"bad.*model\.layers\.1\.mlp\.down_proj\.lora_B\.weight has 1 NaN/inf"):
        merge([AdapterRef(tmp_path / "bad")], tmp_path / "out", dtype="fp32")
    assert not (tmp_path / "out").exists()


def test_cli_merge_refuses_to_overwrite_and_reports_errors(ws: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-out"
    proc = run_cli("merge", "--adapter", str(ws / "a"), "--out", str(out), "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    assert "verified: max |logit diff|" in proc.stdout and "top-1 agreement 100.0%" in proc.stdout
    before = (out / "README.md").read_text()
    proc = run_cli("merge", "--adapter", str(ws / "a"), "--out", str(out), "--scale", "0.5")
    assert proc.returncode == 2 and "already exists; choose another --out, or pass --force" in proc.stderr
    assert (out / "README.md").read_text() == before  # untouched
    proc = run_cli("merge", "--adapter", str(ws / "a"), "--out", str(out), "--scale", "0.5", "--force")
    assert proc.returncode == 0, proc.stderr
    assert "scale 0.5" in (out / "README.md").read_text()
    for args, message in [
        (["--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "adapter directory not found"),
        (["--adapter", str(ws / "a"), "--out", str(tmp_path / "x"), "--dtype", "int4"], "--dtype 'int4' is not supported"),
        (["--adapter", str(ws / "a"), "--out", str(tmp_path / "x"), "--alpha", "4", "--scale", "2"], "not both"),
    ]:
        proc = run_cli("merge", *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_adapter_on_the_wrong_base_is_refused(ws: Path, tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(LorakitError, match="does not have|another model"):
        merge([AdapterRef(ws / "a")], tmp_path / "o", model=str(tmp_path / "other"))
