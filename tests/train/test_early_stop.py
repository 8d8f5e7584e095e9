"""train.early_stop: stop on a generation metric, adapter-best/ at its best step; config checks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from lorakit.config import load_config
from lorakit.errors import ConfigError, LorakitError
from lorakit.train.early_stop import EarlyStop
from lorakit.train.loop import train
from tests.conftest import save_tiny_model_dir
from tests.train.test_train_cli import write_chat_data


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("early")
    save_tiny_model_dir(root / "model")
    write_chat_data(root / "train.jsonl", n=24)
    return root


def _overrides(root: Path, name: str, *extra: str) -> list[str]:
    # exact_match of a one-token answer against "after X comes Y." is 0 at every eval: it cannot improve
    return [f"model.name={root / 'model'}", "model.dtype=fp32", f"data.train={root / 'train.jsonl'}",
            "data.max_length=64", "data.eval_ratio=0.25", "train.max_steps=8", "train.batch_size=4", "train.lr=2e-2",
            "train.precision=fp32", "train.log_every=1", "train.save_every=2", "train.keep_checkpoints=10",
            "eval.every=2", "eval.max_examples=3", "eval.max_new_tokens=1", "eval.metrics=[exact_match, token_f1]",
            f"output_dir={root / name}", *extra]


def test_patience_1_on_a_flat_metric_stops_and_keeps_the_best_step(workspace: Path) -> None:
    out = io.StringIO()
    cfg = load_config(None, _overrides(workspace, "stop", "train.early_stop.metric=exact_match",
                                       "train.early_stop.patience=1"))
    result = train(cfg, console=Console(file=out, width=200))
    run = workspace / "stop"
    events = _events(run)
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]  # stopped at step 4 of 8
    assert [e["step"] for e in events if e["event"] == "gen_eval"] == [2, 4]  # no second eval at the stop
    (stop,) = [e for e in events if e["event"] == "early_stop"]
    assert stop == {"event": "early_stop", "step": 4, "metric": "exact_match", "best_step": 2, "best_value": 0.0,
                    "patience": 1}
    assert "early stop at step 4: exact_match did not improve for 1 generation eval(s); best 0.0000 at step 2" \
        in out.getvalue()
    summary = json.loads((run / "eval.json").read_text())
    assert summary["early_stopped_at"] == 4 and summary["best_step"] == 2 and summary["best_value"] == 0.0
    assert summary["step"] == 4 and result.early_stopped_at == 4 and result.best_step == 2
    meta = json.loads((run / "adapter-best" / "lorakit.json").read_text())
    assert meta["step"] == 2 and meta["best_metric"] == "exact_match" and meta["best_value"] == 0.0
    assert "eval_loss" not in meta  # adapter-best/ follows the generation metric, not the eval loss
    best, at_2 = _weights(run / "adapter-best"), _weights(run / "checkpoints" / "step-2" / "adapter")
    assert best.keys() == at_2.keys() and all(torch.equal(best[k], at_2[k]) for k in best)
    final = _weights(run / "adapter")  # the final adapter is the model at the stop
    at_4 = _weights(run / "checkpoints" / "step-4" / "adapter")
    assert all(torch.equal(final[k], at_4[k]) for k in final) and any(not torch.equal(final[k], best[k]) for k in best)
    html = (run / "report.html").read_text()
    assert "best exact_match (adapter-best)" in html and "early stopped at step" in html

    # a resumed stopped run stays stopped
    train(load_config(None, _overrides(workspace, "stop", "train.early_stop.metric=exact_match",
                                       "train.early_stop.patience=1")), resume=True, quiet=True)
    assert [e["step"] for e in _events(run) if e["event"] == "train"] == [1, 2, 3, 4]
    assert json.loads((run / "eval.json").read_text())["early_stopped_at"] == 4

    # without early_stop: the same losses, 8 steps, adapter-best/ by eval loss, eval.json without the fields
    plain = train(load_config(None, _overrides(workspace, "plain")), quiet=True)
    assert plain.losses[:4] == result.losses and len(plain.losses) == 8
    assert "eval_loss" in json.loads((workspace / "plain" / "adapter-best" / "lorakit.json").read_text())
    assert "early_stopped_at" not in json.loads((workspace / "plain" / "eval.json").read_text())
    assert not [e for e in _events(workspace / "plain") if e["event"] == "early_stop"]


def test_a_metric_no_eval_row_can_score_fails_before_training(workspace: Path) -> None:
    cfg = load_config(None, _overrides(workspace, "nofact", "eval.metrics=[fact]", "train.early_stop.metric=fact"))
    with pytest.raises(LorakitError, match="none of the 3 generation eval rows has a `fact` field"):
        train(cfg, quiet=True)
    assert not (workspace / "nofact" / "metrics.jsonl").exists()


def test_early_stop_config_is_validated() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.early_stop.metric=bleu", "train.early_stop.patience=1"])
    text = str(err.value)
    assert "train.early_stop.metric: is bleu, which eval.metrics (fact, exact_match, token_f1, rougeL) does not " \
           "compute" in text
    assert "train.early_stop: needs generation evals during training; set eval.every to N > 0" in text
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.early_stop.metric=rouge", "train.early_stop.patience=0", "train.early_stop.on=test",
                           "eval.every=2"])
    text = str(err.value)
    assert "train.early_stop.metric: unknown metric rouge" in text and "train.early_stop.patience: must be >= 1" in text
    assert "train.early_stop.on: must be one of 'eval'" in text
    cfg = load_config(None, ["train.early_stop={}", "eval.every=5"])
    assert (cfg.train.early_stop.metric, cfg.train.early_stop.on, cfg.train.early_stop.patience) == ("fact", "eval", 3)
    assert load_config(None).train.early_stop is None


def test_early_stop_counts_evals_without_a_new_best() -> None:
    stop = EarlyStop("fact", patience=2)
    assert stop.update(2, 0.25) and not stop.update(4, 0.25) and not stop.patience_spent
    assert stop.update(6, 0.5) and stop.bad == 0
    assert not stop.update(8, None) and not stop.update(10, 0.4) and stop.patience_spent
    assert (stop.best, stop.best_step) == (0.5, 6)
    again = EarlyStop("fact", patience=2)
    again.restore(stop.state())
    assert again == stop
    other = EarlyStop("exact_match", patience=2)
    other.restore(stop.state())  # another metric: start afresh
    assert other.best is None and other.bad == 0
