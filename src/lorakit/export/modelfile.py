"""An Ollama Modelfile beside a GGUF: FROM, TEMPLATE (the training template), SYSTEM, stop tokens, defaults.

Ollama's TEMPLATE is a Go text/template, not Jinja, so the chat template is not copied: it is
*measured*. lorakit's own renderer (the one training used, `data.templates.render`) renders a
conversation whose contents are markers; the text between the markers is what comes before each
turn given the turn before it (system -> user, user -> assistant, assistant -> user), and the Go
template puts exactly those strings back between Ollama's messages. A template that does not
render a conversation as turns joined by such strings is refused with its reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lorakit.errors import LorakitError

_S, _U, _A, _U2, _A2 = "\x01SYS\x01", "\x01USR\x01", "\x01AST\x01", "\x01USR2\x01", "\x01AST2\x01"


@dataclass
class Turns:
    """The strings a template puts before each message, by the role before it."""

    before_system: str  # at the start
    system_user: str  # after the system prompt, before the first user message
    user_assistant: str  # after a user message, before the answer (also the generation prompt)
    assistant_user: str  # after an answer, before the next user message
    default_system: str | None  # what the template inserts when there is no system message

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Go template below renders for `messages`, plus the generation prompt (for tests)."""
        out, prev = [], ""
        for m in messages:
            out.append({"system": self.before_system, "assistant": self.user_assistant}.get(
                m["role"], self.system_user if prev == "system" else self.assistant_user))
            out.append(m["content"])
            prev = m["role"]
        return "".join(out) + (self.user_assistant if prev == "user" else "")


def _split(text: str, markers: list[str]) -> list[str]:
    parts = []
    for marker in markers:
        head, sep, text = text.partition(marker)
        if not sep:
            raise LorakitError(f"the chat template drops a message's content ({marker.strip(chr(1)).lower()}); "
                               "lorakit cannot write an Ollama TEMPLATE for it; pass --no-modelfile to export the GGUF without one")
        parts.append(head)
    return parts + [text]


def measure_turns(template: str, tokenizer: Any) -> Turns:
    from lorakit.data.templates import render, render_prompt

    conv = [{"role": "system", "content": _S}, {"role": "user", "content": _U}, {"role": "assistant", "content": _A},
            {"role": "user", "content": _U2}, {"role": "assistant", "content": _A2}]
    pre, su, ua, au, _, _ = _split(render(conv, template, tokenizer).text, [_S, _U, _A, _U2, _A2])
    turns = Turns(pre, su, ua, au, None)
    prompt = render_prompt(conv[:2], template, tokenizer)
    if prompt != turns.render(conv[:2]):
        raise LorakitError("the chat template's generation prompt differs from its turn before an answer; "
                           "lorakit cannot write an Ollama TEMPLATE for it; pass --no-modelfile to export the GGUF without one")
    no_system = render_prompt(conv[1:2], template, tokenizer)
    if no_system.startswith(pre) and no_system.endswith(su + _U + ua) and len(no_system) > len(pre + su + _U + ua):
        turns.default_system = no_system[len(pre): -len(su + _U + ua)]
    return turns


def _go_literal(text: str) -> str:
    if "{{" in text or "}}" in text:
        raise LorakitError("the chat template's text holds '{{' or '}}'; lorakit cannot write it as an Ollama TEMPLATE")
    return text


def go_template(turns: Turns) -> str:
    """One line: no `{{-` trimming, so every newline of the template's strings survives as written."""
    t = {k: _go_literal(v) for k, v in vars(turns).items() if isinstance(v, str)}
    return ('{{ $prev := "" }}{{ range .Messages }}'
            f'{{{{ if eq .Role "system" }}}}{t["before_system"]}'
            f'{{{{ else if eq .Role "assistant" }}}}{t["user_assistant"]}'
            f'{{{{ else if eq $prev "system" }}}}{t["system_user"]}'
            f'{{{{ else }}}}{t["assistant_user"]}{{{{ end }}}}'
            '{{ .Content }}{{ $prev = .Role }}{{ end }}'
            f'{{{{ if eq $prev "user" }}}}{t["user_assistant"]}{{{{ end }}}}')


def _quoted(text: str) -> str:
    """A Modelfile value in triple quotes (newlines kept as written)."""
    if '"""' in text:
        raise LorakitError('a Modelfile value cannot hold """; lorakit cannot write this template or system prompt')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, tokenizer: Any, template: str = "auto", system_prompt: str | None = None,
                   context: int = 2048) -> str:
    """The Modelfile for `ollama create NAME -f Modelfile` run in the GGUF's directory."""
    from lorakit.data.templates import end_of_turn

    turns = measure_turns(template, tokenizer)
    system = system_prompt if system_prompt is not None else turns.default_system
    stops = list(dict.fromkeys(s for s in (end_of_turn(template, tokenizer), getattr(tokenizer, "eos_token", None)) if s))
    lines = ["# written by lorakit: `ollama create NAME -f {this file}` in this directory",
             f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(go_template(turns))}"]
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines += ["PARAMETER temperature 0", f"PARAMETER num_ctx {context}"]  # greedy: what lorakit evaluated
    return "\n".join(lines) + "\n"
