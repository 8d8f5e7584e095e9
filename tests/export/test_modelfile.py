"""The Ollama Modelfile: its TEMPLATE renders conversations as lorakit's training template does."""

from __future__ import annotations

from lorakit.data.templates import render, render_prompt
from lorakit.export.modelfile import go_template, measure_turns, modelfile_text
from tests.conftest import tiny_tokenizer

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello.\nYes."}, {"role": "user", "content": "Capital of France?"}]


def test_turns_reproduce_the_training_template() -> None:
    tok = tiny_tokenizer()
    for template in ("auto", "chatml"):
        turns = measure_turns(template, tok)
        assert turns.render(CONV) == render_prompt(CONV, template, tok)
        assert turns.render(CONV[:3]) == render(CONV[:3], template, tok).text[: len(turns.render(CONV[:3]))]


def test_modelfile_content() -> None:
    text = modelfile_text("demo.gguf", tiny_tokenizer(), "auto", "You answer from the handbook.")
    lines = text.splitlines()
    assert lines[1] == "FROM ./demo.gguf"
    assert 'SYSTEM """You answer from the handbook."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER temperature 0" in lines
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == go_template(measure_turns("auto", tiny_tokenizer()))
    assert template.startswith('{{ $prev := "" }}{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n')
    assert template.endswith('{{ if eq $prev "user" }}<|im_end|>\n<|im_start|>assistant\n{{ end }}')
    assert "{{-" not in template  # no whitespace trimming: the template's newlines are kept as written
