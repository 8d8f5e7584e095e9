"""`lorakit export gguf`: a tiny Llama (and Qwen2) round-trips through transformers' GGUF loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.export.gguf import export_gguf
from tests.conftest import run_cli, save_tiny_model_dir, tiny_tokenizer
from tests.export.test_merge import make_adapter


def logits_from_gguf(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f16_round_trip(tmp_path: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_tiny_model_dir(tmp_path / "m", arch)
    result = export_gguf(str(tmp_path / "m"), tmp_path / "m.gguf", kind="f16", pre="gpt-2")
    assert result.top1_agreement >= 0.95 and result.tensors > 10
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        ref = source(input_ids=IDS).logits
    got = logits_from_gguf(tmp_path / "m.gguf", IDS)
    assert (ref - got).abs().max() < 0.02 * ref.abs().max()  # fp16 rounding only
    # the embedded tokenizer and chat template come back
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "what is the capital of france? paris."
    assert tok(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"]
    assert tok.chat_template == tiny_tokenizer().chat_template


def test_q8_0_and_bf16_within_tolerance_and_adapter_is_merged(tmp_path: Path) -> None:
    save_tiny_model_dir(tmp_path / "m")
    make_adapter(tmp_path / "m", tmp_path / "a", seed=5)
    q8 = export_gguf(None, tmp_path / "q8.gguf", adapter=tmp_path / "a", kind="q8_0", pre="gpt-2")
    assert q8.top1_agreement >= 0.85
    bf = export_gguf(None, tmp_path / "bf.gguf", adapter=tmp_path / "a", kind="bf16", pre="gpt-2")
    assert bf.top1_agreement >= 0.9
    assert q8.bytes < bf.bytes
    # the adapter is in the file: its logits match base+adapter, not the base
    from lorakit.adapters import load_adapter
    from lorakit.models.load import load_model

    adapted = load_model(str(tmp_path / "m"), "fp32", with_tokenizer=False).model
    base = load_model(str(tmp_path / "m"), "fp32", with_tokenizer=False).model
    load_adapter(adapted, tmp_path / "a")
    got = logits_from_gguf(tmp_path / "bf.gguf", IDS)
    with torch.no_grad():
        to_adapted = (adapted(input_ids=IDS).logits - got).abs().mean()
        to_base = (base(input_ids=IDS).logits - got).abs().mean()
    assert to_adapted < 0.2 * to_base


def test_errors(tmp_path: Path) -> None:
    import transformers as tf

    save_tiny_model_dir(tmp_path / "m")
    export_gguf(str(tmp_path / "m"), tmp_path / "m.gguf", verify=False, pre="gpt-2")
    with pytest.raises(LorakitError, match="already exists"):
        export_gguf(str(tmp_path / "m"), tmp_path / "m.gguf", pre="gpt-2")
    with pytest.raises(LorakitError, match="should end in .gguf"):
        export_gguf(str(tmp_path / "m"), tmp_path / "m.bin", pre="gpt-2")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(LorakitError, match="dir.gguf is a folder; --out must name a file"):
        export_gguf(str(tmp_path / "m"), tmp_path / "dir.gguf", pre="gpt-2", force=True)
    with pytest.raises(LorakitError, match="--type 'q4_k' is not supported"):
        export_gguf(str(tmp_path / "m"), tmp_path / "x.gguf", kind="q4_k", pre="gpt-2")
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=330, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "g")
    tiny_tokenizer().save_pretrained(tmp_path / "g")
    with pytest.raises(LorakitError, match="GGUF export supports llama, mistral, qwen2 models; this one is gpt2"):
        export_gguf(str(tmp_path / "g"), tmp_path / "g.gguf", pre="gpt-2")
    assert not (tmp_path / "g.gguf").exists()


def test_cli(tmp_path: Path) -> None:
    save_tiny_model_dir(tmp_path / "m")
    proc = run_cli("export", "gguf", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "m.gguf"), "--type", "q8_0",
                   "--pre", "gpt-2")
    assert proc.returncode == 0, proc.stderr
    assert "verified with transformers' GGUF loader" in proc.stdout and "q8_0" in proc.stdout
    proc = run_cli("export", "gguf", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "m.gguf"), "--pre", "gpt-2")
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
