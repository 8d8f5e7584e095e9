"""The teacher of `lorakit synth qa`: a lorakit model or an OpenAI-compatible endpoint, behind a call cache.

Every reply is stored under the hash of the call (the teacher's identity, its settings and the
prompt; never the API key) in the output folder, one small file per call, written atomically.
A run that was interrupted, or is repeated with the same inputs, takes each call it has already
made from there: nothing is asked twice, and the same inputs give the same files.

The local teacher is lorakit's own batched generation (`eval.generate.generate_answers`); the
endpoint teacher is the official `openai` client, with `concurrency` requests in flight, a
timeout per request, and retries with exponential backoff on 429, 5xx, timeouts and connection
errors. A request the endpoint refuses (400: too long, bad model) is a counted skip; an endpoint
that cannot be reached, or rejects the key, is a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

CACHE_DIR = "teacher_cache"
Prompt = str | list[dict[str, str]]
"""A user message, or a whole conversation (few-shot examples as earlier turns)."""


@dataclass(frozen=True)
class Limits:
    """A call's own reply length and stop strings, in place of the teacher's settings."""

    max_new_tokens: int
    stop: tuple[str, ...] = ()


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    """Why the teacher gave no reply to this call (a counted skip); None when it replied."""


@dataclass
class CallStats:
    calls: int = 0
    cached: int = 0
    failed: int = 0
    retried: int = 0
    """Replies without JSON, asked again with a reminder (those calls are among `calls`)."""
    from_text: int = 0
    """Asks whose content was read from plain text ("Question: ... Answer: ...") after two replies without JSON."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    """Time spent waiting for new (uncached) replies."""


class TeacherCache:
    """Replies by content hash, one JSON file per call under `folder`."""

    def __init__(self, folder: Path, identity: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.identity = identity

    def key(self, prompt: Prompt, limits: Limits | None = None) -> str:
        call: dict[str, Any] = {"teacher": self.identity, "prompt": prompt}
        if limits is not None:  # a call with its own reply length or stop strings (answer-first synth qa)
            call["limits"] = asdict(limits)
        blob = json.dumps(call, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> Reply | None:
        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
            return Reply(str(data["text"]), int(data["prompt_tokens"]), int(data["completion_tokens"]))
        except (OSError, ValueError, KeyError, TypeError):  # absent, or damaged: ask again
            return None

    def put(self, key: str, reply: Reply) -> None:
        from lorakit.io import atomic_write_text

        atomic_write_text(self._path(key), json.dumps(asdict(reply), ensure_ascii=False))


class Teacher:
    """Answers prompts; `run` calls `on_reply(i, reply)` as each prompt's reply arrives, in any order."""

    identity: dict[str, Any]
    context: int | None = None
    """Prompt plus reply tokens the teacher takes; None when unknown (an endpoint says so itself)."""

    def count_tokens(self, text: str) -> int:
        from lorakit.synth.documents import approx_tokens

        return approx_tokens(text)

    parameters: int | None = None
    """The model's parameter count where known (a local teacher); synth.strategy auto reads it."""

    def prompt_tokens(self, prompt: Prompt) -> int:
        """Tokens of `prompt` as the teacher sees it (its chat template included, where known)."""
        if isinstance(prompt, list):
            return sum(self.count_tokens(m["content"]) + 4 for m in prompt)
        return self.count_tokens(prompt)

    def run(self, prompts: Sequence[Prompt], on_reply: Callable[[int, Reply], None],
            limits: Limits | None = None) -> None:
        raise NotImplementedError


def ask(teacher: Teacher, cache: TeacherCache, prompts: Sequence[Prompt], stats: CallStats,
        on_reply: Callable[[Reply], None] | None = None, limits: Limits | None = None) -> list[Reply]:
    """Replies to `prompts` in order: from the cache where it has them, else from the teacher (then cached)."""
    keys = [cache.key(p, limits) for p in prompts]
    replies: list[Reply | None] = [cache.get(k) for k in keys]
    stats.calls += len(prompts)
    for r in replies:
        if r is not None:
            stats.cached += 1
            stats.prompt_tokens += r.prompt_tokens
            stats.completion_tokens += r.completion_tokens
            if on_reply:
                on_reply(r)
    todo = [i for i, r in enumerate(replies) if r is None]

    def done(j: int, reply: Reply) -> None:
        i = todo[j]
        replies[i] = reply
        if reply.error is None:
            cache.put(keys[i], reply)
        else:
            stats.failed += 1
        stats.prompt_tokens += reply.prompt_tokens
        stats.completion_tokens += reply.completion_tokens
        if on_reply:
            on_reply(reply)

    if todo:
        started = time.perf_counter()
        try:
            teacher.run([prompts[i] for i in todo], done, limits)
        finally:
            stats.seconds += time.perf_counter() - started
    return [r if r is not None else Reply("", error="no reply") for r in replies]


