"""export gguf --force: the old file stays until the new one is verified; NaN and f16 overflow are caught."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lorakit.export.gguf_verify as verify_mod
from lorakit.errors import LorakitError
from lorakit.export.gguf import export_gguf
from tests.conftest import save_tiny_model_dir, tiny_lm_for, tiny_tokenizer


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    save_tiny_model_dir(tmp_path / "m")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the user's old export")
    return out


class NaNLogits(torch.nn.Module):
    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.full((*input_ids.shape, len(tiny_tokenizer())), float("nan")))


def test_nan_difference_fails_verification_and_keeps_the_old_file(exported: Path, monkeypatch) -> None:
    real = verify_mod.verify_transformers
    monkeypatch.setattr(verify_mod, "verify_transformers", lambda result, source, ids: real(result, NaNLogits(), ids))
    with pytest.raises(LorakitError, match="verification failed"):
        export_gguf(str(exported.parent / "m"), exported, force=True, pre="gpt-2")
    assert exported.read_bytes() == b"the user's old export"
    assert sorted(p.name for p in exported.parent.iterdir()) == ["m", "m.gguf"]  # no temporary left


def test_f16_overflow_is_caught_before_anything_is_replaced(exported: Path) -> None:
    tok = tiny_tokenizer()
    model = tiny_lm_for(tok)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
    model.save_pretrained(exported.parent / "big")
    tok.save_pretrained(exported.parent / "big")
    with pytest.raises(LorakitError, match="beyond f16's range.*--type bf16"):
        export_gguf(str(exported.parent / "big"), exported, force=True, pre="gpt-2")
    assert exported.read_bytes() == b"the user's old export"


def test_force_replaces_the_old_file_once_verified(exported: Path) -> None:
    result = export_gguf(str(exported.parent / "m"), exported, force=True, pre="gpt-2")
    assert result.path == exported and exported.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in exported.parent.iterdir()) == ["m", "m.Modelfile", "m.gguf"]
