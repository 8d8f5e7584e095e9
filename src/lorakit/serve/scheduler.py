"""Continuous batching on lorakit's own decode loop, many adapters in one batch.

One thread owns the model. Each turn of its loop it drops the rows that finished or whose
client went away, prefills the requests waiting in the queue (up to max_batch rows in all) as
one left-padded batch, joins their KV cache to the running one, and runs one decode step for
every row. Rows of different adapters and of the base share each forward (`multi_lora`).

The running batch is the layout `eval.generate._decode` uses: one DynamicCache, left padding
hidden by a 2-D attention mask, explicit position ids per row (each row counts from 0 over
its own tokens). A joining batch is padded on the left to the running cache's length (or
the running cache to its own) and concatenated; leaving rows are selected out and the
columns no remaining row attends to are cut. Masked columns add exact zeros to attention,
so a row's tokens are the ones it gets alone (tested against `lorakit generate`).

Sampling per row: greedy at temperature 0, else `eval.generate`'s temperature / top-p with a
torch.Generator seeded by the request's seed, so a sampled answer is also `generate`'s for
the same seed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.eval.generate import GenerationSettings, last_logits_only, next_tokens, cut_at_stop
from lorakit.serve.multi_lora import RowAdapters


@dataclass
class Event:
    """What the scheduler tells a request's owner: a text delta, the end, or a failure."""

    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Request:
    prompt_ids: list[int]
    slot: int  # adapter slot, -1 = base
    eos: frozenset[int]
    settings: GenerationSettings
    sink: Callable[[Event], None]  # called from the scheduler thread; must not block
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the owner (client gone, timeout); the row leaves at the next step
    strip: bool = True  # chat answers are stripped as generate's are; a raw completion keeps its spaces