class LocalTeacher(Teacher):
    """A lorakit model (alias, directory, .gguf, with an adapter), greedy or seeded sampling, in batches."""

    def __init__(self, source: Any, max_new_tokens: int, temperature: float, seed: int, batch_size: int) -> None:
        from lorakit.eval.generate import GenerationSettings

        self.im = source.load()
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        self.settings.check()
        self.batch_size = batch_size
        config = getattr(self.im.model, "config", None)
        self.context = getattr(config, "max_position_embeddings", None)
        self.parameters = sum(p.numel() for p in self.im.model.parameters())
        self.identity = {"kind": "local", "model": self.im.name, "adapter": self.im.adapter,
                         "template": self.im.template, "system": self.im.system_prompt,
                         "dtype": str(next(self.im.model.parameters()).dtype),
                         "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}

    def count_tokens(self, text: str) -> int:
        return len(self.im.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(self, prompt: Prompt) -> int:
        from lorakit.eval.generate import prompt_text

        return self.count_tokens(prompt_text(prompt, self.im))

    def run(self, prompts: Sequence[Prompt], on_reply: Callable[[int, Reply], None],
            limits: Limits | None = None) -> None:
        from dataclasses import replace

        from lorakit.eval.generate import generate_answers

        settings = self.settings if limits is None else \
            replace(self.settings, max_new_tokens=limits.max_new_tokens, stop=list(limits.stop))
        for first in range(0, len(prompts), self.batch_size):  # a batch at a time, so each is cached as it ends
            chunk = prompts[first : first + self.batch_size]
            answers = generate_answers(self.im, chunk, settings, self.batch_size)
            for j, (prompt, answer) in enumerate(zip(chunk, answers)):
                on_reply(first + j, Reply(answer.text, self.prompt_tokens(prompt), self.count_tokens(answer.text)))


class EndpointTeacher(Teacher):
    """An OpenAI-compatible chat completions endpoint, through the official client."""

    def __init__(self, url: str, model: str, api_key: str, max_new_tokens: int, temperature: float, seed: int,
                 concurrency: int, timeout_s: float, retries: int, backoff_s: float) -> None:
        try:
            import openai
        except ImportError:
            raise LorakitError("--teacher-url needs the openai client; pip install 'lorakit[synth]'") from None
        self.openai = openai
        self.url, self.model = url, model
        # the client's own retries are off: ours below count them, back off and name what failed
        self.client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=timeout_s)
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.concurrency, self.retries, self.backoff_s = concurrency, retries, backoff_s
        self.identity = {"kind": "endpoint", "url": url, "model": model, "max_new_tokens": max_new_tokens,
                         "temperature": temperature, "seed": seed}

    def run(self, prompts: Sequence[Prompt], on_reply: Callable[[int, Reply], None],
            limits: Limits | None = None) -> None:
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="teacher") as pool:
            futures = {pool.submit(self._call, p, limits): i for i, p in enumerate(prompts)}
            pending = set(futures)
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in sorted(finished, key=lambda f: f.exception() is not None):
                        on_reply(futures[f], f.result())  # every reply is kept (cached) before a failure is raised
            finally:
                for f in pending:
                    f.cancel()

    def _call(self, prompt: Prompt, limits: Limits | None = None) -> Reply:
        oa = self.openai
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        extra: dict[str, Any] = {"stop": list(limits.stop)} if limits is not None and limits.stop else {}
        for attempt in range(self.retries + 1):
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=messages,
                    max_tokens=self.max_new_tokens if limits is None else limits.max_new_tokens,
                    temperature=self.temperature, seed=self.seed, **extra)
                choice = response.choices[0] if response.choices else None
                text = (choice.message.content or "") if choice is not None else ""
                usage = response.usage
                return Reply(text.strip(), getattr(usage, "prompt_tokens", 0) or 0,
                             getattr(usage, "completion_tokens", 0) or 0)
            except (oa.RateLimitError, oa.InternalServerError, oa.APIConnectionError) as err:
                if attempt == self.retries:
                    raise LorakitError(self._gave_up(err)) from None
                time.sleep(self._delay(err, attempt))
            except oa.AuthenticationError:
                raise LorakitError(f"the teacher endpoint {self.url} rejected the API key (401); set the variable "
                                   "named by --api-key-env (default OPENAI_API_KEY) to a valid key") from None
            except oa.NotFoundError as err:
                raise LorakitError(f"the teacher endpoint {self.url} answered 404 ({_message(err)}); check "
                                   "--teacher-url (it usually ends in /v1) and --teacher-model") from None
            except oa.APIStatusError as err:  # 400 and the like: this request, not the endpoint
                return Reply("", error=f"{err.status_code}: {_message(err)}")
        raise AssertionError("unreachable")

    def _delay(self, err: Exception, attempt: int) -> float:
        delay = self.backoff_s * 2 ** attempt
        response = getattr(err, "response", None)
        after = response.headers.get("retry-after") if response is not None else None
        try:
            delay = max(delay, min(float(after), 60.0)) if after is not None else delay
        except ValueError:
            pass
        return delay

    def _gave_up(self, err: Exception) -> str:
        tries = f"{self.retries + 1} tries"
        if isinstance(err, self.openai.APIConnectionError):
            timeout = isinstance(err, self.openai.APITimeoutError)
            what = "timed out" if timeout else f"cannot be reached ({_message(err)})"
            fix = "raise synth.timeout_s or lower synth.concurrency" if timeout else \
                "check --teacher-url and that the server is running"
            return f"the teacher endpoint {self.url} {what} after {tries}; {fix}"
        status = getattr(err, "status_code", "?")
        return (f"the teacher endpoint {self.url} kept answering {status} ({_message(err)}) after {tries}; "
                "lower synth.concurrency, raise synth.retries, or try later (finished calls are cached)")


def _message(err: Exception) -> str:
    return " ".join(str(getattr(err, "message", None) or err).split())[:200]


def api_key(env_name: str) -> str:
    """The endpoint's key from the environment; a local server without keys gets a placeholder."""
    return os.environ.get(env_name) or "none"
