"""The HTTP side of `lorakit serve`: OpenAI's routes, shapes and error schema on Starlette + uvicorn.

Handlers parse and check a request, hand it to the scheduler thread (`Engine.scheduler`) and
wait for its events on an asyncio queue; a streamed answer goes out as server-sent events in
OpenAI's chunk format. Every failure a client can cause is a 4xx with
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from lorakit.errors import LorakitError
from lorakit.eval.generate import GenerationSettings
from lorakit.serve.engine import Engine, ServedModel
from lorakit.serve.metrics import Metrics
from lorakit.serve.scheduler import Event, QueueFull, Request, ShuttingDown


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


PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def create_app(engine: Engine, metrics: Metrics, api_key: str | None = None) -> Starlette:
    cfg = engine.cfg

    def check_auth(request: HTTPRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key")

    async def read_json(request: HTTPRequest) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def pick_model(body: dict[str, Any]) -> ServedModel:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "model is required: the base model's id or an adapter's name (GET /v1/models)",
                           param="model", code="missing_model")
        served = engine.models.get(name)
        if served is None:
            raise APIError(404, f"the model {name!r} does not exist; served: {', '.join(engine.models)}",
                           param="model", code="model_not_found")
        return served

    def settings(body: dict[str, Any]) -> GenerationSettings:
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

    def check_prompt(ids: list[int], s: GenerationSettings, param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server allows at most {cfg.max_prompt_tokens}",
                           param=param, code="context_length_exceeded")
        if engine.max_positions and len(ids) + s.max_new_tokens > engine.max_positions:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({s.max_new_tokens}) exceeds the model's "
                           f"context of {engine.max_positions} tokens", param="max_tokens",
                           code="context_length_exceeded")

    def submit(served: ServedModel, ids: list[int], s: GenerationSettings, strip: bool, eos: frozenset[int]
               ) -> tuple[Request, asyncio.Queue[Event]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, event)

        req = Request(ids, served.slot, eos, s, sink, strip=strip)
        try:
            engine.scheduler.submit(req)
        except QueueFull:
            raise APIError(429, f"the server is busy ({cfg.max_queue} requests waiting); retry shortly",
                           code="queue_full", type="rate_limit_error", headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", code="shutting_down", type="server_error") from None
        metrics.tokens_in(len(ids))
        return req, queue

    async def next_event(req: Request, queue: asyncio.Queue[Event], http: HTTPRequest | None) -> Event:
        """The request's next event; a timeout or (when waiting for the whole answer) a vanished client cancels it."""
        while True:
            left = req.submitted + cfg.request_timeout_s - time.monotonic()
            if left <= 0:
                req.cancelled = True
                raise APIError(504, f"the request took longer than {cfg.request_timeout_s:g} s and was cancelled",
                               code="timeout", type="server_error")
            try:
                return await asyncio.wait_for(queue.get(), timeout=min(left, 0.5))
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    req.cancelled = True
                    raise APIError(499, "the client went away", code="client_closed") from None

    async def completion(request: HTTPRequest, chat: bool) -> Response:
        started = time.monotonic()
        model_id = "-"
        try:
            check_auth(request)
            body = await read_json(request)
            served = pick_model(body)
            model_id = served.id
            s = settings(body)
            if chat:
                ids = engine.chat_ids(served, _messages(body.get("messages")))
            else:
                ids = engine.text_ids(_prompt(body.get("prompt")))
            check_prompt(ids, s, "messages" if chat else "prompt")
            ignore_eos = body.get("ignore_eos", False)  # vLLM's extra parameter: exactly max_tokens (benchmarks)
            if not isinstance(ignore_eos, bool):
                raise APIError(400, f"ignore_eos must be true or false, got {ignore_eos!r}", param="ignore_eos")
            req, queue = submit(served, ids, s, strip=chat, eos=frozenset() if ignore_eos else served.eos)
        except APIError as err:
            metrics.request(model_id, err.status)
            return err.response()
        except LorakitError as err:  # a template that cannot render these messages
            metrics.request(model_id, 400)
            return APIError(400, str(err), param="messages" if chat else "prompt").response()
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": served.id}
        if body.get("stream"):
            options = body.get("stream_options") or {}
            usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return StreamingResponse(stream(req, queue, meta, chat, usage, started), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces: list[str] = []
        try:
            while True:
                event = await next_event(req, queue, request)
                if event.kind == "delta":
                    pieces.append(event.text)
                    continue
                if event.kind == "error":
                    raise APIError(500, f"generation failed: {event.text}", type="server_error", code="internal_error")
                break
        except APIError as err:
            req.cancelled = True
            metrics.request(served.id, err.status)
            return err.response()
        finally:
            req.cancelled = True  # nothing more is read: a row still running leaves the batch
        metrics.request(served.id, 200)
        metrics.finished(time.monotonic() - started)
        text = "".join(pieces)
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                   "finish_reason": event.finish_reason} if chat else
                                  {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason})
        return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                             "usage": _usage(event)})

    async def stream(req: Request, queue: asyncio.Queue[Event], meta: dict[str, Any], chat: bool, usage: bool,
                     started: float) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {} if delta is None else {"content": delta})
                choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return _sse({**meta, "object": kind, "choices": [choice]})

        status = 200
        try:
            if chat:
                yield chunk(None, None, role=True)
            while True:
                try:
                    event = await next_event(req, queue, None)
                except APIError as err:
                    status = err.status
                    yield _sse({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
                    return
                if event.kind == "delta":
                    yield chunk(event.text, None)
                elif event.kind == "error":
                    status = 500
                    yield _sse({"error": {"message": f"generation failed: {event.text}", "type": "server_error",
                                          "param": None, "code": "internal_error"}})
                    return
                else:
                    yield chunk(None, event.finish_reason)
                    if usage:
                        yield _sse({**meta, "object": kind, "choices": [], "usage": _usage(event)})
                    yield "data: [DONE]\n\n"
                    metrics.finished(time.monotonic() - started)
                    return
        except asyncio.CancelledError:  # the client went away (or the server stopped waiting)
            status = 499
            raise
        finally:
            req.cancelled = True
            metrics.request(meta["model"], status)

    async def chat_completions(request: HTTPRequest) -> Response:
        return await completion(request, chat=True)

    async def completions(request: HTTPRequest) -> Response:
        return await completion(request, chat=False)

    async def list_models(request: HTTPRequest) -> Response:
        try:
            check_auth(request)
        except APIError as err:
            return err.response()
        data = [{"id": m.id, "object": "model", "created": m.created, "owned_by": "lorakit", "root": m.root,
                 "parent": m.parent} for m in list(engine.models.values())]
        return JSONResponse({"object": "list", "data": data})

    async def load_lora(request: HTTPRequest) -> Response:
        try:
            check_auth(request)
            runtime_allowed()
            body = await read_json(request)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
                raise APIError(400, "give lora_name and lora_path (strings)", param="lora_name")
            if any(c.isspace() for c in name) or "/" in name:
                raise APIError(400, f"lora_name {name!r} has spaces or '/'", param="lora_name")
            await asyncio.to_thread(engine.load_adapter, name, path)
        except APIError as err:
            return err.response()
        except PermissionError as err:
            return APIError(403, str(err), param="lora_path", code="outside_adapter_root").response()
        except LorakitError as err:
            return APIError(400, str(err), param="lora_path").response()
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(request: HTTPRequest) -> Response:
        try:
            check_auth(request)
            runtime_allowed()
            body = await read_json(request)
            name = body.get("lora_name")
            await asyncio.to_thread(engine.unload_adapter, name)
        except APIError as err:
            return err.response()
        except KeyError:
            return APIError(404, f"no adapter named {name!r} is served", param="lora_name",
                            code="model_not_found").response()
        except RuntimeError as err:
            return APIError(409, str(err), param="lora_name", code="adapter_in_use").response()
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    def runtime_allowed() -> None:
        if not cfg.allow_runtime_adapters:
            raise APIError(403, "runtime adapter loading is off; start the server with --allow-runtime-adapters "
                           "and --adapter-root DIR", code="runtime_adapters_disabled")

    async def health(request: HTTPRequest) -> Response:
        if engine.scheduler.error is not None:
            return JSONResponse({"status": "error", "error": str(engine.scheduler.error)}, status_code=503)
        return JSONResponse({"status": "ok", "batch_size": engine.scheduler.batch_size,
                             "queue_depth": engine.scheduler.queue_depth})

    async def prometheus(request: HTTPRequest) -> Response:
        try:
            check_auth(request)
        except APIError as err:
            return err.response()
        metrics.set_batch(engine.scheduler.batch_size, engine.scheduler.queue_depth)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    page = resources.files("lorakit.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    async def playground(request: HTTPRequest) -> Response:
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.scheduler.start()
        yield
        # uvicorn has already waited up to grace_s for the requests in flight; cancel what is left
        await asyncio.to_thread(engine.scheduler.shutdown, 1.0)

    routes = [
        Route("/", playground, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/load_lora_adapter", load_lora, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        404: lambda r, e: APIError(404, f"no route {r.url.path}", code="not_found").response(),
        405: lambda r, e: APIError(405, f"{r.method} is not allowed on {r.url.path}", code="method_not_allowed"
                                   ).response(),
    })
    return app


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(event: Event) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


ROLES = ("system", "user", "assistant")


def _messages(value: Any) -> list[dict[str, str]]:
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


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise APIError(400, "prompt must be a string (one prompt per request)", param="prompt")
    return value


def api_key_from_env(name: str | None) -> str | None:
    if not name:
        return None
    key = os.environ.get(name, "")
    if not key:
        raise LorakitError(f"--api-key-env {name}: the environment variable {name} is unset or empty; "
                           f"export {name}=... or leave the option out")
    return key
