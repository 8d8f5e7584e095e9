"""A live `lorakit serve` on 127.0.0.1 driven by the official openai client (and httpx for raw bodies)."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.serve.conftest import PROMPTS, Live


def chat(client: openai.OpenAI, model: str, prompt: str, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=24, **kw)


def streamed(client: openai.OpenAI, model: str, prompt: str) -> tuple[str, str | None]:
    pieces, finish = [], None
    for chunk in chat(client, model, prompt, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(pieces), finish


def test_models_list_the_base_and_each_adapter_with_its_parent(live: Live) -> None:
    models = {m.id: m for m in live.client().models.list().data}
    base = str(live.served.model)
    assert set(models) >= {base, "alpha", "beta"}
    assert models["alpha"].parent == base and models["beta"].parent == base  # type: ignore[attr-defined]
    assert models[base].parent is None  # type: ignore[attr-defined]


def test_chat_answers_what_generate_answers(live: Live, reference) -> None:
    client = live.client()
    for model in ("alpha", "beta", str(live.served.model)):
        reply = chat(client, model, PROMPTS[1])
        assert reply.choices[0].message.content == reference[model][PROMPTS[1]]
        assert reply.model == model and reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 24
    assert reference["alpha"][PROMPTS[1]] != reference[str(live.served.model)][PROMPTS[1]]  # the adapters matter
    assert reference["beta"][PROMPTS[1]] != reference["alpha"][PROMPTS[1]]


def test_stream_sends_the_same_answer_in_pieces_with_usage(live: Live, reference) -> None:
    client = live.client()
    chunks = list(chat(client, "beta", PROMPTS[0], stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["beta"][PROMPTS[0]]
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1  # token by token, not at once
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_completions_continue_raw_text(live: Live) -> None:
    client = live.client()
    one = client.completions.create(model="alpha", prompt="the quick brown", max_tokens=8, temperature=0)
    assert one.choices[0].text and one.usage.completion_tokens == 8 and one.choices[0].finish_reason == "length"
    pieces = [c.choices[0].text for c in client.completions.create(model="alpha", prompt="the quick brown",
                                                                    max_tokens=8, temperature=0, stream=True)
              if c.choices]
    assert "".join(pieces) == one.choices[0].text


def test_sixteen_concurrent_streams_across_adapters_equal_generate(live: Live, reference) -> None:
    """More requests than batch rows (6): rows join and leave between decode steps, adapters mixed per batch."""
    base = str(live.served.model)
    jobs = [([base, "alpha", "beta"][i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(16)]
    client = live.client()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: streamed(client, *job), jobs))
    for (model, prompt), (text, finish) in zip(jobs, answers):
        assert text == reference[model][prompt], (model, prompt)
        assert finish in ("stop", "length")
    assert httpx.get(live.url + "/health").json()["batch_size"] == 0


def test_bad_requests_get_openai_errors(live: Live) -> None:
    client = live.client()
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, "no-such-adapter", "hi")
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "alpha", "hello world " * 100)  # > --max-prompt-tokens 200
    assert err.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=401)
    assert err.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=[])
    headers = {"Authorization": f"Bearer {live.key}", "Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", b'{"model": "alpha", "messages": "hi"}'):
        r = httpx.post(live.url + "/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 400, body
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(live.url + "/v1/nothing-here", headers=headers)
    assert r.status_code == 404 and "error" in r.json()


def test_every_route_but_health_needs_the_key(live: Live) -> None:
    with pytest.raises(openai.AuthenticationError):
        live.client(key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        chat(live.client(key="wrong"), "alpha", "hi")
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(live.url + path).status_code == 401
    assert httpx.post(live.url + "/v1/completions", json={"model": "alpha", "prompt": "x"}).status_code == 401
    assert httpx.get(live.url + "/health").status_code == 200


def test_metrics_count_requests_and_tokens(live: Live) -> None:
    chat(live.client(), "alpha", PROMPTS[2])
    text = httpx.get(live.url + "/metrics", headers={"Authorization": f"Bearer {live.key}"}).text
    assert 'lorakit_requests_total{model="alpha",status="200"}' in text
    for name in ("lorakit_prompt_tokens_total", "lorakit_completion_tokens_total", "lorakit_queue_depth",
                 "lorakit_batch_size", "lorakit_time_to_first_token_seconds_bucket",
                 "lorakit_request_latency_seconds_count"):
        assert name in text


def test_runtime_adapters_load_and_unload_under_the_root_only(live: Live, reference) -> None:
    headers = {"Authorization": f"Bearer {live.key}"}
    copy = live.adapter_root / "gamma"
    shutil.copytree(live.served.adapters["alpha"], copy)
    r = httpx.post(live.url + "/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(copy)},
                   headers=headers)
    assert r.status_code == 200, r.text
    assert chat(live.client(), "gamma", PROMPTS[3]).choices[0].message.content == reference["alpha"][PROMPTS[3]]
    outside = httpx.post(live.url + "/v1/load_lora_adapter", headers=headers,
                         json={"lora_name": "evil", "lora_path": str(live.served.adapters["beta"])})
    assert outside.status_code == 403 and outside.json()["error"]["code"] == "outside_adapter_root"
    escape = live.adapter_root / "escape"
    escape.symlink_to(live.served.adapters["beta"])
    assert httpx.post(live.url + "/v1/load_lora_adapter", headers=headers,
                      json={"lora_name": "evil", "lora_path": str(escape)}).status_code == 403
    pickled = live.adapter_root / "pickled"
    pickled.mkdir()
    shutil.copy(copy / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    r = httpx.post(live.url + "/v1/load_lora_adapter", headers=headers,
                   json={"lora_name": "pickled", "lora_path": str(pickled)})
    assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/unload_lora_adapter", json={"lora_name": ["gamma"]}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = httpx.post(live.url + "/v1/unload_lora_adapter", json={"lora_name": "nobody"}, headers=headers)
    assert r.status_code == 404 and "no adapter named 'nobody'" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/unload_lora_adapter", json={"lora_name": "gamma"}, headers=headers)
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        chat(live.client(), "gamma", PROMPTS[3])
    assert "gamma" not in {m.id for m in live.client().models.list().data}


def test_a_client_that_goes_away_frees_its_row(live: Live) -> None:
    headers = {"Authorization": f"Bearer {live.key}"}
    body = {"model": "beta", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 400,
            "temperature": 0, "stream": True}  # greedy on this model runs to the limit: about a second
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line and json.loads(line[5:])["choices"][0]["delta"]:
                break  # one piece read, then the connection closes
    deadline = time.monotonic() + 10
    while httpx.get(live.url + "/health").json()["batch_size"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(live.url + "/health").json()["batch_size"] == 0
    text = httpx.get(live.url + "/metrics", headers=headers).text
    assert 'lorakit_requests_total{model="beta",status="499"} 1' in text


def test_a_full_queue_answers_429_and_a_slow_request_504(served) -> None:
    """In-process (httpx's ASGI transport) with the scheduler not started, so requests stay queued."""
    import asyncio

    from lorakit.config import ServeConfig
    from lorakit.eval.generate import GenerationSettings
    from lorakit.serve.app import create_app
    from lorakit.serve.engine import Engine
    from lorakit.serve.metrics import Metrics
    from lorakit.serve.scheduler import Request

    engine = Engine(str(served.model), [], ServeConfig(max_batch=1, max_queue=2, request_timeout_s=0.3), "fp32")
    app = create_app(engine, Metrics())
    body = {"model": str(served.model), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
            slow = await client.post("/v1/chat/completions", json=body)  # queued, never run: times out
            engine.scheduler.submit(Request([1], -1, frozenset(), GenerationSettings(), lambda e: None))
            full = await client.post("/v1/chat/completions", json=body)  # two queued already: the queue is full
            return slow, full

    slow, full = asyncio.run(go())
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["type"] == "rate_limit_error"
