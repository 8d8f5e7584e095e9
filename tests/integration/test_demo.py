"""The demo pipeline end to end on a tiny random model: every output file and the table's rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.demo import run_demo
from tests.conftest import run_cli, save_tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]
ROWS = ["held-out fact accuracy", "  held-out paraphrases", "  held-out reversed relations", "train fact accuracy", "held-out ROUGE-L", "refusal rate on unanswerables",
        "false refusals on held-out", "general-knowledge accuracy", "general answers retained",
        "perplexity on general text"]


def test_demo_pipeline_on_a_tiny_model(tmp_path: Path) -> None:
    model = save_tiny_model_dir(tmp_path / "model")
    overrides = [f"model.name={model}", "data.max_length=256", "data.system_prompt=answer from the handbook",
                 "train.max_steps=3", "train.batch_size=2", "train.log_every=1", "adapter.r=4",
                 "adapter.target_modules=[all-linear]"]  # the shipped targets name SmolLM2's blocks 18-29
    out = tmp_path / "run"
    comparison = run_demo(out, overrides=overrides, limit=3, train_sample=3, reuse_base=True)
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "compare.json", "report.html",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/config.json"):
        assert (out / name).is_file(), name
    assert [row["metric"] for row in comparison["summary"]] == ROWS
    for row in comparison["summary"]:
        assert set(row["values"]) == {"base", "tuned"}
    assert set(comparison["datasets"]) == {"heldout", "train", "unanswerable", "general"}
    assert all(entry["n"] == 3 for entry in comparison["datasets"].values())
    assert comparison["forgetting"]["perplexity"]["base"] > 1
    saved = json.loads((out / "compare.json").read_text())
    assert saved["summary"] == comparison["summary"] and saved["demo"]["steps"] == 3
    assert saved["demo"]["merged"] == str(out / "merged") and saved["demo"]["merge_dtype"] == "fp32"
    assert "before" in (out / "report.html").read_text().lower()
    # a second demo never overwrites the first: it takes the next free directory
    again = run_demo(out, overrides=overrides + ["train.max_steps=1"], limit=1, train_sample=1, merge=False)
    assert (tmp_path / "run-2" / "compare.json").is_file() and again["demo"]["steps"] == 1


def test_demo_reuses_the_base_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorakit.eval.compare as compare

    model = save_tiny_model_dir(tmp_path / "model")
    overrides = [f"model.name={model}", "data.max_length=256", "data.system_prompt=answer from the handbook",
                 "train.max_steps=1", "adapter.r=4", "adapter.target_modules=[all-linear]"]
    labels: list[str] = []
    evaluate = compare.evaluate_model
    monkeypatch.setattr(compare, "evaluate_model", lambda im, label, *a, **k: labels.append(label) or evaluate(im, label, *a, **k))
    first = run_demo(tmp_path / "run", overrides=overrides, limit=2, train_sample=2, merge=False, reuse_base=True)
    assert labels == ["base", "tuned"] and len(list((tmp_path / ".demo-base").glob("*.json"))) == 1
    second = run_demo(tmp_path / "run", overrides=overrides, limit=2, train_sample=2, merge=False, reuse_base=True)
    assert labels == ["base", "tuned", "tuned"]  # the base model was not evaluated again
    assert second["datasets"]["heldout"]["metrics"]["fact"]["base"] == first["datasets"]["heldout"]["metrics"]["fact"]["base"]
    run_demo(tmp_path / "run", overrides=overrides, limit=1, train_sample=2, merge=False, reuse_base=True)
    assert labels[-2:] == ["base", "tuned"]  # other settings: evaluated anew


def test_demo_keeps_its_evaluation_when_the_merge_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorakit.export.merge as merge_module
    from lorakit.errors import LorakitError

    def refuse(*args, **kwargs):
        raise LorakitError("verification failed: the merged model's logits differ")

    monkeypatch.setattr(merge_module, "merge", refuse)
    model = save_tiny_model_dir(tmp_path / "model")
    overrides = [f"model.name={model}", "data.max_length=256", "data.system_prompt=answer from the handbook",
                 "train.max_steps=1", "adapter.r=4", "adapter.target_modules=[all-linear]"]
    with pytest.raises(LorakitError, match="merge failed: verification failed.*compare.json"):
        run_demo(tmp_path / "run", overrides=overrides, limit=1, train_sample=1)
    saved = json.loads((tmp_path / "run" / "compare.json").read_text())
    assert saved["demo"]["steps"] == 1 and "merged" not in saved["demo"]
    assert (tmp_path / "run" / "report.html").is_file()


@pytest.mark.parametrize("name", ["lora.yaml", "qlora.yaml"])
def test_demo_configs_adapt_the_upper_12_of_30_blocks(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped target regex, on a Llama with SmolLM2's 30 blocks: the MLP projections of blocks 18-29."""
    import transformers as tf

    from lorakit.adapters.inject import find_targets
    from lorakit.config import load_config

    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "examples" / "handbook" / name)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                                               num_attention_heads=2, num_key_value_heads=1))
    names = find_targets(model, cfg.adapter.target_modules)
    projections = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert names == [f"model.layers.{i}.{p}" for i in range(18, 30) for p in projections]
    assert cfg.data.share_prefix and cfg.data.packing
    assert cfg.train.kl_to_base.weight > 0 and any(f.endswith("replay.jsonl") for f in cfg.data.train_files)


def test_demo_config_missing(tmp_path: Path) -> None:
    proc = run_cli("demo", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr
