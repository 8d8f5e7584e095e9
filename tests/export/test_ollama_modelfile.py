"""The Modelfile read by Ollama's own code: its parser, its parameter typing, its chat-template execution.

`ollama` itself does not install offline here, so `ollama_check/main.go` holds Ollama's parser, FormatParams
and the `.Messages` branch of its template execution, copied from its source (commit named in the file), and
Debian's Go runs it (`make test` installs golang-go best effort; without `go` these tests are skipped). The
conversations Ollama would render must equal the prompts lorakit trained and evaluated with.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lorakit.data.templates import render_prompt
from lorakit.export.modelfile import modelfile_text
from tests.conftest import tiny_tokenizer

CHECK = Path(__file__).parent / "ollama_check" / "main.go"
pytestmark = pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (apt-get install golang-go)")

SYSTEM = "You answer from the handbook. If it does not say, reply: I can't answer that."
CONVERSATIONS = [
    [{"role": "user", "content": "Who chairs the board?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
    [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello.\nYes."},
     {"role": "user", "content": "Capital of {{ France }}? \"quoted\" ü"}],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": " d "}, {"role": "user", "content": "e"}],
]


def ollama_reads(modelfile: Path, conversations: list) -> dict:
    convs = modelfile.parent / "conversations.json"
    convs.write_text(json.dumps(conversations))
    proc = subprocess.run(["go", "run", str(CHECK), str(modelfile), str(convs)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("template", ["auto", "chatml"])  # llama2 has no Modelfile (export refuses it)
def test_ollama_renders_the_training_prompts(tmp_path: Path, template: str) -> None:
    tok = tiny_tokenizer()
    (tmp_path / "demo.gguf").write_bytes(b"GGUF")
    modelfile = tmp_path / "demo.Modelfile"
    modelfile.write_text(modelfile_text("demo.gguf", tok, template, SYSTEM))
    got = ollama_reads(modelfile, CONVERSATIONS)
    assert got["from"] == str((tmp_path / "demo.gguf").resolve())
    assert got["system"] == SYSTEM
    assert got["parameters"]["temperature"] == 0 and got["parameters"]["num_ctx"] == 2048
    assert "<|im_end|>" in got["parameters"]["stop"]
    for conv, rendered in zip(CONVERSATIONS, got["renders"]):
        # Ollama puts the Modelfile's SYSTEM first when a conversation has none, as lorakit's training did
        expected = conv if conv[0]["role"] == "system" else [{"role": "system", "content": SYSTEM}] + conv
        assert rendered == render_prompt(expected, template, tok)


def test_a_broken_modelfile_is_refused_by_the_checker(tmp_path: Path) -> None:
    """The checker is Ollama's parser, not a rubber stamp: a wrong parameter and a missing FROM fail."""
    (tmp_path / "demo.gguf").write_bytes(b"GGUF")
    text = modelfile_text("demo.gguf", tiny_tokenizer(), "chatml", SYSTEM)
    bad = tmp_path / "bad.Modelfile"
    convs = tmp_path / "c.json"
    convs.write_text("[]")
    for broken, message in ((text, None),
                            (text + "PARAMETER temprature 0\n", "unknown parameter 'temprature'"),
                            (text + "PARAMETER num_ctx many\n", "invalid int value"),
                            (text.replace("FROM ./demo.gguf\n", ""), "no FROM line"),
                            (text.replace('SYSTEM """', 'SYSTEM """x', 1).replace(SYSTEM + '"""', SYSTEM), "unexpected EOF")):
        bad.write_text(broken)
        proc = subprocess.run(["go", "run", str(CHECK), str(bad), str(convs)], capture_output=True, text=True,
                              timeout=300)
        if message is None:
            assert proc.returncode == 0, proc.stderr
        else:
            assert proc.returncode == 1 and message in proc.stderr


@pytest.mark.slow
def test_the_demo_modelfile_renders_smollm2_prompts(tmp_path: Path) -> None:
    """What `export gguf` writes for the demo's run (SmolLM2's own chat template, the demo's system prompt)."""
    from transformers import AutoTokenizer

    from lorakit.config import load_config
    from lorakit.models.resolve import builtin_path

    path = builtin_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cfg = load_config(Path(__file__).parents[2] / "examples" / "handbook" / "lora.yaml")
    (tmp_path / "demo.gguf").write_bytes(b"GGUF")
    modelfile = tmp_path / "demo.Modelfile"
    modelfile.write_text(modelfile_text("demo.gguf", tok, cfg.data.template, cfg.data.system_prompt))
    got = ollama_reads(modelfile, CONVERSATIONS[:1] + CONVERSATIONS[2:])
    assert got["parameters"]["stop"] == ["<|im_end|>"]
    for conv, rendered in zip(CONVERSATIONS[:1] + CONVERSATIONS[2:], got["renders"]):
        expected = conv if conv[0]["role"] == "system" else [{"role": "system", "content": cfg.data.system_prompt}] + conv
        assert rendered == render_prompt(expected, cfg.data.template, tok)
