"""`lorakit chat`: a conversation in the terminal, each answer streamed as it is generated.

The model is asked as `lorakit generate` asks it (the adapter's template; its system prompt
unless --system gives one), but the conversation carries the system prompt as a message so
/system can change it. Commands: /reset clears the history, /system TEXT sets the system
prompt (and clears the history), /exit or /quit (or end of input) leaves.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO

from lorakit.eval.generate import GenerationSettings, InferenceModel, Message, load_for_inference, stream_reply


def run_chat(model: str | None, adapter: Path | None, settings: GenerationSettings, system: str | None = None,
             dtype: str = "auto", trust_remote_code: bool = False) -> None:
    """Load the model (and adapter) and chat on stdin / stdout."""
    im = load_for_inference(model, adapter, dtype, trust_remote_code=trust_remote_code)
    chat(im, settings, system if system is not None else im.system_prompt)


def chat(im: InferenceModel, settings: GenerationSettings, system_prompt: str | None,
         stdin: IO[str] | None = None, out: IO[str] | None = None) -> None:
    """The read-answer loop until /exit, end of input or Ctrl-C."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    im.system_prompt = None  # the conversation carries it as a message
    history: list[Message] = []
    label = im.name + (f" + {im.adapter}" if im.adapter else "")
    _say(out, f"chatting with {label}; /reset, /system TEXT, /exit\n")
    while True:
        try:
            _say(out, "you> ")
            line = stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:  # end of input
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            out.write("(history cleared)\n")
            continue
        if text.startswith("/system"):
            system_prompt = text[len("/system"):].strip() or None
            history = []
            out.write(f"(system prompt {'set' if system_prompt else 'removed'}; history cleared)\n")
            continue
        if text.startswith("/"):
            out.write("(commands: /reset, /system TEXT, /exit)\n")
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + history
        _say(out, "model> ")
        answer = stream_reply(im, messages, settings, lambda piece: _say(out, piece))
        out.write("\n")
        history.append({"role": "assistant", "content": answer})


def _say(out: IO[str], text: str) -> None:
    """Write and flush: the user sees each prompt and streamed piece at once."""
    out.write(text)
    out.flush()
