"""`lorakit serve` as a user runs it: one-line errors with exit 2, and SIGTERM drains then exits 0."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import httpx
import pytest

from lorakit.cli import main
from tests.serve.conftest import Served, start_server


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", *args])
    return int(exit_.value.code or 0), capsys.readouterr().err


def test_bad_arguments_are_one_line_errors(served: Served, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("serve:\n  max_batch: 4\n  mx_queue: 3\n")
    cases = [
        (["--config", str(config), "--model", str(served.model)], "serve.mx_queue: unknown key; did you mean "
                                                                   "serve.max_queue?"),
        (["--adapter", "handbook"], "expected NAME=DIR"),
        (["--adapter", f"x={tmp_path / 'missing'}"], "adapter directory not found"),
        (["--adapter", f"a={served.adapters['alpha']}", "--adapter", f"a={served.adapters['beta']}"], "given twice"),
        ([], "give --model"),
        (["--model", str(served.model), "--max-batch", "0"], "max_batch"),
        (["--model", str(served.model), "--allow-runtime-adapters"], "adapter_root"),
        (["--model", str(served.model), "--api-key-env", "LORAKIT_TEST_UNSET_KEY"], "unset or empty"),
    ]
    for args, message in cases:
        code, err = run(capsys, *args)
        assert code == 2 and message in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


def test_a_port_in_use_fails_before_the_model_loads(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, err = run(capsys, "--model", str(served.model), "--port", str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_sigterm_lets_the_running_answer_finish_then_exits_0(served: Served, tmp_path: Path) -> None:
    proc, url = start_server(served, tmp_path, key=None)
    try:
        body = {"model": "alpha", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 300,
                "temperature": 0, "stream": True}
        finish, pieces = None, 0
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[5:])["choices"][0]
                pieces += bool(choice["delta"].get("content"))
                if pieces == 1 and choice["delta"].get("content"):
                    proc.send_signal(signal.SIGTERM)  # mid-answer
                finish = choice["finish_reason"] or finish
        assert finish == "length"  # all 300 tokens came, after the signal
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code in (0, None) and "--adapter" in out and "--api-key-env" in out
