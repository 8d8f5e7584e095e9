"""Dataset formats: recognise a file's layout and normalise each row to a conversation.

Every chat-like format (alpaca, prompt/completion, OpenAI `messages`, ShareGPT
`conversations`) becomes one shape, a list of {"role", "content"} messages with roles
system / user / assistant, so templates, masking and evaluation only ever deal with that.
Plain `text` rows stay strings (trained end to end). Columns a format does not use (a
`fact`, an `id`, a `source`) travel along in `Conversation.meta` for evaluation reports.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.readers import Record, load_records
from lorakit.errors import DataError, LorakitError

__all__ = ["FORMATS", "Conversation", "Message", "detect_format", "load_prompts", "load_records", "record_meta",
           "to_example"]

Message = dict[str, str]

# format -> (required columns, optional columns); also the help text of detection errors.
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "sharegpt": (("conversations",), ()),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Conversation:
    """A normalised chat example: messages to render, and the row's other columns."""

    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)


def detect_format(records: Sequence[Record], path: str | Path) -> str:
    """The format whose required columns the first rows have (checked in `FORMATS` order)."""
    columns: list[str] = []
    for record in records[:5]:
        columns += [c for c in record if c not in columns]
    for fmt, (required, _) in FORMATS.items():
        if all(c in columns for c in required):
            return fmt
    known = "; ".join(f"{fmt} ({', '.join(req)}{_optional(opt)})" for fmt, (req, opt) in FORMATS.items())
    raise DataError(f"{path}: cannot tell the data format from the columns {columns}; known formats: {known}; "
                    "rename the columns or set data.format")


def _optional(columns: tuple[str, ...]) -> str:
    return f", optional {', '.join(columns)}" if columns else ""


def record_meta(record: Record, fmt: str) -> dict[str, Any]:
    """The row's columns that the format does not consume."""
    required, optional = FORMATS[fmt]
    return {k: v for k, v in record.items() if k not in required and k not in optional}


def to_example(record: Record, fmt: str, row: int, path: str | Path, answer: bool = True) -> Conversation | str:
    """Row `row` (1-based) of `path` as a Conversation, or a string for the text format.

    answer=False reads a row that only asks (`load_prompts`): alpaca's output and prompt/completion's
    completion are not needed, a chat need not hold an assistant turn, and the conversation ends
    before any last answer.
    """
    where = f"{path} row {row}"
    required, optional = FORMATS[fmt]
    if not answer and fmt in ("alpaca", "prompt_completion"):
        required, optional = required[:1], required[1:] + optional  # the answer column becomes optional
    for column in required:
        if column not in record:
            raise DataError(f"{where}: missing column {column!r} ({fmt} format needs "
                            f"{', '.join(required)}{_optional(optional)}); fix the row or set data.format")
    if fmt == "text":
        text = _string(record["text"], where, "text")
        if not text.strip():
            raise DataError(f"{where}: empty text; remove the row")
        return text
    if fmt == "alpaca":
        user = _string(record["instruction"], where, "instruction")
        extra = _string(record.get("input") or "", where, "input")
        if extra.strip():
            user = f"{user}\n\n{extra}"
        system = _string(record.get("system") or "", where, "system")
        messages = [{"role": "system", "content": system}] if system.strip() else []
        messages.append({"role": "user", "content": user})
        if answer:
            messages.append({"role": "assistant", "content": _answer(record["output"], where, "output")})
    elif fmt == "prompt_completion" and isinstance(record["prompt"], list):
        # TRL's conversational prompt/completion: both columns are lists of chat messages.
        role_map = {r: r for r in ROLES}
        messages = _turns(record["prompt"], where, "prompt", "role", "content", role_map, need_answer=False)
        if answer:
            completion = _turns(record["completion"], where, "completion", "role", "content", role_map)
            if not completion or any(m["role"] != "assistant" for m in completion):
                raise DataError(f"{where}: column 'completion' must hold assistant messages only")
            messages += completion
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _string(record["prompt"], where, "prompt")}]
        if answer:
            messages.append({"role": "assistant", "content": _answer(record["completion"], where, "completion")})
    elif fmt == "messages":
        messages = _turns(record["messages"], where, "messages", "role", "content", {r: r for r in ROLES}, answer)
    elif fmt == "sharegpt":
        messages = _turns(record["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES, answer)
    else:
        raise DataError(f"{where}: unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not answer and messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # the answer the row holds is generated anew
    return Conversation(messages, record_meta(record, fmt))


def load_prompts(path: str | Path) -> list[list[Message] | str]:
    """What `lorakit generate --file` asks, row by row: a `prompt` string as is; a `messages` list (up to a
    last assistant turn) or an alpaca `instruction` (+ input, under its own `system`) as a conversation.

    An alpaca row without a system column stays the plain string it always was.
    """
    prompts: list[list[Message] | str] = []
    for row, record in enumerate(load_records(str(path)), start=1):
        if isinstance(record.get("messages"), list):
            prompts.append(_as_prompt(to_example(record, "messages", row, path, answer=False)))
        elif isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(record.get("instruction"), str):
            prompts.append(_as_prompt(to_example(record, "alpaca", row, path, answer=False), plain=True))
        else:
            raise LorakitError(f"{path} row {row}: needs a 'prompt' string, 'messages' list or 'instruction'; "
                               f"it has {', '.join(map(str, record)) or 'no columns'}")
    if not prompts:
        raise LorakitError(f"{path} holds no prompts")
    return prompts


def _as_prompt(example: Conversation | str, plain: bool = False) -> list[Message] | str:
    """The example's messages; with plain=True a lone user message as its text."""
    assert isinstance(example, Conversation)
    if plain and [m["role"] for m in example.messages] == ["user"]:
        return example.messages[0]["content"]
    return example.messages


def _string(value: Any, where: str, column: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # CSV-like numeric answers ("42") are fine as text
    if value is None:
        raise DataError(f"{where}: column {column!r} is empty (null); fill it in or remove the row")
    raise DataError(f"{where}: column {column!r} should be text, got {type(value).__name__}")


def _answer(value: Any, where: str, column: str) -> str:
    text = "" if value is None else _string(value, where, column)
    if not text.strip():
        raise DataError(f"{where}: empty answer ({column!r} is empty); fill it in or remove the row")
    return text


def _turns(value: Any, where: str, column: str, role_key: str, content_key: str,
           roles: dict[str, str], need_answer: bool = True) -> list[Message]:
    """Validate a list of turns and map its roles onto system / user / assistant."""
    if isinstance(value, str):  # CSV and some exports store the list as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: column {column!r} is text that is not a JSON list of turns") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: column {column!r} should be a non-empty list of {{{role_key}, {content_key}}}")
    messages = []
    for k, turn in enumerate(value, 1):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f"{where}: message {k} should be an object with {role_key!r} and {content_key!r}")
        role = roles.get(str(turn[role_key]).lower())
        if role is None:
            raise DataError(f"{where}: message {k} has unknown role {turn[role_key]!r}; use one of {', '.join(roles)}")
        content = _content(turn[content_key], f"{where}: message {k}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: message {k}: empty answer (assistant {content_key!r} is empty); "
                            "fill it in or remove the turn")
        messages.append({"role": role, "content": content})
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be trained; "
                        "add the answer or remove the row")
    return messages


def _content(value: Any, where: str) -> str:
    """Message content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise DataError(f"{where}: content should be text, got {type(value).__name__} (images and tools are not supported)")
