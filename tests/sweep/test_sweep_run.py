"""lorakit sweep end to end on a tiny model: trial directories, evaluation, resume, a failing trial, --parallel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.sweep.command import SweepOptions, run_sweep
from lorakit.sweep.results import best
from lorakit.sweep.state import DONE, FAILED, RUNNING, SweepState
from tests.conftest import save_tiny_model_dir
from tests.train.test_train_cli import write_chat_data


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    save_tiny_model_dir(root / "model")
    write_chat_data(root / "train.jsonl")
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    (root / "heldout.jsonl").write_text("".join(
        json.dumps(dict(r, fact=r["messages"][1]["content"].split()[-1].rstrip("."))) + "\n" for r in rows[:4]))
    (root / "general.jsonl").write_text("".join(
        json.dumps(dict(r, fact=r["messages"][1]["content"].split()[1])) + "\n" for r in rows[4:8]))
    cfg = {"model": {"name": str(root / "model"), "dtype": "fp32"},
           "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
           "data": {"train": str(root / "train.jsonl"), "max_length": 64, "eval_ratio": 0.25},
           "train": {"max_steps": 3, "batch_size": 4, "lr": 2e-2, "log_every": 1, "precision": "fp32",
                     "warmup_steps": 0},
           "output_dir": str(root / "run"), "seed": 3}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _options(root: Path, out: str, **kw) -> SweepOptions:
    return SweepOptions(root / "cfg.yaml", out=root / out, **kw)


def _console() -> Console:
    return Console(record=True, width=200)


def test_sweep_runs_evaluates_and_resumes_only_the_unfinished_trial(workspace: Path) -> None:
    opts = _options(workspace, "s1", paired=["adapter.r,adapter.alpha=2:4,8:16"], grid=["train.lr=5e-2"],
                    eval_data=[str(workspace / "heldout.jsonl")], general=str(workspace / "general.jsonl"),
                    max_new_tokens=6, metrics=["fact", "token_f1"])
    state = run_sweep(opts, _console())
    out = workspace / "s1"
    assert [t.status for t in state.trials] == [DONE] * 2
    for t in state.trials:
        run = out / t.name
        for rel in ("config.yaml", "metrics.jsonl", "eval.json", "report.html", "adapter/adapter_model.safetensors",
                    "compare.json", "trial.json"):
            assert (run / rel).is_file(), f"{t.name}/{rel}"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert (cfg["train"]["lr"], cfg["adapter"]["r"], cfg["adapter"]["alpha"]) == (
            t.values["train.lr"], t.values["adapter.r"], t.values["adapter.alpha"])
        assert t.metrics["eval_loss"] == json.loads((run / "eval.json").read_text())["eval_loss"]
        assert {"fact", "heldout.fact", "heldout.token_f1", "perplexity", "general.fact"} <= set(t.metrics)
    assert [(t.values["train.lr"], t.values["adapter.r"], t.values["adapter.alpha"]) for t in state.trials] == [
        (5e-2, 2, 4.0), (5e-2, 8, 16.0)]
    saved = SweepState.read(out)
    assert [t.metrics for t in saved.trials] == [t.metrics for t in state.trials]
    page = (out / "sweep.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # eval_loss against r and alpha, the r x alpha heatmap
    top = best(state.trials, "eval_loss", "min")
    assert (out / "sweep.csv").read_text().splitlines()[1].split(",")[1:3] == [top.name, "yes"]

    # a trial killed midway: its result and eval.json gone, sweep.json says running
    data = json.loads((out / "sweep.json").read_text())
    data["trials"][1]["status"] = RUNNING
    (out / "sweep.json").write_text(json.dumps(data))
    (out / "trial-001" / "trial.json").unlink()
    (out / "trial-001" / "eval.json").unlink()
    before = {t.name: (out / t.name / "trial.json").stat().st_mtime_ns for t in state.trials if t.index != 1}
    console = _console()
    again = run_sweep(opts, console)
    text = console.export_text()
    assert "2 trials, 1 to run" in text and "trial-001 (" in text and "trial-000 (" not in text
    assert [t.status for t in again.trials] == [DONE] * 2
    assert before == {n: (out / n / "trial.json").stat().st_mtime_ns for n in before}
    assert again.trials[1].metrics["eval_loss"] == pytest.approx(state.trials[1].metrics["eval_loss"], rel=1e-5)

    with pytest.raises(LorakitError, match="different plan"):
        run_sweep(_options(workspace, "s1", grid=["train.lr=1e-2"]), _console())


def test_a_failing_trial_is_recorded_and_the_others_finish(workspace: Path) -> None:
    state = run_sweep(_options(workspace, "s2", grid=["adapter.target_modules=no_such_layer,all-linear"]),
                      _console())
    failed, done = state.trials
    assert failed.status == FAILED and "no_such_layer" in failed.error and "\n" not in failed.error
    assert done.status == DONE and done.metrics["eval_loss"] > 0
    csv_rows = (workspace / "s2" / "sweep.csv").read_text().splitlines()
    assert csv_rows[1].startswith("1,trial-001,yes") and "no_such_layer" in csv_rows[2]


def test_cli_parallel_workers_and_bad_input(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(workspace / "cfg.yaml"), "--grid", "adapter.rnk=2,4", "--out", str(workspace / "s4")])
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines() == [
        "error: --grid adapter.rnk: unknown config key; did you mean adapter.r?"]
    assert not (workspace / "s4").exists()
    console = _console()
    run_sweep(_options(workspace, "s3", grid=["adapter.r=2,4"], parallel=2, sets=["train.max_steps=1"]), console)
    state = SweepState.read(workspace / "s3")  # what the worker processes left, read back from disk
    assert [t.status for t in state.trials] == [DONE, DONE]
    assert [t.values["adapter.r"] for t in state.trials] == [2, 4] and state.trials[1].metrics["eval_loss"] > 0
    assert "2 trials at a time, " in console.export_text()
    assert "trial-001: done" in (workspace / "s3" / "trial-001.log").read_text()


def test_optuna_search_runs_its_trials_in_range(workspace: Path) -> None:
    opts = _options(workspace, "s5", search="optuna", trials=2, ranges=["train.lr=1e-3:1e-1:log"],
                    grid=["adapter.r=2,4"], seed=5, sets=["train.max_steps=1"])
    state = run_sweep(opts, _console())
    assert [t.status for t in state.trials] == [DONE, DONE]
    for t in state.trials:
        assert 1e-3 <= t.values["train.lr"] <= 1e-1 and t.values["adapter.r"] in (2, 4)
        assert set(t.search_params) == {"train.lr", "adapter.r"}
        assert yaml.safe_load((workspace / "s5" / t.name / "config.yaml").read_text())["train"]["lr"] == t.values["train.lr"]
    assert state.plan["objective"] == {"metric": "eval_loss", "direction": "min"}
    with pytest.raises(LorakitError, match=r"different plan \(seed differs\)"):
        run_sweep(_options(workspace, "s5", search="optuna", trials=2, ranges=["train.lr=1e-3:1e-1:log"],
                           grid=["adapter.r=2,4"], seed=6, sets=["train.max_steps=1"]), _console())
