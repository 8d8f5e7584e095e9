"""--adapter-only: the adapter as llama.cpp's LoRA GGUF, read back with gguf-py (names, shapes, alpha, values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lorakit.errors import LorakitError
from lorakit.export.gguf import permute_qk, export_gguf
from tests.conftest import run_cli, save_tiny_model_dir
from tests.export.test_merge import make_adapter


def read_gguf(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(field):
        part = field.parts[field.data[0]]
        return bytes(part).decode() if field.types[0].name == "STRING" else part.tolist()[0]

    fields = {k: value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}
    return fields, tensors


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    save_tiny_model_dir(root / "m")
    make_adapter(root / "m", root / "a", seed=3, targets=("q_proj", "k_proj", "v_proj", "down_proj"), r=4, alpha=8.0)
    return root


def test_lora_gguf_names_shapes_alpha_and_values(lora: Path) -> None:
    from safetensors.torch import load_file

    result = export_gguf(None, lora / "a.gguf", adapter=lora / "a", adapter_only=True, kind="f32")
    assert result.layers == 2 * 4 and result.rank == 4 and result.alpha == 8.0
    fields, tensors = read_gguf(lora / "a.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    assert sorted(tensors)[:4] == ["blk.0.attn_k.weight.lora_a", "blk.0.attn_k.weight.lora_b",
                                   "blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b"]
    assert len(tensors) == 16 and "blk.1.ffn_down.weight.lora_b" in tensors
    w = load_file(str(lora / "a" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.{}_proj.lora_{}.weight"
    # shapes as llama.cpp checks them: A (r, in), B (out, r); q/k rows of B permuted like the base weights (4 q, 2 kv heads)
    assert tensors["blk.1.attn_q.weight.lora_a"].shape == (4, 64) and tensors["blk.1.attn_k.weight.lora_b"].shape == (32, 4)
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight.lora_a"], w[key.format("q", "A")].numpy())
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight.lora_b"], permute_qk(w[key.format("q", "B")], 4).numpy())
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight.lora_b"], permute_qk(w[key.format("k", "B")], 2).numpy())
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight.lora_b"], w[key.format("v", "B")].numpy())


def test_per_layer_scaling_is_folded_into_b(lora: Path, tmp_path: Path) -> None:
    import json
    import shutil

    shutil.copytree(lora / "a", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"v_proj": 16.0}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    export_gguf(None, tmp_path / "a.gguf", adapter=tmp_path / "a", adapter_only=True, kind="f32")
    fields, tensors = read_gguf(tmp_path / "a.gguf")
    from safetensors.torch import load_file

    b = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    alpha, r = fields["adapter.lora.alpha"], 4
    assert alpha == 8.0  # the first layer's; v_proj's 16 / 4 = 4 = (alpha / r) * 2
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight.lora_b"] * alpha / r, (b * 16.0 / r).numpy(), rtol=1e-6)


def test_adapter_only_errors(lora: Path, tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="--adapter-only needs a LoRA adapter directory.*holds a full model.*--model"):
        export_gguf(None, tmp_path / "x.gguf", adapter=lora / "m", adapter_only=True)
    with pytest.raises(LorakitError, match="LoRA tensors as f16, bf16, f32, not 'q4_k_m'"):
        export_gguf(None, tmp_path / "x.gguf", adapter=lora / "a", adapter_only=True, kind="q4_k_m")
    proc = run_cli("export", "gguf", "--adapter", str(lora / "a"), "--adapter-only", "--out", str(tmp_path / "c.gguf"))
    assert proc.returncode == 0, proc.stderr
    assert "LoRA GGUF for llama.cpp --lora: 8 layers, r=4, alpha 8" in proc.stdout
    proc = run_cli("export", "gguf", "--adapter", str(lora / "a"), "--adapter-only", "--out", str(tmp_path / "c.gguf"))
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.tmp*"))


def test_cli_errors_are_one_line(lora: Path, tmp_path: Path, monkeypatch) -> None:
    proc = run_cli("export", "gguf", "--model", str(lora / "m"), "--out", str(tmp_path / "x.gguf"), "--type", "q3_k")
    assert proc.returncode == 2 and "--type 'q3_k' is not supported; use one of f16, bf16, q8_0, q4_0, q4_k_m" in proc.stderr
    monkeypatch.setenv("LORAKIT_LLAMACPP", str(tmp_path / "nowhere"))
    proc = run_cli("export", "gguf", "--model", str(lora / "m"), "--out", str(tmp_path / "x.gguf"), "--verify", "llamacpp")
    assert proc.returncode == 2 and "llama-simple-lora is not in" in proc.stderr and "scripts/build_llamacpp.sh" in proc.stderr
    proc = run_cli("export", "gguf", "--model", str(lora / "m"), "--out", str(tmp_path / "x.gguf"), "--type", "q4_k_m")
    assert proc.returncode == 2 and "llama-quantize is not in" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()
