"""lorakit sweep's plan without training: grid expansion and pairing, input errors, Optuna, ranking, the page."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import yaml

from lorakit.errors import LorakitError
from lorakit.sweep import grid as g
from lorakit.sweep.command import SweepOptions, open_state, prepare
from lorakit.sweep.page import render
from lorakit.sweep.results import best, csv_text, pareto_front, ranked
from lorakit.sweep.search import raw_params, suggest
from lorakit.sweep.state import DONE, FAILED, PENDING, SweepState, TrialRecord


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "some-model"}, "data": {"train": "t.jsonl"},
                                    "output_dir": str(tmp_path / "run")}))
    return path


def test_grid_product_with_paired_keys_moving_together() -> None:
    axes = [g.parse_grid("train.lr=5e-4,1e-3"), g.parse_paired("adapter.r,adapter.alpha=8:16,16:32,64:64")]
    trials = g.expand(axes)
    assert len(trials) == 6
    assert trials == [{"train.lr": lr, "adapter.r": r, "adapter.alpha": a}
                      for lr, (r, a) in itertools.product(["5e-4", "1e-3"], [("8", "16"), ("16", "32"), ("64", "64")])]
    assert g.parse_grid("adapter.target_modules=[q_proj,v_proj],all-linear").points == [["[q_proj,v_proj]"], ["all-linear"]]


def test_values_are_typed_through_the_config(config: Path) -> None:
    values = g.check_values(config, [], g.expand([g.parse_paired("adapter.r,adapter.alpha=4:8,16:32"),
                                                  g.parse_grid("adapter.use_rslora=true,false")]))
    assert values[0] == {"adapter.r": 4, "adapter.alpha": 8.0, "adapter.use_rslora": True}
    assert values[3] == {"adapter.r": 16, "adapter.alpha": 32.0, "adapter.use_rslora": False}


@pytest.mark.parametrize("grid, message", [
    (["adapter.rank=4,8"], "--grid adapter.rank: unknown config key; did you mean adapter.r?"),
    (["adaptr.alpha=4,8"], "did you mean adapter.alpha?"),
    (["lr=1e-3,2e-3"], "did you mean train.lr?"),
    (["adapter.r=4,abc"], "sweep value adapter.r=abc: adapter.r: expected an integer, got a string ('abc')"),
    (["adapter.r=4,-1"], "sweep value adapter.r=-1: adapter.r: must be > 0, got -1"),
    (["train.lr="], "no values"),
    (["output_dir=a,b"], "the sweep sets this itself"),
    (["train.lr=1e-3", "train.lr=2e-3"], "swept twice"),
])
def test_bad_grid_is_one_line_before_any_trial(config: Path, grid: list[str], message: str) -> None:
    with pytest.raises(LorakitError) as err:
        prepare(SweepOptions(config, grid=grid, out=config.parent / "sweep"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (config.parent / "sweep").exists()


def test_empty_grid_bad_pairs_and_unknown_metric(config: Path) -> None:
    with pytest.raises(LorakitError, match="nothing to sweep"):
        prepare(SweepOptions(config))
    with pytest.raises(LorakitError, match="has 1 values for 2 keys"):
        prepare(SweepOptions(config, paired=["adapter.r,adapter.alpha=4:8,16"]))
    with pytest.raises(LorakitError, match="--metric fact: no trial will report it.*--eval-data adds"):
        prepare(SweepOptions(config, grid=["adapter.r=4,8"], metric="fact"))
    with pytest.raises(LorakitError, match="did you mean eval_loss"):
        prepare(SweepOptions(config, grid=["adapter.r=4,8"], metric="eval_los"))
    with pytest.raises(LorakitError, match="a range needs a number setting"):
        prepare(SweepOptions(config, search="optuna", ranges=["adapter.init=1:2"]))


def test_a_different_plan_in_the_sweep_directory_is_refused(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    first = prepare(SweepOptions(config, grid=["adapter.r=4,8"], out=out))
    open_state(first).save(out)
    again = open_state(prepare(SweepOptions(config, grid=["adapter.r=4,8"], out=out, metric="train_loss")))
    assert [t.status for t in again.trials] == [PENDING, PENDING] and again.metric == "train_loss"
    with pytest.raises(LorakitError, match=r"holds a sweep with a different plan \(axes differs\)"):
        open_state(prepare(SweepOptions(config, grid=["adapter.r=4,16"], out=out)))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(LorakitError, match="holds no sweep.json"):
        open_state(prepare(SweepOptions(config, grid=["adapter.r=4,8"], out=tmp_path / "other")))


def _optuna_run(seed: int, n: int = 8) -> list[dict[str, str]]:
    ranges = [g.parse_range("train.lr=1e-5:1e-2:log"), g.parse_range("adapter.r=2:64")]
    g.check_ranges(ranges)
    axes = [g.parse_grid("adapter.use_rslora=true,false")]
    history, out = [], []
    for i in range(n):
        sampled = suggest(i, seed, ranges, axes, True, history)
        params = raw_params(sampled, ranges, axes)
        lr, r = float(params["train.lr"]), int(params["adapter.r"])
        history.append((sampled, (lr - 1e-3) ** 2 * 1e6 + abs(r - 16) / 64))  # a made-up objective
        out.append(params)
    return out


def test_optuna_is_deterministic_with_a_seed() -> None:
    first, again, other = _optuna_run(0), _optuna_run(0), _optuna_run(1)
    assert first == again
    assert first != other
    for p in first:
        assert 1e-5 <= float(p["train.lr"]) <= 1e-2 and 2 <= int(p["adapter.r"]) <= 64
        assert p["adapter.use_rslora"] in ("true", "false") and p["adapter.r"].isdigit()


def _state(n: int, seed: int) -> SweepState:
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        r, lr = rng.choice([4, 16, 64]), rng.choice([5e-4, 1e-3])
        t = TrialRecord(i, {"adapter.r": str(r), "train.lr": str(lr)}, {"adapter.r": r, "train.lr": lr},
                        status=DONE, metrics={"fact": rng.random(), "retention": rng.random(),
                                              "eval_loss": rng.random() * 3})
        trials.append(t)
    trials[2].status, trials[2].metrics, trials[2].error = FAILED, {}, "boom"
    trials[5].metrics["fact"] = trials[1].metrics["fact"]  # a tie: the earlier trial ranks first
    return SweepState({"config": "c.yaml", "set": [], "search": "grid"}, trials, "fact", "max")


def test_ranking_best_and_pareto_front_against_a_direct_computation() -> None:
    state = _state(12, 7)
    done = [t for t in state.trials if t.status == DONE]
    expected = sorted(done, key=lambda t: (-t.metrics["fact"], t.index))
    order = ranked(state.trials, "fact", "max")
    assert [t.index for t in order[:len(done)]] == [t.index for t in expected]
    assert order[-1].index == 2  # the failed trial last
    assert best(state.trials, "fact", "max") is expected[0]
    lowest = min(done, key=lambda t: t.metrics["eval_loss"])
    assert best(state.trials, "eval_loss", "min") is lowest
    points = [(t.index, t.metrics["fact"], t.metrics["retention"]) for t in done]
    brute = {i for i, x, y in points
             if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for _, x2, y2 in points)}
    assert set(pareto_front(points)) == brute
    rows = csv_text(state).splitlines()
    assert rows[1].split(",")[1:3] == [expected[0].name, "yes"]
    assert rows[-1].split(",")[1] == "trial-002" and rows[-1].endswith("boom")


def test_page_is_offline_and_has_every_plot() -> None:
    page = render(_state(12, 3), "demo")
    # fact against r, fact against lr, the r x lr heatmap, the facts/retention front
    assert page.count('src="data:image/png;base64,') == 4
    assert "Pareto front" in page and '<span class="best">best</span>' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page


def test_the_shipped_sweep_plan_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # example paths are relative to the repository root
    sweep = prepare(SweepOptions(Path("examples/handbook/sweep.yaml")))
    assert len(sweep.trials) == 30 and sweep.metric == "fact" and sweep.direction == "max"
    pairs = {(t.values["adapter.r"], t.values["adapter.alpha"] / t.values["adapter.r"]) for t in sweep.trials}
    assert pairs == {(r, k) for r in (4, 8, 16, 32, 64) for k in (1.0, 2.0)}
    assert {t.values["train.lr"] for t in sweep.trials} == {5e-4, 1e-3, 2e-3}
    assert str(sweep.out) == "runs/handbook-sweep"


def test_bad_ranges_and_a_worker_that_died(config: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from lorakit.sweep.runner import worker_result

    with pytest.raises(LorakitError, match="integer setting; give whole-number bounds"):
        prepare(SweepOptions(config, search="optuna", ranges=["adapter.r=1.5:8"]))
    with pytest.raises(LorakitError, match="a log range needs LOW > 0"):
        prepare(SweepOptions(config, search="optuna", ranges=["train.lr=0:1e-2:log"]))
    with pytest.raises(LorakitError, match="sweep value train.warmup_ratio=1.5: train.warmup_ratio: must be in"):
        prepare(SweepOptions(config, search="optuna", ranges=["train.warmup_ratio=0.1:1.5"]))
    with pytest.raises(LorakitError, match="--range is for --search optuna"):
        prepare(SweepOptions(config, grid=["adapter.r=4"], ranges=["train.lr=1e-4:1e-3"]))
    trial = TrialRecord(0, {"adapter.r": "4"})
    (tmp_path / trial.name).mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    proc.log = open(tmp_path / "trial-000.log", "ab")  # as start_worker leaves it
    proc.wait()
    result = worker_result(tmp_path, trial, proc)
    assert result["status"] == FAILED and "exited with code 3 before writing its result" in result["error"]
