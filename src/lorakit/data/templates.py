"""Chat templates: turn a conversation into text plus the character spans that are trained.

Masks are computed on characters, not tokens: a template says where each assistant answer
starts and where its end-of-turn token (EOS) ends, and `tokenize.py` maps those spans onto
whatever tokens the tokenizer produces. Every trained span ends with the template's
end-of-turn string, so the tuned model learns to stop.

`render_prompt` is `render(...).text` cut at the start of the last answer, computed by the
same code, so the prompt used at inference is exactly the prefix seen in training.
Where an answer begins is chosen so that no token straddles the boundary: Llama-2's
"[/INST] answer" puts the space with the answer (as Meta's reference code does), since
BPE and SentencePiece both glue a leading space onto the following word.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lorakit.data.formats import Conversation, Message
from lorakit.errors import DataError

TEMPLATES = ("tokenizer", "chatml", "llama2", "alpaca")
CHATML_END = "<|im_end|>"
LLAMA2_BOS, LLAMA2_EOS = "<s>", "</s>"
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class Rendered:
    """Text to tokenize; `train_spans` are [start, end) character offsets of trained text."""

    text: str
    train_spans: list[tuple[int, int]]
    eos: str
    """The end-of-turn string that must end every trained span."""


@dataclass
class _Builder:
    """Concatenates pieces, remembering which character ranges are trained."""

    parts: list[str] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    size: int = 0

    def add(self, piece: str, train: bool = False) -> None:
        if train:
            self.spans.append((self.size, self.size + len(piece)))
        self.parts.append(piece)
        self.size += len(piece)

    def done(self, eos: str) -> Rendered:
        return Rendered("".join(self.parts), self.spans, eos)


def resolve_template(template: str, tokenizer: Any) -> str:
    """`auto` becomes the tokenizer's own chat template when it has one, else chatml."""
    if template == "auto":
        return "tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml"
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; use auto or one of {', '.join(TEMPLATES)}")
    if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template is 'tokenizer' but the tokenizer has no chat template; use chatml")
    return template


def end_of_turn(template: str, tokenizer: Any) -> str:
    """The string that ends an assistant turn; generation stops on it."""
    if template == "chatml":
        return CHATML_END
    if template == "llama2":
        return LLAMA2_EOS
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise DataError(f"the tokenizer has no eos_token, which the {template} template needs to end answers; "
                        "use the chatml template or a tokenizer with an EOS token")
    return eos


TEMPLATE_MARKERS = {"chatml": ("<|im_start|>", CHATML_END),
                    "llama2": ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", LLAMA2_BOS, LLAMA2_EOS)}


def control_strings(template: str, tokenizer: Any) -> tuple[str, ...]:
    """Strings that must not occur inside message text: the template's turn markers and every
    special token of the tokenizer. In a row they would open or close turns the data does not
    have (and train an end-of-turn token mid-answer)."""
    template = resolve_template(template, tokenizer)
    found = set(TEMPLATE_MARKERS.get(template, ()))
    found.update(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added.content))
    return tuple(sorted((t for t in found if t and t.strip()), key=lambda t: (-len(t), t)))


def find_control(example: Conversation | Sequence[Message] | str, controls: Sequence[str]) -> tuple[str, str] | None:
    """(role, control string) of the first message whose text contains one, or None."""
    if isinstance(example, Conversation):
        example = example.messages
    pieces = [("text", example)] if isinstance(example, str) else [(m["role"], m["content"]) for m in example]
    for role, text in pieces:
        for control in controls:
            if control in text:
                return role, control
    return None


def render(example: Conversation | Sequence[Message] | str, template: str, tokenizer: Any,
           system_prompt: str | None = None) -> Rendered:
    """Render a conversation (or plain text: text + EOS, all trained) with `template`."""
    template = resolve_template(template, tokenizer)
    if isinstance(example, Conversation):
        example = example.messages
    if isinstance(example, str):
        eos = end_of_turn("tokenizer", tokenizer)
        return Rendered(example + eos, [(0, len(example) + len(eos))], eos)
    messages = _with_system(example, system_prompt)
    eos = end_of_turn(template, tokenizer)
    if template == "chatml":
        return _chatml(messages, eos)
    if template == "llama2":
        return _llama2(messages, eos)
    if template == "alpaca":
        return _alpaca(messages, eos)
    return _tokenizer_template(messages, tokenizer, eos)


