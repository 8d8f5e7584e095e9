"""User and model text is printed with rich markup off; result files are written before printing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from lorakit import cli

MARKUP = "[/INST] [bold]x[/] [red"


def run_main(*args: str) -> int:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    return exc.value.code


def test_generate_prompt_with_markup_writes_out_and_prints_it(tiny_chat_model_dir: Path, tmp_path: Path,
                                                               capsys) -> None:
    out = tmp_path / "answers.jsonl"
    code = run_main("generate", "--model", str(tiny_chat_model_dir), "--prompt", MARKUP, "--out", str(out),
                    "--max-new-tokens", "3", "--dtype", "fp32")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(out.read_text())["prompt"] == MARKUP
    assert f"> {MARKUP}" in captured.out


def test_generate_writes_out_before_printing(tiny_chat_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def broken_console():
        raise OSError("terminal gone")

    monkeypatch.setattr(cli, "_console", broken_console)
    out = tmp_path / "answers.jsonl"
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(tiny_chat_model_dir), "--prompt", "hi", "--out", str(out),
                  "--max-new-tokens", "2", "--dtype", "fp32"])
    assert out.exists()


def _comparison() -> dict:
    ex = {"prompt": MARKUP, "outputs": {"base": "[/b] no", "[x]": "[/x] yes"},
          "scores": {"base": {"fact": 0.0}, "[x]": {"fact": 1.0}}}
    return {"labels": ["base", "[x]"],
            "datasets": {"[/d]": {"n": 1, "metrics": {"fact": {"base": 0.0, "[x]": 1.0}}, "primary_metric": "fact",
                                  "examples": [ex]}},
            "forgetting": {"warnings": [f"warn {MARKUP}"]}}


def test_compare_printout_takes_markup_literally() -> None:
    from lorakit.eval.commands import print_comparison

    buf = io.StringIO()
    print_comparison(_comparison(), Console(file=buf, width=200))
    text = buf.getvalue()
    assert f"Q: {MARKUP}" in text and "[/x] yes" in text and f"warn {MARKUP}" in text and "[/d]" in text


def test_demo_summary_takes_markup_literally() -> None:
    from lorakit.demo import print_summary

    held = {"prompt": MARKUP, "outputs": {"base": "[/b]", "tuned": "[/t]"},
            "scores": {"base": {"fact": 0.0}, "tuned": {"fact": 1.0}}}
    comparison = {"summary": [], "datasets": {"heldout": {"examples": [held]}, "unanswerable": {"examples": []}},
                  "forgetting": {"warnings": ["[/w]"]}}
    buf = io.StringIO()
    print_summary(Console(file=buf, width=200), comparison)
    assert f"Q: {MARKUP}" in buf.getvalue() and "[/w]" in buf.getvalue()
