"""The server's counters in Prometheus' text format (GET /metrics), without a client library.

Counters: requests by model and status, prompt and completion tokens. Gauges: queue depth and
rows in the running batch. Histograms: time to first token and request latency (seconds).
Updated from the event loop and the scheduler thread, so under a lock.
"""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(BUCKETS, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.total}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (model, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.queue_depth = 0
        self.batch_size = 0
        self.ttft = _Histogram()
        self.latency = _Histogram()

    def request(self, model: str, status: int | str) -> None:
        with self._lock:
            self.requests[(model, str(status))] += 1

    def tokens_in(self, n: int) -> None:
        with self._lock:
            self.prompt_tokens += n

    def tokens_out(self, n: int) -> None:
        with self._lock:
            self.completion_tokens += n

    def set_batch(self, batch: int, queue: int) -> None:
        with self._lock:
            self.batch_size, self.queue_depth = batch, queue

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def finished(self, seconds: float) -> None:
        with self._lock:
            self.latency.observe(seconds)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP lorakit_requests_total Requests answered, by model and HTTP status.",
                     "# TYPE lorakit_requests_total counter"]
            for (model, status), n in sorted(self.requests.items()):
                lines.append(f'lorakit_requests_total{{model="{_label(model)}",status="{status}"}} {n}')
            for name, value, kind, what in (
                ("lorakit_prompt_tokens_total", self.prompt_tokens, "counter", "Prompt tokens of accepted requests."),
                ("lorakit_completion_tokens_total", self.completion_tokens, "counter", "Tokens generated."),
                ("lorakit_queue_depth", self.queue_depth, "gauge", "Requests waiting for a batch row."),
                ("lorakit_batch_size", self.batch_size, "gauge", "Rows in the running batch."),
            ):
                lines += [f"# HELP {name} {what}", f"# TYPE {name} {kind}", f"{name} {value}"]
            for name, hist, what in (("lorakit_time_to_first_token_seconds", self.ttft, "Submit to first token."),
                                     ("lorakit_request_latency_seconds", self.latency, "Submit to last token.")):
                lines += [f"# HELP {name} {what}", f"# TYPE {name} histogram", *hist.lines(name)]
            return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
