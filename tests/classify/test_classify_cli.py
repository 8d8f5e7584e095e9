"""End to end through the CLI (in process): train an lm_label classifier and a head, eval, disagree; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lorakit import cli
from tests.conftest import save_tiny_model_dir

WORDS = ["the quick brown fox", "hello world", "what is the capital of france", "how are you", "the lazy dog"]


def run_main(*args: str) -> int:
    try:
        cli.main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def labelled(path: Path, n: int, labels=("yes", "no")) -> Path:
    rows = [{"text": f"{WORDS[i % len(WORDS)]} {i}", "label": labels[(i // 2) % 2]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config(tmp_path: Path, model: Path, method: str, out: str, **data) -> Path:
    cfg = {"task": "classification", "model": {"name": str(model)},
           "data": {"train": str(labelled(tmp_path / "train.jsonl", 12)), "test": str(labelled(tmp_path / "test.jsonl", 6)),
                    "template": "chatml", "max_length": 48, "eval_ratio": 0.0, **data},
           "classification": {"method": method, "prompt": "{text}? {labels}"},
           "adapter": {"r": 4, "alpha": 8}, "train": {"max_steps": 2, "batch_size": 4, "log_every": 1},
           "output_dir": str(tmp_path / out)}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_train_eval_disagree_end_to_end(tmp_path, capsys):
    model = save_tiny_model_dir(tmp_path / "tiny")
    lm_cfg = config(tmp_path, model, "lm_label", "lm")
    assert run_main("train", lm_cfg) == 0
    head_cfg = config(tmp_path, model, "head", "head")
    assert run_main("train", head_cfg) == 0
    for run in ("lm", "head"):
        result = json.loads((tmp_path / run / "classify_eval.json").read_text())["results"][0]
        assert result["metrics"]["n"] == 6 and len(result["predictions"]) == 6
        assert "Classification</h2>" in (tmp_path / run / "report.html").read_text()
    assert json.loads((tmp_path / "head/adapter/adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    kept = (tmp_path / "lm/classify_data/train.jsonl").read_bytes()
    assert run_main("train", lm_cfg) == 2  # the run directory is never reused
    assert (tmp_path / "lm/classify_data/train.jsonl").read_bytes() == kept
    assert run_main("eval", "--adapter", tmp_path / "lm/adapter", "--data", tmp_path / "test.jsonl",
                    "--out", tmp_path / "eval.json") == 0
    assert "macro_f1" in json.loads((tmp_path / "eval.json").read_text())["results"][0]["metrics"]
    assert run_main("compare", "--adapter", tmp_path / "lm/adapter", "--data", tmp_path / "test.jsonl",
                    "--out", tmp_path / "lm/compare.json") == 0
    names = [r["name"] for r in json.loads((tmp_path / "lm/compare.json").read_text())["results"]]
    assert names == [f"{model} (untuned)", str(tmp_path / "lm/adapter")]
    capsys.readouterr()
    code = run_main("disagree", "--model", model, "--model", model, "--adapter", tmp_path / "lm/adapter",
                    "--adapter", tmp_path / "head/adapter", "--config", lm_cfg, "--data", tmp_path / "test.jsonl",
                    "--labels", "label", "--out", tmp_path / "q.jsonl", "--html", tmp_path / "q.html")
    assert code == 0
    queue = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert [q["rank"] for q in queue] == list(range(1, 7)) and len(queue[0]["models"]) == 3
    keys = [(-q["vote_entropy"], -q["mean_kl"]) for q in queue]
    assert keys == sorted(keys)
    assert "top 20%" in capsys.readouterr().out
    assert "img-src data:" in (tmp_path / "q.html").read_text()
    before = (tmp_path / "q.jsonl").read_bytes()
    assert run_main("disagree", "--model", model, "--adapter", tmp_path / "lm/adapter", "--model", model,
                    "--config", lm_cfg,
                    "--data", tmp_path / "test.jsonl", "--out", tmp_path / "q.jsonl") == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "q.jsonl").read_bytes() == before


@pytest.mark.parametrize("rows, message", [
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "one class ('x')"),
    ([{"text": "a", "label": "x"}, {"text": "", "label": "y"}], "row 2: the text ('text') is empty"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "w"}], "row 2: label 'w' is not in classification.labels"),
])
def test_bad_training_data_is_one_line(tmp_path, capsys, rows, message):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"task": "classification", "data": {"train": str(train)},
                                   "classification": {"labels": ["x", "y"]} if "classification" in message else {},
                                   "output_dir": str(tmp_path / "run")}), encoding="utf-8")
    assert run_main("train", cfg) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["fine_foods_lm_label.yaml", "fine_foods_head.yaml"])
def test_benchmark_configs_validate(name):
    from lorakit.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "bench/configs" / name)
    assert cfg.task == "classification" and cfg.classification.method in ("lm_label", "head")


def test_classification_config_problems_reported_together(tmp_path):
    from lorakit.config import load_config
    from lorakit.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"task": "classification", "adapter": {"method": "qlora"},
                                    "classification": {"method": "head", "prompt": "no placeholder",
                                                       "labels": ["a", "a"]}}), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    for part in ("classification.prompt", "classification.labels", "data.train"):
        assert part in text
    path.write_text(yaml.safe_dump({"task": "classification", "adapter": {"method": "qlora"}, "data": {"train": "t.jsonl"},
                                    "classification": {"method": "head"}}), encoding="utf-8")
    with pytest.raises(ConfigError, match="adapter.method: is qlora; classification.method head trains lora or full"):
        load_config(path)
