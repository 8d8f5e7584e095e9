"""Generation metrics during training (config `eval:`): gen_eval events in metrics.jsonl, report.html."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.config import load_config
from lorakit.errors import ConfigError
from lorakit.train.loop import train
from tests.conftest import save_tiny_model_dir
from tests.train.test_train_cli import write_chat_data


def test_generation_metrics_are_logged_every_n_steps(tmp_path: Path) -> None:
    save_tiny_model_dir(tmp_path / "model")
    rows = [json.loads(line) for line in write_chat_data(tmp_path / "train.jsonl", n=24).read_text().splitlines()]
    for row in rows:
        row["fact"] = row["messages"][1]["content"].split()[-1].rstrip(".")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"model.name={tmp_path / 'model'}", "model.dtype=fp32", f"data.train={tmp_path / 'train.jsonl'}",
                             "data.max_length=128", "data.eval_ratio=0.25", "train.max_steps=4", "train.batch_size=2",
                             "train.precision=fp32", "eval.every=2", "eval.max_examples=3", "eval.max_new_tokens=8",
                             "eval.metrics=[fact, rougeL]", f"output_dir={tmp_path / 'run'}"])
    train(cfg, quiet=True)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gen = [e for e in events if e["event"] == "gen_eval"]
    assert [e["step"] for e in gen] == [2, 4]
    for e in gen:
        assert e["n"] == 3 and set(e["metrics"]) == {"fact", "rougeL"}
        assert 0.0 <= e["metrics"]["fact"] <= 1.0
    assert (tmp_path / "run" / "report.html").is_file()


def test_eval_section_is_validated() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["eval.every=-1", "eval.metrics=[rouge]", "eval.max_examples=0"])
    text = str(err.value)
    assert "eval.every" in text and "unknown metric rouge" in text and "eval.max_examples" in text
