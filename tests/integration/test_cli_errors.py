"""`lorakit` error output: one line without --debug, the traceback with it; exit codes 2 / 1."""

from __future__ import annotations

import pytest

import lorakit.config
from lorakit import cli
from lorakit.errors import LorakitError


def run_main(*args: str) -> int:
    """cli.main in-process; returns the exit code."""
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    return exc.value.code


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAKIT_DEBUG", raising=False)


def _raising(err: BaseException):
    def load_config(*_a, **_k):
        raise err
    return load_config


def test_user_error_is_one_line_exit_2(monkeypatch, capsys) -> None:
    monkeypatch.setattr(lorakit.config, "load_config", _raising(LorakitError("bad value; fix it")))
    assert run_main("config", "show") == 2
    assert capsys.readouterr().err == "error: bad value; fix it\n"


def test_unexpected_error_is_one_line_naming_the_type_exit_1(monkeypatch, capsys) -> None:
    monkeypatch.setattr(lorakit.config, "load_config", _raising(ValueError("boom\nsecond line")))
    assert run_main("config", "show") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ValueError: boom" in err and "run with --debug for the traceback" in err
    assert "Traceback" not in err


def test_out_of_memory_names_the_setting_to_lower(monkeypatch, capsys) -> None:
    monkeypatch.setattr(lorakit.config, "load_config", _raising(MemoryError()))
    assert run_main("train", "x.yaml") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err and "train.batch_size" in err


@pytest.mark.parametrize("where", ["first", "last", "env"])
def test_debug_shows_the_traceback(monkeypatch, where) -> None:
    monkeypatch.setattr(lorakit.config, "load_config", _raising(ValueError("boom")))
    args = ["config", "show"]
    if where == "first":
        args = ["--debug", *args]
    elif where == "last":
        args = [*args, "--debug"]
    else:
        monkeypatch.setenv("LORAKIT_DEBUG", "1")
    with pytest.raises(ValueError, match="boom"):  # not turned into a line: Python prints the traceback
        cli.main(args)
    monkeypatch.delenv("LORAKIT_DEBUG", raising=False)
    with pytest.raises(LorakitError):
        monkeypatch.setattr(lorakit.config, "load_config", _raising(LorakitError("x")))
        cli.main(["--debug", "config", "show"])


def test_help_lists_debug(capsys) -> None:
    assert run_main("--help") == 0
    assert "--debug" in capsys.readouterr().out


def test_debug_does_not_leak_into_the_callers_environment(monkeypatch) -> None:
    import os

    monkeypatch.setattr(lorakit.config, "load_config", _raising(LorakitError("x")))
    with pytest.raises(LorakitError):
        cli.main(["--debug", "config", "show"])
    assert "LORAKIT_DEBUG" not in os.environ