def render_prompt(messages: Sequence[Message], template: str, tokenizer: Any,
                  system_prompt: str | None = None) -> str:
    """The generation prompt: everything before the last assistant answer.

    A conversation that ends with an assistant turn gives the prompt that answer had in
    training; one that ends with a user turn gives the prompt for the next answer.
    """
    messages = list(messages)
    if not messages or messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": "x"})  # placeholder: only its start offset is used
    rendered = render(messages, template, tokenizer, system_prompt)
    return rendered.text[: rendered.train_spans[-1][0]]


def _with_system(messages: Sequence[Message], system_prompt: str | None) -> list[Message]:
    messages = [dict(m) for m in messages]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _chatml(messages: list[Message], eos: str) -> Rendered:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message; answers + <|im_end|> trained."""
    b = _Builder()
    for m in messages:
        b.add(f"<|im_start|>{m['role']}\n")
        if m["role"] == "assistant":
            b.add(m["content"] + eos, train=True)
            b.add("\n")
        else:
            b.add(f"{m['content']}{eos}\n")
    return b.done(eos)


def _llama2(messages: list[Message], eos: str) -> Rendered:
    """Llama-2-chat: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>` per turn pair."""
    b = _Builder()
    system = ""
    for m in messages:
        content = m["content"].strip()  # Meta's chat_completion strips every message
        if m["role"] == "system":
            system = content
        elif m["role"] == "user":
            if system:
                content, system = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}", ""
            b.add(f"{LLAMA2_BOS}[INST] {content} [/INST]")
        else:
            b.add(f" {content} {eos}", train=True)
    return b.done(eos)


def _alpaca(messages: list[Message], eos: str) -> Rendered:
    """Stanford Alpaca: preamble, `### Instruction:`, `### Response:`; a system message replaces the preamble."""
    b = _Builder()
    system = next((m["content"] for m in messages if m["role"] == "system"), ALPACA_PREAMBLE)
    b.add(system)
    for m in messages:
        if m["role"] == "user":
            b.add(f"\n\n### Instruction:\n{m['content']}\n\n### Response:\n")
        elif m["role"] == "assistant":
            b.add(m["content"] + eos, train=True)
    return b.done(eos)


def _tokenizer_template(messages: list[Message], tokenizer: Any, eos: str) -> Rendered:
    """The tokenizer's own Jinja template, answers located by rendering prefixes.

    For assistant message i: the answer starts where the render of messages[:i] with a
    generation prompt ends, and the trained span runs to the end of the first EOS inside
    the render of messages[:i+1]. A template that does not close turns with EOS gets one
    inserted at the end of the turn, so every trained answer still teaches the model to stop.
    """

    def apply(msgs: list[Message], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja2 TemplateError from raise_exception(), or a bad conversation shape
            raise DataError(f"the tokenizer's chat template rejects this conversation ({err}); "
                            "fix the conversation or set data.template: chatml") from err

    full = apply(messages, False)
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    cursor = shift = 0  # cursor: chars of `full` copied so far; shift: chars of EOS inserted before it
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise DataError("the conversation starts with an assistant turn, which the tokenizer's chat template "
                            "cannot locate; add the user turn before it or set data.template: chatml")
        prompt = apply(messages[:i], True)
        turn = full if i == len(messages) - 1 else apply(messages[: i + 1], False)  # the common case: 2 renders
        if not (turn.startswith(prompt) and full.startswith(turn) and len(prompt) >= cursor):
            raise DataError("the tokenizer's chat template renders earlier turns differently once later turns are "
                            "added (e.g. it drops past reasoning), so answers cannot be located; "
                            "set data.template: chatml")
        eos_at = turn.find(eos, len(prompt))
        end, insert = (eos_at + len(eos), "") if eos_at >= 0 else (len(turn), eos)
        parts += [full[cursor:end], insert]
        spans.append((len(prompt) + shift, end + shift + len(insert)))
        cursor, shift = end, shift + len(insert)
    parts.append(full[cursor:])
    return Rendered("".join(parts), spans, eos)
