"""The chat REPL (eval/chat.py) without a model: commands, history and the system prompt."""

from __future__ import annotations

import io

from lorakit.eval import chat as chat_module
from lorakit.eval.generate import GenerationSettings, InferenceModel


def test_history_reset_and_system_prompt(monkeypatch) -> None:
    asked = []

    def reply(im, messages, settings, write):
        asked.append([m["content"] for m in messages])
        write("ok")
        return "ok"

    monkeypatch.setattr(chat_module, "stream_reply", reply)
    im = InferenceModel(model=None, tokenizer=None, system_prompt="from the adapter", name="tiny", adapter="run/adapter")
    out = io.StringIO()
    stdin = io.StringIO("hi\nagain\n/reset\n/system be terse\nnew\n/help\n/exit\nnever read\n")
    chat_module.chat(im, GenerationSettings(), "sys", stdin, out)
    assert asked == [["sys", "hi"], ["sys", "hi", "ok", "again"], ["be terse", "new"]]
    assert im.system_prompt is None  # the conversation carries it as a message
    text = out.getvalue()
    assert text.startswith("chatting with tiny + run/adapter; /reset, /system TEXT, /exit\nyou> model> ok\n")
    assert "(history cleared)" in text and "(system prompt set; history cleared)" in text
    assert "(commands: /reset, /system TEXT, /exit)" in text


def test_end_of_input_ends_the_chat(monkeypatch) -> None:
    monkeypatch.setattr(chat_module, "stream_reply", lambda *a: "")
    out = io.StringIO()
    chat_module.chat(InferenceModel(model=None, tokenizer=None, name="m"), GenerationSettings(), None, io.StringIO(""), out)
    assert out.getvalue() == "chatting with m; /reset, /system TEXT, /exit\nyou> \n"
