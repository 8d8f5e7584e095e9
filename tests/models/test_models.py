"""Resolving and loading base models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.models import describe_model, load_model, resolve_model
from lorakit.models.info import nf4_bytes
from tests.conftest import run_cli, tiny_model


def test_resolve_kinds(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert resolve_model(str(tiny_model_dir)).kind == "dir"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)).kind == "gguf"
    with pytest.raises(LorakitError, match="model path not found: ./nope"):
        resolve_model("./nope")
    with pytest.raises(LorakitError, match="GGUF file not found"):
        resolve_model("missing.gguf")
    with pytest.raises(LorakitError, match="not a builtin alias"):
        resolve_model("smollm")
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(LorakitError, match="no config.json"):
        resolve_model(str(tmp_path / "notamodel"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(LorakitError, match="is a LoRA adapter, not a model"):
        resolve_model(str(tmp_path / "adapter"))


def test_load_local_dir_and_dtype(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), dtype="bf16", with_tokenizer=False)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert not loaded.model.training
    fp32 = load_model(str(tiny_model_dir), dtype="auto", with_tokenizer=False).model
    reference = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(fp32(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_describe_tiny(tiny_model_dir: Path) -> None:
    info = describe_model(str(tiny_model_dir))
    assert info.architecture == "LlamaForCausalLM"
    assert info.num_params == sum(p.numel() for p in tiny_model("llama").parameters())
    assert info.head_names == ["lm_head"]
    assert len(info.linear_names) == 15
    assert info.weight_bytes["bf16"] * 2 == info.weight_bytes["fp32"]
    assert info.weight_bytes["nf4"] < info.weight_bytes["int8"] < info.weight_bytes["bf16"]


def test_nf4_bytes_match_the_paper() -> None:
    n = 1024 * 1024
    assert nf4_bytes(n) * 8 / n == pytest.approx(4.127, abs=0.001)
    assert nf4_bytes(n, double_quant=False) * 8 / n == pytest.approx(4.5)


def test_cli_info_and_adapter_info(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc = run_cli("info", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    assert "LlamaForCausalLM" in proc.stdout and "q_proj (2)" in proc.stdout and "nf4" in proc.stdout
    from lorakit.adapters import inject_lora, save_adapter
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    inject_lora(model, ["all-linear"], r=8, alpha=16)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_model_dir))
    proc = run_cli("adapter", "info", str(tmp_path / "adapter"))
    assert proc.returncode == 0, proc.stderr
    assert "r=8, alpha=16" in proc.stdout and "14 adapted layers" in proc.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["info", "./no/such/model"], "model path not found"),
        (["info", "not-a-model"], "not a builtin alias"),
        (["adapter", "info", "/no/such/adapter"], "adapter directory not found"),
    ],
)
def test_cli_bad_paths(args: list[str], needle: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and needle in proc.stderr


@pytest.mark.slow
def test_builtin_smollm2_info() -> None:
    from lorakit.models.resolve import BUILTINS, builtin_path

    try:
        builtin_path("smollm2-135m-instruct")
    except LorakitError as err:
        pytest.skip(str(err))
    assert "smollm2-135m-instruct" in BUILTINS
    proc = run_cli("info", "smollm2-135m-instruct", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "134,515,008" in proc.stdout and "134.5M" in proc.stdout
    for name in ("q_proj (30)", "k_proj (30)", "v_proj (30)", "o_proj (30)", "gate_proj (30)", "up_proj (30)", "down_proj (30)"):
        assert name in proc.stdout
