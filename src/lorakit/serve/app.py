"""The HTTP side of `lorakit serve`: OpenAI's routes, shapes and error schema on Starlette + uvicorn.

`Api` holds the engine, metrics and API key; its methods are the route handlers. A handler parses
and checks a request (`serve.requests`), hands it to the scheduler thread (`Engine.scheduler`) and
waits for its events on an asyncio queue; a streamed answer goes out as server-sent events in
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
from lorakit.serve import requests as parse
from lorakit.serve.engine import AdapterBusy, Engine, ServedModel, UnknownAdapter
from lorakit.serve.metrics import Metrics
from lorakit.serve.requests import APIError
from lorakit.serve.scheduler import Event, QueueFull, Request, ShuttingDown

__all__ = ["PAGE_CSP", "APIError", "Api", "api_key_from_env", "create_app"]

PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class Api:
    """The server's route handlers, bound to one engine, its metrics and the API key (None: no auth)."""

    def __init__(self, engine: Engine, metrics: Metrics, api_key: str | None = None) -> None:
        self.engine, self.metrics, self.api_key = engine, metrics, api_key
        self.cfg = engine.cfg
        self.page = resources.files("lorakit.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    # ------------------------------------------------------------------ checks

    def check_auth(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key")

    def runtime_allowed(self) -> None:
        if not self.cfg.allow_runtime_adapters:
            raise APIError(403, "runtime adapter loading is off; start the server with --allow-runtime-adapters "
                           "and --adapter-root DIR", code="runtime_adapters_disabled")

    # ------------------------------------------------------------------ the scheduler

    def submit(self, served: ServedModel, ids: list[int], s: GenerationSettings, strip: bool, eos: frozenset[int]
               ) -> tuple[Request, asyncio.Queue[Event]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, event)

        req = Request(ids, served.slot, eos, s, sink, strip=strip)
        try:
            self.engine.scheduler.submit(req)
        except QueueFull:
            raise APIError(429, f"the server is busy ({self.cfg.max_queue} requests waiting); retry shortly",
                           code="queue_full", type="rate_limit_error", headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", code="shutting_down", type="server_error") from None
        self.metrics.tokens_in(len(ids))
        return req, queue

    async def next_event(self, req: Request, queue: asyncio.Queue[Event], http: HTTPRequest | None) -> Event:
        """The request's next event; a timeout or (when waiting for the whole answer) a vanished client cancels it."""
        while True:
            left = req.submitted + self.cfg.request_timeout_s - time.monotonic()
            if left <= 0:
                req.cancelled = True
                raise APIError(504, f"the request took longer than {self.cfg.request_timeout_s:g} s and was cancelled",
                               code="timeout", type="server_error")
            try:
                return await asyncio.wait_for(queue.get(), timeout=min(left, 0.5))
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    req.cancelled = True
                    raise APIError(499, "the client went away", code="client_closed") from None

    # ------------------------------------------------------------------ completions

    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self.completion(request, chat=True)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self.completion(request, chat=False)

    async def completion(self, request: HTTPRequest, chat: bool) -> Response:
        started = time.monotonic()
        model_id = "-"
        try:
            self.check_auth(request)
            body = await parse.read_json(request)
            served = parse.pick_model(self.engine.models, body)
            model_id = served.id
            req, queue = self.accept(served, body, chat)
        except APIError as err:
            self.metrics.request(model_id, err.status)
            return err.response()
        except LorakitError as err:  # a template that cannot render these messages
            self.metrics.request(model_id, 400)
            return APIError(400, str(err), param="messages" if chat else "prompt").response()
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": served.id}
        if body.get("stream"):
            options = body.get("stream_options") or {}
            usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return StreamingResponse(self.stream(req, queue, meta, chat, usage, started),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.answer(request, req, queue, meta, chat, started)

    def accept(self, served: ServedModel, body: dict[str, Any], chat: bool) -> tuple[Request, asyncio.Queue[Event]]:
        """Check the rest of a completion request and submit it to the scheduler."""
        s = parse.settings(body, self.cfg)
        if chat:
            ids = self.engine.chat_ids(served, parse.messages(body.get("messages")))
        else:
            ids = self.engine.text_ids(parse.prompt(body.get("prompt")))
        parse.check_prompt(ids, s, "messages" if chat else "prompt", self.cfg, self.engine.max_positions)
        eos = frozenset() if parse.ignore_eos(body) else served.eos
        return self.submit(served, ids, s, strip=chat, eos=eos)

    async def answer(self, request: HTTPRequest, req: Request, queue: asyncio.Queue[Event], meta: dict[str, Any],
                     chat: bool, started: float) -> Response:
        """Wait for the whole answer (a vanished client cancels it) and send it as one JSON object."""
        pieces: list[str] = []
        try:
            while True:
                event = await self.next_event(req, queue, request)
                if event.kind == "delta":
                    pieces.append(event.text)
                    continue
                if event.kind == "error":
                    raise APIError(500, f"generation failed: {event.text}", type="server_error", code="internal_error")
                break
        except APIError as err:
            req.cancelled = True
            self.metrics.request(meta["model"], err.status)
            return err.response()
        finally:
            req.cancelled = True  # nothing more is read: a row still running leaves the batch
        self.metrics.request(meta["model"], 200)
        self.metrics.finished(time.monotonic() - started)
        text = "".join(pieces)
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                   "finish_reason": event.finish_reason} if chat else
                                  {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason})
        return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                             "usage": _usage(event)})

    async def stream(self, req: Request, queue: asyncio.Queue[Event], meta: dict[str, Any], chat: bool, usage: bool,
                     started: float) -> AsyncIterator[str]:
        """The answer as server-sent events; a client that goes away cancels the request (status 499)."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        status = 200
        try:
            if chat:
                yield _chunk(meta, chat, None, None, role=True)
            while True:
                try:
                    event = await self.next_event(req, queue, None)
                except APIError as err:
                    status = err.status
                    yield _sse({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
                    return
                if event.kind == "delta":
                    yield _chunk(meta, chat, event.text, None)
                elif event.kind == "error":
                    status = 500
                    yield _sse({"error": {"message": f"generation failed: {event.text}", "type": "server_error",
                                          "param": None, "code": "internal_error"}})
                    return
                else:
                    yield _chunk(meta, chat, None, event.finish_reason)
                    if usage:
                        yield _sse({**meta, "object": kind, "choices": [], "usage": _usage(event)})
                    yield "data: [DONE]\n\n"
                    self.metrics.finished(time.monotonic() - started)
                    return
        except asyncio.CancelledError:  # the client went away (or the server stopped waiting)
            status = 499
            raise
        finally:
            req.cancelled = True
            self.metrics.request(meta["model"], status)

    # ------------------------------------------------------------------ models and adapters

    async def list_models(self, request: HTTPRequest) -> Response:
        try:
            self.check_auth(request)
        except APIError as err:
            return err.response()
        data = [{"id": m.id, "object": "model", "created": m.created, "owned_by": "lorakit", "root": m.root,
                 "parent": m.parent} for m in list(self.engine.models.values())]
        return JSONResponse({"object": "list", "data": data})

    async def load_lora(self, request: HTTPRequest) -> Response:
        try:
            self.check_auth(request)
            self.runtime_allowed()
            name, path = parse.lora_name_and_path(await parse.read_json(request))
            await asyncio.to_thread(self.engine.load_adapter, name, path)
        except APIError as err:
            return err.response()
        except PermissionError as err:
            return APIError(403, str(err), param="lora_path", code="outside_adapter_root").response()
        except LorakitError as err:
            return APIError(400, str(err), param="lora_path").response()
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: HTTPRequest) -> Response:
        try:
            self.check_auth(request)
            self.runtime_allowed()
            body = await parse.read_json(request)
            name = body.get("lora_name")
            if not isinstance(name, str) or not name:
                raise APIError(400, "lora_name must be the name of a served adapter (a string)", param="lora_name")
            await asyncio.to_thread(self.engine.unload_adapter, name)
        except APIError as err:
            return err.response()
        except UnknownAdapter as err:
            return APIError(404, str(err), param="lora_name", code="model_not_found").response()
        except AdapterBusy as err:
            return APIError(409, str(err), param="lora_name", code="adapter_in_use").response()
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    # ------------------------------------------------------------------ health, metrics, the playground

    async def health(self, request: HTTPRequest) -> Response:
        scheduler = self.engine.scheduler
        if scheduler.error is not None:
            return JSONResponse({"status": "error", "error": str(scheduler.error)}, status_code=503)
        return JSONResponse({"status": "ok", "batch_size": scheduler.batch_size, "queue_depth": scheduler.queue_depth})

    async def prometheus(self, request: HTTPRequest) -> Response:
        try:
            self.check_auth(request)
        except APIError as err:
            return err.response()
        self.metrics.set_batch(self.engine.scheduler.batch_size, self.engine.scheduler.queue_depth)
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def playground(self, request: HTTPRequest) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer"})

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.engine.scheduler.start()
        yield
        # uvicorn has already waited up to grace_s for the requests in flight; cancel what is left
        await asyncio.to_thread(self.engine.scheduler.shutdown, 1.0)


def create_app(engine: Engine, metrics: Metrics, api_key: str | None = None) -> Starlette:
    api = Api(engine, metrics, api_key)
    routes = [
        Route("/", api.playground, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.prometheus, methods=["GET"]),
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/load_lora_adapter", api.load_lora, methods=["POST"]),
        Route("/v1/unload_lora_adapter", api.unload_lora, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=api.lifespan, exception_handlers={404: _not_found, 405: _not_allowed})


def _not_found(request: HTTPRequest, exc: Exception) -> Response:
    return APIError(404, f"no route {request.url.path}", code="not_found").response()


def _not_allowed(request: HTTPRequest, exc: Exception) -> Response:
    return APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed").response()


def _chunk(meta: dict[str, Any], chat: bool, delta: str | None, finish: str | None, role: bool = False) -> str:
    """One streamed chunk: chat's delta (the first one carries the role) or a completion's text."""
    if chat:
        d: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
            {} if delta is None else {"content": delta})
        choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
    return _sse({**meta, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]})


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(event: Event) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def api_key_from_env(name: str | None) -> str | None:
    if not name:
        return None
    key = os.environ.get(name, "")
    if not key:
        raise LorakitError(f"--api-key-env {name}: the environment variable {name} is unset or empty; "
                           f"export {name}=... or leave the option out")
    return key