@dataclass
class _Row:
    req: Request
    tokens: list[int] = field(default_factory=list)
    last: int = 0  # the token the next step feeds (not yet in the cache)
    position: int = 0  # its position id
    generator: torch.Generator | None = None
    sent: str = ""  # text already sent as deltas
    finished: bool = False


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class Scheduler:
    """Owns the model: requests in via `submit`, events out through each request's sink."""

    def __init__(self, model: nn.Module, tokenizer: Any, rows: RowAdapters, max_batch: int = 32,
                 max_queue: int = 256, metrics: Any = None) -> None:
        self.model, self.tok, self.rows = model, tokenizer, rows
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.model_lock = threading.RLock()  # held for each step; adapter load / unload take it too
        self._cv = threading.Condition()
        self._pending: deque[Request] = deque()
        self._batch: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # (B, L) over the cache's columns
        self._accepting = True
        self._stop = False
        self._extra = last_logits_only(model)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ owner side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lorakit-scheduler", daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> None:
        with self._cv:
            if not self._accepting:
                raise ShuttingDown()
            if len(self._pending) >= self.max_queue:
                raise QueueFull()
            self._pending.append(req)
            self._cv.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def batch_size(self) -> int:
        return len(self._batch)

    def in_use(self, slot: int) -> int:
        """Requests queued or running on adapter `slot`."""
        with self._cv:
            return sum(r.slot == slot for r in self._pending) + sum(r.req.slot == slot for r in self._batch)

    def shutdown(self, grace_s: float) -> None:
        """Stop taking requests, let the ones in flight finish for up to grace_s, cancel the rest."""
        with self._cv:
            self._accepting = False
            self._cv.notify()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self._pending or self._batch) and self._alive():
            time.sleep(0.02)
        with self._cv:
            for req in list(self._pending) + [r.req for r in self._batch]:
                req.cancelled = True
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ model side

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._pending and not self._batch and not self._stop:
                        self._cv.wait()
                    if self._stop and not self._pending and not self._batch:
                        return
                    room = self.max_batch - len(self._batch)
                    joining = []
                    while self._pending and len(joining) < room:
                        req = self._pending.popleft()
                        if req.cancelled:
                            self._end(req, "error", "cancelled")
                        else:
                            joining.append(req)
                with self.model_lock, torch.no_grad():
                    self._leave()
                    for req in [r for r in joining if r.slot >= 0 and r.slot not in self.rows.live]:
                        joining.remove(req)  # its adapter was unloaded while it waited
                        self._end(req, "error", "its adapter was unloaded")
                    if joining:
                        self._join(joining)
                    if self._batch:
                        self._step()
                    self._leave()
                if self.metrics is not None:
                    self.metrics.set_batch(len(self._batch), len(self._pending))
        except BaseException as err:  # noqa: BLE001 - every waiting request hears of it; the server answers 500
            self.error = err
            with self._cv:
                self._accepting = False
                for req in list(self._pending) + [r.req for r in self._batch]:
                    self._end(req, "error", f"{type(err).__name__}: {err}")
                self._pending.clear()
                self._batch.clear()
            raise

    def _join(self, reqs: list[Request]) -> None:
        """Prefill `reqs` as one left-padded batch, sample their first tokens, join the running batch."""
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs],
                           device=self.device)  # (n, W)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        self.rows.set([r.slot for r in reqs], self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, **self._extra).logits[:, -1, :].float()  # (n, V)
        new = []
        for req in reqs:
            row = _Row(req, position=len(req.prompt_ids))
            if req.settings.temperature > 0:
                row.generator = torch.Generator(device=self.device).manual_seed(req.settings.seed)
            new.append(row)
        self._take(new, logits)
        if self.metrics is not None:
            for row in new:
                self.metrics.first_token(time.monotonic() - row.req.submitted)
        self._merge(new, cache, mask)

    def _step(self) -> None:
        """One decode step for every row of the running batch."""
        batch = self._batch
        ids = torch.tensor([[r.last] for r in batch], device=self.device)  # (B, 1)
        positions = torch.tensor([[r.position] for r in batch], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(batch), 1)], dim=1)  # (B, L + 1)
        self.rows.set([r.req.slot for r in batch], self.device)
        logits = self.model(input_ids=ids, attention_mask=self._mask, position_ids=positions,
                            past_key_values=self._cache, use_cache=True, **self._extra).logits[:, -1, :].float()
        for r in batch:
            r.position += 1
        self._take(batch, logits)

    def _take(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each row's next token from its logits row: greedy, or sampled with its own generator."""
        greedy = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            s = row.req.settings
            token = greedy[i] if s.temperature <= 0 else int(next_tokens(logits[i : i + 1], s, row.generator)[0])
            self._add_token(row, token)

    def _add_token(self, row: _Row, token: int) -> None:
        """`_decode`'s rule: an end token finishes the row unkept; a stop string or max_tokens after the token."""
        req = row.req
        if req.cancelled:  # leaves at the next `_leave`
            return
        if token in req.eos:
            return self._finish(row, "stop")
        row.tokens.append(token)
        row.last = token
        if self.metrics is not None:
            self.metrics.tokens_out(1)
        text = self.tok.decode(row.tokens, skip_special_tokens=True)
        stops = [s for s in req.settings.stop if s]
        if stops and any(s in text for s in stops):
            return self._finish(row, "stop", text)
        if len(row.tokens) >= req.settings.max_new_tokens:
            return self._finish(row, "length", text)
        shown = cut_at_stop(text, stops).rstrip("\ufffd")  # an unfinished UTF-8 character waits
        if stops:  # the start of a stop string waits until it is clear it is not one
            shown = shown[: max(0, len(shown) - (max(len(s) for s in stops) - 1))]
        if req.strip:  # trailing spaces wait: the answer is stripped at the end, as generate's is
            shown = shown.strip()
        if len(shown) > len(row.sent) and shown.startswith(row.sent):
            req.sink(Event("delta", shown[len(row.sent):]))
            row.sent = shown

    def _finish(self, row: _Row, reason: str, text: str | None = None) -> None:
        if text is None:
            text = self.tok.decode(row.tokens, skip_special_tokens=True)
        answer = cut_at_stop(text, row.req.settings.stop)
        answer = answer.strip() if row.req.strip else answer
        rest = answer[len(row.sent):] if answer.startswith(row.sent) else ""
        if rest:
            row.req.sink(Event("delta", rest))
        row.finished = True
        self._end(row.req, "done", "", reason, len(row.tokens))

    def _end(self, req: Request, kind: str, text: str = "", reason: str | None = None, n_out: int = 0) -> None:
        req.sink(Event(kind, text, reason, len(req.prompt_ids), n_out))

    def _merge(self, new: list[_Row], cache: Any, mask: torch.Tensor) -> None:
        """Join the prefilled rows that are still answering to the running batch and its cache."""
        keep = [i for i, r in enumerate(new) if not r.finished]
        if not keep:
            return
        index = torch.tensor(keep, device=self.device)
        if len(keep) < len(new):
            cache.batch_select_indices(index)
            mask = mask[index]
        rows = [new[i] for i in keep]
        if self._cache is None:
            self._cache, self._mask, self._batch = cache, mask, rows
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers):
            for attr in ("keys", "values"):
                a, b = getattr(old_layer, attr), getattr(new_layer, attr)  # (B, H, L, D), (n, H, L', D)
                setattr(old_layer, attr, torch.cat([_pad_left(a, width, 2), _pad_left(b, width, 2)], dim=0))
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)], dim=0)
        self._batch = self._batch + rows

    def _leave(self) -> None:
        """Drop finished and cancelled rows from the batch and the cache; cut columns nobody attends to."""
        for row in self._batch:
            if row.req.cancelled and not row.finished:
                row.finished = True
                self._end(row.req, "error", "cancelled")
        keep = [i for i, r in enumerate(self._batch) if not r.finished]
        if len(keep) == len(self._batch):
            return
        if not keep:
            self._batch, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._batch = [self._batch[i] for i in keep]
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
            self._mask = self._mask[:, first:]


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`t` with zeros prepended along `dim` up to `width` (masked columns)."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
