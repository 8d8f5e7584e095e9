"""The demo pipeline end to end on a tiny random model: every output file and the table's rows."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.demo import run_demo
from tests.conftest import run_cli, save_tiny_model_dir

ROWS = ["held-out fact accuracy", "train fact accuracy", "held-out ROUGE-L", "refusal rate on unanswerables",
        "false refusals on held-out", "general-knowledge accuracy", "general answers retained",
        "perplexity on general text"]


def test_demo_pipeline_on_a_tiny_model(tmp_path: Path) -> None:
    model = save_tiny_model_dir(tmp_path / "model")
    overrides = [f"model.name={model}", "data.max_length=256", "data.system_prompt=answer from the handbook",
                 "train.max_steps=3", "train.batch_size=2", "train.log_every=1", "adapter.r=4"]
    out = tmp_path / "run"
    comparison = run_demo(out, overrides=overrides, limit=3, train_sample=3)
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
    assert "before" in (out / "report.html").read_text().lower()
    # a second demo never overwrites the first: it takes the next free directory
    again = run_demo(out, overrides=overrides + ["train.max_steps=1"], limit=1, train_sample=1, merge=False)
    assert (tmp_path / "run-2" / "compare.json").is_file() and again["demo"]["steps"] == 1


def test_demo_config_missing(tmp_path: Path) -> None:
    proc = run_cli("demo", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr
