"""Reading an OpenAI request: the JSON body, the model, the sampling settings, messages or prompt, limits.

Every check raises `APIError`: an HTTP status + OpenAI's error object
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse

from lorakit.config import ServeConfig
from lorakit.eval.generate import GenerationSettings
from lorakit.serve.engine import ServedModel


class APIError(Exception):
    """A request the server refuses: HTTP status + OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


async def read_json(request: HTTPRequest) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def pick_model(models: dict[str, ServedModel], body: dict[str, Any]) -> ServedModel:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise APIError(400, "model is required: the base model's id or an adapter's name (GET /v1/models)",
                       param="model", code="missing_model")
    served = models.get(name)
    if served is None:
        raise APIError(404, f"the model {name!r} does not exist; served: {', '.join(models)}",
                       param="model", code="model_not_found")
    return served


def settings(body: dict[str, Any], cfg: ServeConfig) -> GenerationSettings:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = cfg.max_tokens if max_tokens is None else max_tokens
    if not _is_int(max_tokens) or max_tokens < 1:
        raise APIError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
    if max_tokens > cfg.max_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {cfg.max_tokens}",
                       param="max_tokens", code="max_tokens_exceeded")
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be a number in [0, 2], got {temperature!r}", param="temperature")
    top_p = 1.0 if body.get("top_p") is None else body["top_p"]
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be a number in (0, 1], got {top_p!r}", param="top_p")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(31)
    elif not _is_int(seed):
        raise APIError(400, f"seed must be an integer, got {seed!r}", param="seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "stop must be a string or a list of at most 4 strings", param="stop")
    n = body.get("n", 1)
    if n not in (1, None):
        raise APIError(400, f"n={n!r}: this server returns one choice per request", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    return GenerationSettings(int(max_tokens), float(temperature), float(top_p), int(seed), stop)


def check_prompt(ids: list[int], s: GenerationSettings, param: str, cfg: ServeConfig, max_positions: int) -> None:
    if not ids:
        raise APIError(400, "the prompt is empty", param=param)
    if len(ids) > cfg.max_prompt_tokens:
        raise APIError(400, f"the prompt is {len(ids)} tokens; this server allows at most {cfg.max_prompt_tokens}",
                       param=param, code="context_length_exceeded")
    if max_positions and len(ids) + s.max_new_tokens > max_positions:
        raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({s.max_new_tokens}) exceeds the model's "
                       f"context of {max_positions} tokens", param="max_tokens",
                       code="context_length_exceeded")


def ignore_eos(body: dict[str, Any]) -> bool:
    """vLLM's extra parameter: exactly max_tokens (benchmarks)."""
    value = body.get("ignore_eos", False)
    if not isinstance(value, bool):
        raise APIError(400, f"ignore_eos must be true or false, got {value!r}", param="ignore_eos")
    return value


def lora_name_and_path(body: dict[str, Any]) -> tuple[str, str]:
    """/v1/load_lora_adapter's body -> (name, path)."""
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
        raise APIError(400, "give lora_name and lora_path (strings)", param="lora_name")
    if any(c.isspace() for c in name) or "/" in name:
        raise APIError(400, f"lora_name {name!r} has spaces or '/'", param="lora_name")
    return name, path


ROLES = ("system", "user", "assistant")


def messages(value: Any) -> list[dict[str, str]]:
    """OpenAI's messages (content a string or a list of text parts) -> [{"role", "content"}]."""
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES + ("developer",):
            raise APIError(400, f"messages[{i}] needs a role of {', '.join(ROLES)}", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    if out[-1]["role"] == "assistant":
        raise APIError(400, "the last message is the assistant's; end with a user message", param="messages")
    return out


def prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise APIError(400, "prompt must be a string (one prompt per request)", param="prompt")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
