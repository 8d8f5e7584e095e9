"""Real llama.cpp on lorakit's files (make test-llamacpp): it loads them, and answers as lorakit does."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.export import llamacpp
from lorakit.export.gguf import export_gguf
from lorakit.export.gguf_verify import compare_answers, verify_prompts
from tests.conftest import run_cli, save_tiny_model_dir, tiny_tokenizer
from tests.export.test_merge import make_adapter

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model that only ever picks plain-text tokens (letters, digits, spaces): llama.cpp ends generation
    on any end-of-text-like token (<|endoftext|>, </s>, ...) where lorakit ends on EOS / end of turn only, and
    prints single bytes of split UTF-8 characters its own way; a random model emits both at random."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("llamacpp")
    save_tiny_model_dir(root / "m")
    model = AutoModelForCausalLM.from_pretrained(root / "m")
    tok = tiny_tokenizer()
    with torch.no_grad():
        for i in range(len(tok)):
            text = tok.decode([i])
            if i in tok.added_tokens_decoder or not text.strip() or not all(c.isascii() and (c.isalnum() or c == " ")
                                                                            for c in text):
                model.lm_head.weight[i] = 0.0  # logit 0: far below the best of ~200 random logits
    model.save_pretrained(root / "m")
    make_adapter(root / "m", root / "a", seed=7, targets=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"))
    return root


def _im(model_dir: Path, adapter: Path | None = None):
    from lorakit.eval.generate import load_for_inference

    return load_for_inference(str(model_dir), adapter, "fp32")


def test_f16_gguf_loads_and_answers_like_lorakit(ws: Path) -> None:
    result = export_gguf(str(ws / "m"), ws / "m.gguf", verify="llamacpp", pre="gpt-2")
    assert result.llamacpp_asked == 8 and result.llamacpp_same >= 6
    c = llamacpp.simple(ws / "m.gguf", "hello world", 8)
    assert c.load_ms is not None and c.tokens_per_s is not None


def test_lora_gguf_on_the_base_gguf_answers_like_the_merged_model(ws: Path) -> None:
    base = ws / "base.gguf"
    if not base.exists():
        export_gguf(str(ws / "m"), base, verify="none", pre="gpt-2", modelfile=False)
    export_gguf(None, ws / "a.gguf", adapter=ws / "a", adapter_only=True, verify="none")
    im = _im(ws / "m", ws / "a")
    check = compare_answers(im, verify_prompts(), base, lora=ws / "a.gguf")
    assert check.same >= 6, check.first_difference
    without = compare_answers(im, verify_prompts(), base)  # the adapter changes llama.cpp's answers
    assert without.same < check.same


def test_k_quant_through_llama_quantize_loads(ws: Path) -> None:
    proc = run_cli("export", "gguf", "--model", str(ws / "m"), "--out", str(ws / "q.gguf"), "--type", "q4_k_m",
                   "--pre", "gpt-2", "--verify", "llamacpp")
    assert proc.returncode == 0, proc.stderr
    assert "quantized with llama.cpp's llama-quantize" in proc.stdout and "verified with llama.cpp" in proc.stdout


@pytest.mark.slow
def test_smollm2_base_in_llama_cpp(tmp_path: Path) -> None:
    """The shipped model with its detected pre-tokenizer (smollm): llama.cpp answers as lorakit does."""
    result = export_gguf("smollm2-135m-instruct", tmp_path / "s.gguf", verify="llamacpp")
    assert result.llamacpp_same >= 7, result
    assert (tmp_path / "s.Modelfile").read_text().startswith("# written by lorakit")
