"""`lorakit compare --scale`: an adapter at strength s is the adapter whose B was multiplied by s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.adapters import inject_lora, lora_layers, save_adapter, scale_lora
from lorakit.eval.generate import load_for_inference, prompt_text
from lorakit.export.merge import AdapterRef, adapter_factors, merge_factors
from lorakit.eval.plots import scale_plots
from lorakit.eval.report import write_report
from tests.conftest import run_cli, save_tiny_model_dir, tiny_tokenizer
from tests.eval.test_eval_cli import _qa_file
from tests.train.test_train_cli import WORDS


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model dir, a random adapter `tuned` and the same adapter with B halved, `tuned-half`."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("scale")
    model_dir = save_tiny_model_dir(root / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    inject_lora(model, ["all-linear"], r=4, alpha=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.5)
    meta = {"template": "chatml", "system_prompt": "answer briefly"}
    save_adapter(model, root / "tuned", str(model_dir), meta)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.mul_(0.5)
    save_adapter(model, root / "tuned-half", str(model_dir), meta)
    return root


def test_scaled_adapter_has_the_logits_of_b_times_scale_and_of_merge_scale(adapters: Path) -> None:
    from transformers import AutoModelForCausalLM

    ids = tiny_tokenizer()(prompt_text("what comes after red?", load_for_inference(None, adapters / "tuned-half")),
                           return_tensors="pt")["input_ids"]
    half = load_for_inference(None, adapters / "tuned-half")
    im = load_for_inference(None, adapters / "tuned")
    assert all(layer.merged for _, layer in lora_layers(im.model))  # fp32 base: LoRA folded in
    with torch.no_grad():
        full = im.model(input_ids=ids).logits
        scale_lora(im.model, 2.0)  # a detour first: re-scaling re-merges from any scale
        scale_lora(im.model, 0.5)
        got, expected = im.model(input_ids=ids).logits, half.model(input_ids=ids).logits
    # fp32 rounding only: folding LoRA in moves these logits (|max| ~6) by ~1e-5 already
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert (full - expected).abs().max().item() > 1e-2  # the scale changed the model
    merged = AutoModelForCausalLM.from_pretrained(adapters / "model").eval()  # what `merge --scale 0.5` computes
    merge_factors(merged, adapter_factors(AdapterRef(adapters / "tuned"), scale=0.5))
    with torch.no_grad():
        by_merge = merged(input_ids=ids).logits
    assert (got - by_merge).abs().max().item() <= 1e-5 * by_merge.abs().max().item()


def test_compare_scales_section_answers_and_report(adapters: Path, tmp_path: Path) -> None:
    data = _qa_file(tmp_path / "qa.jsonl", WORDS[:4])
    general = _qa_file(tmp_path / "general.jsonl", WORDS[4:8])
    text = tmp_path / "text.txt"
    text.write_text("hello world the quick brown fox jumps over the lazy dog " * 10)
    out = tmp_path / "compare.json"
    proc = run_cli("compare", "--adapter", str(adapters / "tuned"), "--adapter", str(adapters / "tuned-half"),
                   "--scale", "1,0.5", "--data", str(data), "--general", str(general), "--text", str(text),
                   "--out", str(out), "--max-new-tokens", "8", "--metrics", "fact,token_f1")
    assert proc.returncode == 0, proc.stderr
    c = json.loads(out.read_text())
    assert c["labels"] == ["base", "tuned@0.5", "tuned", "tuned-half@0.5", "tuned-half"]
    for name in ("qa", "general"):  # tuned at 0.5 is tuned-half at 1: the same answers
        examples = c["datasets"][name]["examples"]
        assert [ex["outputs"]["tuned@0.5"] for ex in examples] == [ex["outputs"]["tuned-half"] for ex in examples]
        assert c["datasets"][name]["metrics"]["perplexity"]["tuned@0.5"] == \
            pytest.approx(c["datasets"][name]["metrics"]["perplexity"]["tuned-half"], rel=1e-4)
    assert c["forgetting"]["perplexity"]["tuned@0.5"] == pytest.approx(c["forgetting"]["perplexity"]["tuned-half"],
                                                                     rel=1e-4)
    assert c["datasets"]["qa"]["metrics"]["perplexity"]["tuned@0.5"] != \
        pytest.approx(c["datasets"]["qa"]["metrics"]["perplexity"]["tuned"], rel=1e-3)  # the scale mattered
    assert set(c["scales"]) == {"tuned", "tuned-half"}
    rows = c["scales"]["tuned"]
    assert [(r["scale"], r["label"]) for r in rows] == [(0.5, "tuned@0.5"), (1.0, "tuned")]
    for r in rows:
        assert set(r["metrics"]) == {"qa", "general"} and set(r["primary"]) == {"qa"}
        assert r["primary"]["qa"]["metric"] == "fact"
        assert r["primary"]["qa"]["value"] == c["datasets"]["qa"]["metrics"]["fact"][r["label"]]
        assert r["retention"] == c["forgetting"]["retention"][r["label"]]
        assert r["perplexity"] == c["forgetting"]["perplexity"][r["label"]]
    assert "adapter strength: tuned (scale 0 = base)" in proc.stdout
    assert "general: retention" in proc.stdout and "text perplexity" in proc.stdout

    run = tmp_path / "run"  # the report's plot of what each strength taught and kept
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1, "loss": 2.0}) + "\n")
    (run / "compare.json").write_text(out.read_text())
    assert [title for title, _ in scale_plots(c)] == ["Adapter strength: tuned", "Adapter strength: tuned-half"]
    html = write_report(run).read_text()
    assert "<h2>Adapter strength</h2>" in html
    assert html.count('alt="Adapter strength: tuned') == 2 and "data:image/png;base64," in html


def test_compare_without_scale_has_no_scales_section(adapters: Path, tmp_path: Path) -> None:
    data = _qa_file(tmp_path / "qa.jsonl", WORDS[:2])
    out = tmp_path / "compare.json"
    proc = run_cli("compare", "--adapter", str(adapters / "tuned"), "--data", str(data), "--out", str(out),
                   "--max-new-tokens", "4", "--metrics", "fact", "--no-perplexity")
    assert proc.returncode == 0, proc.stderr
    c = json.loads(out.read_text())
    assert c["labels"] == ["base", "tuned"] and "scales" not in c
    assert "adapter strength" not in proc.stdout


@pytest.mark.parametrize("scale, needle", [("0", "must be a finite number > 0"), ("-1", "must be a finite number > 0"),
                                           ("nan", "must be a finite number > 0"), ("0.5,,1", "'' is not a number"),
                                           ("half", "'half' is not a number")])
def test_bad_scale_is_one_line_exit_2(adapters: Path, tmp_path: Path, scale: str, needle: str) -> None:
    data = _qa_file(tmp_path / "qa.jsonl", WORDS[:2])
    proc = run_cli("compare", "--adapter", str(adapters / "tuned"), "--data", str(data), "--scale", scale)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --scale") and needle in lines[0], proc.stderr
