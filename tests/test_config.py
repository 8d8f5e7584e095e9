"""Config loading and validation: every problem reported at once, with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorakit.config import Config, dump_config, load_config
from lorakit.errors import ConfigError
from tests.conftest import run_cli


def _write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_and_yaml(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, {"model": {"name": "x/y"}, "adapter": {"r": 8, "target_modules": "q_proj"}}))
    assert cfg.model.name == "x/y" and cfg.adapter.r == 8
    assert cfg.adapter.target_modules == ["q_proj"]  # a single name becomes a list
    assert cfg.model.trust_remote_code is False
    assert load_config(None) == Config()


def test_overrides(tmp_path: Path) -> None:
    cfg = load_config(
        _write(tmp_path, {"adapter": {"r": 8}}),
        ["adapter.r=4", "adapter.alpha=1e-1", "adapter.target_modules=[q_proj, v_proj]", "seed=7", "adapter.use_rslora=true"],
    )
    assert cfg.adapter.r == 4 and cfg.adapter.alpha == 0.1 and cfg.seed == 7 and cfg.adapter.use_rslora
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    path = _write(tmp_path, {"adapter": {"rr": 8, "alpha": "big", "dropout": 1.0, "init": "kaiming_uniform", "r": 0},
                             "modle": {}, "seed": "x"})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = err.value.problems
    text = "\n".join(problems)
    assert "adapter.rr: unknown key; did you mean adapter.r?" in text
    assert "modle: unknown key; did you mean model?" in text
    assert "adapter.alpha: expected a number, got a string ('big')" in text
    assert "adapter.dropout: must be in [0, 1), got 1.0" in text
    assert "adapter.r: must be > 0, got 0" in text
    assert "adapter.init: must be one of 'kaiming', 'gaussian', got 'kaiming_uniform'; did you mean 'kaiming'?" in text
    assert "seed: expected an integer" in text
    assert len(problems) == 7
    assert all(str(path) in p for p in problems)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="line 3: .*fix the YAML syntax"):
        load_config(_write(tmp_path, "adapter:\n  r: [1,\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["adapter.r"])
    with pytest.raises(ConfigError, match="config: adapter: expected a mapping, got a number"):
        load_config(None, ["adapter=3"])


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["adapter.r=4", "model.name=foo/bar"])
    dump_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml") == cfg


@pytest.mark.parametrize(
    ("content", "overrides", "needle"),
    [
        ({"adapter": {"rank": 8}}, [], "adapter.rank: unknown key; did you mean adapter.r?"),
        ({"adapter": {"r": "eight"}}, [], "adapter.r: expected an integer"),
        ({"adapter": {"dropout": -0.1}}, [], "adapter.dropout: must be in [0, 1)"),
        (None, [], "config file not found"),
        ({}, ["adapter.r=-1"], "adapter.r: must be > 0, got -1"),
    ],
)
def test_cli_config_errors_are_one_line_exit_2(tmp_path: Path, content, overrides, needle) -> None:
    path = tmp_path / "missing.yaml" if content is None else _write(tmp_path, content)
    args = ["config", "show", str(path)] + [a for o in overrides for a in ("--set", o)]
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


@pytest.mark.parametrize("override", ["train.lr=nan", "train.lr=NaN", "train.epochs=inf", "train.epochs=.inf",
                                      "adapter.alpha=-inf", "train.max_grad_norm=nan", "train.adam_betas=[0.9, .nan]",
                                      "data.eval_ratio=nan"])
def test_non_finite_floats_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(None, [override])


def test_on_keys_stay_keys_in_yaml(tmp_path) -> None:
    """YAML 1.1 reads a key `on:` as True; lorakit reads YAML 1.2 booleans (only true/false)."""
    from lorakit.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  kl_to_base:\n    weight: 1\n    on: [replay, non_target]\n  fused_mlp: false\n"
                    "  early_stop:\n    metric: fact\n    on: eval\neval:\n  every: 5\n")
    cfg = load_config(path)
    assert cfg.train.kl_to_base.on == ["replay", "non_target"] and cfg.train.early_stop.on == "eval"
    assert cfg.train.fused_mlp is False
    with pytest.raises(ConfigError, match="fused_mlp: expected true or false"):
        load_config(None, ["train.fused_mlp=yes"])


def test_dora_is_a_method_validated_like_lora() -> None:
    cfg = load_config(None, ["adapter.method=dora", "adapter.r=4", "adapter.use_rslora=true", "quantization.method=nf4"])
    assert cfg.adapter.method == "dora" and cfg.quantization.method == "nf4"  # QDoRA
    assert load_config(None, ["adapter.method=dora"]).quantization.method == "none"  # dora implies no quantization
    with pytest.raises(ConfigError, match="adapter.r"):
        load_config(None, ["adapter.method=dora", "adapter.r=0"])
    with pytest.raises(ConfigError, match="adapter.method"):
        load_config(None, ["adapter.method=doora"])
