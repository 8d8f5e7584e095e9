"""`lorakit synth qa` end to end against a live OpenAI-compatible server on 127.0.0.1, with the official client.

No mocks of the client: tests/synth/openai_server.py is a real HTTP server answering
/v1/chat/completions with a realistic teacher's JSON (tests/synth/qa_fixtures.py), deliberate
429 and 500 answers, and counts of the requests it saw.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from lorakit.errors import LorakitError
from lorakit.synth.qa import QAOptions, synth_qa
from tests.conftest import run_cli
from tests.synth.openai_server import TeacherServer
from tests.synth.qa_fixtures import SETTINGS, respond, write_doc

KEY = "sk-test-DO-NOT-LEAK-7f3a9c"


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _cli(server: TeacherServer, doc: Path, out: Path, *extra: str, key: str | None = KEY):
    env = os.environ.copy()
    env.pop("OPENAI_API_KEY", None)
    if key is not None:
        env["MY_TEACHER_KEY"] = key
    args = ["synth", "qa", str(doc), "--out", str(out), "--teacher-url", server.url, "--teacher-model", "teacher-1",
            "--api-key-env", "MY_TEACHER_KEY", *(a for s in SETTINGS for a in ("--set", s)), *extra]
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_endpoint_teacher_writes_the_three_files_and_a_report(tmp_path: Path) -> None:
    doc, out = write_doc(tmp_path / "docs"), tmp_path / "out"
    with TeacherServer(respond) as server:
        server.fail = [429, 500]  # retried with backoff
        proc = _cli(server, doc, out)
        assert proc.returncode == 0, proc.stderr
        # 3 windows x 2 asks, one reply without JSON asked again, and the two failed requests
        assert server.hits == 6 + 1 + 2 and server.auth == {f"Bearer {KEY}"}
        train, heldout, unanswerable = (_read(out / f"{n}.jsonl") for n in ("train", "heldout", "unanswerable"))
        assert {r["messages"][0]["content"] for r in heldout} == {
            "Which engineer was responsible for the lighthouse at Gull Point?",
            "Name the person who constructed the Gull Point light.", "What did Mara Quill build?",
            "From what distance is the light of the lamp visible?", "At what hour does the museum open its doors?",
            "What bus route should visitors take to reach Gull Point?"} - {r["messages"][0]["content"] for r in train}
        assert len(heldout) == 4 and len(train) + len(heldout) + len(unanswerable) == 12
        for r in train + heldout:
            if r["kind"] == "fact":
                assert r["fact"].lower() in r["messages"][1]["content"].lower()
                span = r["source"]["span"]
                assert r["fact"].lower() in doc.read_text()[span[0]:span[1]].lower()
                assert r["source"]["file"] == str(doc) and isinstance(r["window"], int)
        refusals = [r for r in train + unanswerable if r["kind"] == "refusal"]
        assert len(refusals) == 2 and all(r["messages"][1]["content"] == "I can't answer that from the handbook."
                                          and r["fact"] == r["messages"][1]["content"] for r in refusals)
        assert {r.get("variant") for r in train + heldout} == {"question", "paraphrase", "reverse", None}  # None: refusals
        report = json.loads((out / "synth_report.json").read_text())
        assert report["calls"] | {"teacher_seconds": 0} == {
            "total": 7, "cached": 0, "failed": 0, "retried": 1, "read_from_text": 0, "malformed": 0,
            "incomplete_items": 1, "teacher_seconds": 0}
        assert report["rejected"] == {"prompt example": 0, "length": 1, "refusal in a fact row": 1,
                                      "answer lacks fact": 0, "ungrounded": 1, "answerable": 1, "duplicate": 1}
        assert report["files"] == {"train": len(train), "heldout": 4, "unanswerable": len(unanswerable)}
        assert report["windows"] == 3 and report["tokens"]["prompt"] > 0
        html = (out / "synth_report.html").read_text()
        assert "Content-Security-Policy" in html and "Gull Point" in html and "<script" not in html
        assert "wrote" in proc.stdout and "7 teacher calls" in proc.stdout

        # the same command again: every call from the cache (keyed by URL, model, settings, prompt), the same files
        before = _files(out)
        server.hits = 0
        proc = _cli(server, doc, out)
        assert proc.returncode == 0, proc.stderr
        assert server.hits == 0
    after = _files(out)
    assert {k: v for k, v in after.items() if not k.startswith("synth_report")} == \
        {k: v for k, v in before.items() if not k.startswith("synth_report")}
    assert json.loads(after["synth_report.json"])["calls"]["cached"] == 7

    # the key is nowhere on disk or in what was printed
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in proc.stdout + proc.stderr


def test_an_interrupted_run_resumes_without_repeating_calls(tmp_path: Path) -> None:
    doc, out = write_doc(tmp_path / "docs"), tmp_path / "out"
    with TeacherServer(respond) as server:
        server.fail_after = 3  # the endpoint breaks after three answers
        proc = _cli(server, doc, out, "--set", "synth.retries=1", "--set", "synth.concurrency=1")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
        assert "kept answering 500" in proc.stderr and "after 2 tries" in proc.stderr
        assert not (out / "train.jsonl").exists()
        cached = [p for p in (out / "teacher_cache").rglob("*.json")]
        assert len(cached) == 3
        server.fail_after, server.hits = None, 0  # the endpoint is back
        proc = _cli(server, doc, out, "--set", "synth.concurrency=1")
        assert proc.returncode == 0, proc.stderr
        assert server.hits == 7 - 3
    report = json.loads((out / "synth_report.json").read_text())
    assert report["calls"]["cached"] == 3 and report["files"]["heldout"] == 4


def test_retries_back_off_then_succeed_in_process(tmp_path: Path) -> None:
    doc = write_doc(tmp_path / "docs")
    with TeacherServer(respond) as server:
        server.fail = [429, 503, 500, 502]
        result = synth_qa(QAOptions([doc], tmp_path / "out", teacher_url=server.url, teacher_model="t",
                                    overrides=[*SETTINGS, "synth.concurrency=1", "synth.retries=4"]))
        assert server.hits == 7 + 4
    assert result.report["files"]["heldout"] == 4


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_one_line(tmp_path: Path) -> None:
    doc, out = write_doc(tmp_path / "docs"), tmp_path / "out"
    proc = run_cli("synth", "qa", str(doc), "--out", str(out), "--teacher-url",
                   f"http://127.0.0.1:{_closed_port()}/v1", "--teacher-model", "m", "--set", "synth.retries=1",
                   "--set", "synth.backoff_s=0.01")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "cannot be reached" in proc.stderr and "check --teacher-url and that the server is running" in proc.stderr


def test_bad_input_is_one_line_and_keeps_what_the_user_had(tmp_path: Path) -> None:
    doc = write_doc(tmp_path / "docs")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    (tmp_path / "empty.md").write_text("")
    (tmp_path / "slides.pptx").write_bytes(b"PK")
    cases = [
        ([str(doc), "--out", str(busy)], "holds files synth qa did not write (notes.txt)"),
        ([str(tmp_path / "empty.md"), "--out", str(tmp_path / "o1")], "empty.md is empty"),
        ([str(tmp_path / "slides.pptx"), "--out", str(tmp_path / "o2")], "unknown document type '.pptx'"),
        ([str(tmp_path / "missing.md"), "--out", str(tmp_path / "o3")], "missing.md does not exist"),
        ([str(doc), "--out", str(tmp_path / "o4")], "give a teacher: --teacher MODEL"),
        ([str(doc), "--out", str(tmp_path / "o5"), "--teacher-url", "http://127.0.0.1:9/v1"], "needs --teacher-model"),
        ([str(doc), "--out", str(tmp_path / "o6"), "--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "m",
          "--api-key-env", "NO_SUCH_KEY_VAR"], "NO_SUCH_KEY_VAR: that environment variable is not set"),
        ([str(doc), "--out", str(tmp_path / "o7"), "--teacher", "m", "--set", "synth.window_tokens=0"],
         "synth.window_tokens: must be >= 1"),
    ]
    for args, needle in cases:
        proc = run_cli("synth", "qa", *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and needle in proc.stderr, (needle, proc.stderr)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"] and (busy / "notes.txt").read_text() == "mine"
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))


def test_a_teacher_with_nothing_usable_is_an_error_with_a_report(tmp_path: Path) -> None:
    doc, out = write_doc(tmp_path / "docs"), tmp_path / "out"
    with TeacherServer(lambda prompt: "I am a small model and I like boats.") as server:
        with pytest.raises(LorakitError, match="gave no usable rows .* 6 malformed"):
            synth_qa(QAOptions([doc], out, teacher_url=server.url, teacher_model="t", overrides=SETTINGS))
        assert server.hits == 12  # each asked twice
    report = json.loads((out / "synth_report.json").read_text())
    assert report["calls"]["malformed"] == 6 and not (out / "train.jsonl").exists()


def test_plain_text_replies_count_as_read_from_text(tmp_path: Path) -> None:
    def plain(prompt: str) -> str:
        if "NOT answer" in prompt:
            return "1. How many steps does the lighthouse tower have?"
        return "Question: Who built the Gull Point lighthouse?\nAnswer: Mara Quill." if "Mara Quill" in prompt \
            else "I do not know."

    doc = write_doc(tmp_path / "docs")
    with TeacherServer(plain) as server:
        result = synth_qa(QAOptions([doc], tmp_path / "out", teacher_url=server.url, teacher_model="t",
                                    overrides=SETTINGS))
    calls = result.report["calls"]
    assert (calls["total"], calls["retried"], calls["read_from_text"], calls["malformed"]) == (12, 6, 4, 2)
    train = _read(tmp_path / "out" / "train.jsonl") + _read(tmp_path / "out" / "unanswerable.jsonl")
    assert {(r["messages"][0]["content"], r["fact"]) for r in train} == {
        ("Who built the Gull Point lighthouse?", "Mara Quill"),
        ("How many steps does the lighthouse tower have?", "I can't answer that from the handbook.")}


def test_a_folder_of_the_users_own_train_jsonl_is_not_taken_for_an_earlier_run(tmp_path: Path) -> None:
    from lorakit.synth.qa import check_out_folder

    mine = tmp_path / "data"
    mine.mkdir()
    (mine / "train.jsonl").write_text('{"prompt": "mine", "completion": "mine"}\n')
    with pytest.raises(LorakitError, match=r"holds train.jsonl but no synth_report.json or teacher_cache/"):
        check_out_folder(mine)
    (mine / "synth_report.json").write_text("{}")  # an earlier synth qa run's folder: it resumes
    check_out_folder(mine)


def test_documents_under_the_output_folder_are_not_read(tmp_path: Path) -> None:
    from lorakit.synth.documents import find_documents

    doc = write_doc(tmp_path / "docs")
    out = tmp_path / "docs" / "out"
    out.mkdir()
    (out / "train.jsonl").write_text('{"text": "x"}\n')
    files, _ = find_documents([tmp_path / "docs"], out)
    assert files == [doc]
