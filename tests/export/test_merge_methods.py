"""`lorakit merge` / `export gguf` of IA3 adapters and selective fine-tunes: verified, exact, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.adapters.ia3 import ia3_layers
from lorakit.adapters.inject import inject_ia3
from lorakit.adapters.methods import load_any, save_trained
from lorakit.adapters.selective import prepare_selective
from lorakit.errors import LorakitError
from lorakit.export.merge import AdapterRef, merge
from lorakit.models.load import load_model
from lorakit.models.quantized import QuantSpec
from tests.conftest import run_cli, save_tiny_model_dir

IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
NF4 = {"method": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "float32"}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits.float()


def make_ia3(model_dir: Path, out: Path, quantized: bool = False) -> Path:
    spec = QuantSpec("nf4", 64, True, torch.float32) if quantized else None
    model = load_model(str(model_dir), "fp32", with_tokenizer=False, quantization=spec).model
    inject_ia3(model, ["all-linear"], None)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in ia3_layers(model):
            layer.ia3_l.copy_(1 + 0.3 * torch.randn(layer.ia3_l.shape, generator=g))
    save_trained(model, out, str(model_dir), {"method": "ia3", "quantization": NF4 if quantized else None})
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("merge-methods")
    save_tiny_model_dir(root / "model")
    make_ia3(root / "model", root / "ia3")
    model = load_model(str(root / "model"), "fp32", with_tokenizer=False).model
    names = prepare_selective(model, [r"model\.layers\.1\.", r"norm\.weight$"])
    with torch.no_grad():
        for n in names:
            model.get_parameter(n).add_(0.02 * torch.randn(model.get_parameter(n).shape, generator=torch.Generator()
                                                           .manual_seed(len(n))))
    save_trained(model, root / "sel", str(root / "model"), {"method": "selective"})
    return root


def test_ia3_merge_is_verified_and_equals_peft(ws: Path, tmp_path: Path) -> None:
    import peft

    result = merge([AdapterRef(ws / "ia3")], tmp_path / "m", dtype="fp32")
    assert result.verification is not None and result.verification.ok and result.verification.adapter_effect > 1e-2
    assert result.merged_layers == 6 and "IA3 fine-tune" in (tmp_path / "m" / "README.md").read_text()
    merged = load_model(str(tmp_path / "m"), "fp32", with_tokenizer=False).model
    theirs = peft.PeftModel.from_pretrained(load_model(str(ws / "model"), "fp32", with_tokenizer=False).model, ws / "ia3")
    assert (logits(merged) - logits(theirs.merge_and_unload())).abs().max() <= 1e-5


def test_ia3_on_an_nf4_base_merges_into_the_dequantized_base(ws: Path, tmp_path: Path) -> None:
    make_ia3(ws / "model", tmp_path / "q", quantized=True)
    result = merge([AdapterRef(tmp_path / "q")], tmp_path / "m", dtype="fp32")
    assert result.dequantized_layers == 14 and result.verification.ok
    reference = load_model(str(ws / "model"), "fp32", with_tokenizer=False,
                           quantization=QuantSpec("nf4", 64, True, torch.float32)).model
    load_any(reference, tmp_path / "q")  # IA3 on the NF4 layers, as trained
    merged, want = load_model(str(tmp_path / "m"), "fp32", with_tokenizer=False).model, logits(reference)
    assert (logits(merged) - want).abs().max() <= 1e-5 * want.abs().max()  # fp32 rounding: W l x vs (W x) l


def test_selective_merge_writes_the_whole_model(ws: Path, tmp_path: Path) -> None:
    result = merge([AdapterRef(ws / "sel")], tmp_path / "m", dtype="fp32")
    assert result.verification.ok and result.merged_layers == 12
    merged = load_model(str(tmp_path / "m"), "fp32", with_tokenizer=False).model
    reference = load_model(str(ws / "model"), "fp32", with_tokenizer=False).model
    base = logits(reference)
    load_any(reference, ws / "sel")
    assert (logits(merged) - logits(reference)).abs().max() <= 1e-5
    assert (logits(merged) - base).abs().max() > 1e-2
    info = run_cli("adapter", "info", str(ws / "sel"))
    assert info.returncode == 0 and "selective" in info.stdout and "tensors        12 replaced" in info.stdout


def test_merge_refusals(ws: Path, tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="is ia3; it rescales or replaces weights, so merge it alone"):
        merge([AdapterRef(ws / "ia3"), AdapterRef(ws / "sel")], tmp_path / "two", dtype="fp32")
    with pytest.raises(LorakitError, match="is selective, which has no low-rank update to scale"):
        merge([AdapterRef(ws / "sel")], tmp_path / "s", scale=0.5, dtype="fp32")
    assert not (tmp_path / "two").exists() and not (tmp_path / "s").exists()


def test_gguf_export_merges_ia3_and_adapter_only_refuses_a_selective_fine_tune(ws: Path, tmp_path: Path) -> None:
    from lorakit.export.gguf import export_gguf

    with pytest.raises(LorakitError, match="is a selective fine-tune; llama.cpp's LoRA GGUF"):
        export_gguf(None, tmp_path / "a.gguf", adapter=ws / "sel", adapter_only=True)
    result = export_gguf(None, tmp_path / "m.gguf", adapter=ws / "ia3", kind="f16", pre="gpt-2")  # merged, verified
    assert (tmp_path / "m.gguf").exists() and result is not None
