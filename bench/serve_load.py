"""`lorakit serve` under load: one request at a time vs 32 concurrent clients, base only vs 4 adapters + base.

A real server (`python -m lorakit serve` in a subprocess on 127.0.0.1) with SmolLM2-135M-Instruct and
4 LoRA adapters (r=16, alpha=32, all linear layers; random-init: A kaiming as in training, B ~ N(0, 1e-3),
so every adapted layer does its full work but the answers stay close to the base's). Clients stream
chat completions of fixed prompts with exactly --new-tokens tokens each (temperature 0, vLLM's
`ignore_eos`), so every scenario generates the same number of tokens.

    (a) one request at a time (--sequential requests, base model)
    (b) --clients concurrent clients, --requests requests in all, base model only
    (c) the same, requests spread round-robin over the 4 adapters and the base

(b) and (c) alternate --repeats times (this shared machine's speed drifts); the ratios use medians.

Reported per scenario: output tokens/s (all completion tokens / wall time), p50/p95 latency and
time to first token. Targets (issue 19): (b) >= 3x (a); (c) >= 0.85x (b).

    python bench/serve_load.py                      # fp32
    python bench/serve_load.py --dtype bf16

Writes bench/results/serve_load-<dtype>.md with the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # bench/machine.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe a walk through a forest in autumn.",
    "What should I pack for a week of hiking?",
    "Tell me about the history of bread.",
    "How do bees make honey?",
    "Give me advice for learning to play the piano.",
    "Describe the city of Paris to someone who has never been there.",
]


def make_adapters(model: str, out: Path, n: int, rank: int) -> list[tuple[str, Path]]:
    import torch

    from lorakit.adapters import inject_lora
    from lorakit.adapters.inject import lora_layers
    from lorakit.adapters.state import save_adapter
    from lorakit.models.load import load_model

    adapters = []
    for i in range(n):
        loaded = load_model(model, "fp32", with_tokenizer=False)
        torch.manual_seed(100 + i)
        inject_lora(loaded.model, ["all-linear"], r=rank, alpha=2 * rank)
        with torch.no_grad():
            for _, layer in lora_layers(loaded.model):
                layer.lora_B.weight.normal_(0, 1e-3)
        adapters.append((f"bench{i}", save_adapter(loaded.model, out / f"bench{i}", model, {"template": "auto"})))
    return adapters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, adapters: list[tuple[str, Path]], dtype: str, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    args = [sys.executable, "-m", "lorakit", "serve", "--model", model, "--dtype", dtype, "--port", str(port),
            "--max-batch", str(max_batch), "--max-queue", "4096", "--max-tokens", "1024",
            *[f"--adapter={n}={p}" for n, p in adapters]]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not come up")


async def one(client, url: str, model: str, prompt: str, new_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": first if first is not None else float("nan"),
            "tokens": tokens, "model": model}


async def scenario(url: str, models: list[str], n_requests: int, clients: int, new_tokens: int) -> dict:
    import httpx

    jobs = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(n_requests)]
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        queue = list(reversed(jobs))

        async def worker() -> None:
            while queue:
                model, prompt = queue.pop()
                results.append(await one(client, url, model, prompt, new_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "clients": clients, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "p50_s": _pct(lat, 50), "p95_s": _pct(lat, 95), "ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95)}


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrent scenario")
    ap.add_argument("--sequential", type=int, default=8, help="requests in scenario (a)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="alternating (b), (c) runs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        adapters = make_adapters(args.model, work, args.adapters, args.rank)
        proc, url = start(args.model, adapters, args.dtype, args.max_batch, work / "server.log")
        try:
            asyncio.run(scenario(url, [args.model], 2, 1, 8))  # warm-up
            asyncio.run(scenario(url, [args.model] + [n for n, _ in adapters], 5, 5, 8))
            runs: list[tuple[str, dict]] = [("a", asyncio.run(scenario(url, [args.model], args.sequential, 1,
                                                                      args.new_tokens)))]
            for _ in range(args.repeats):  # (b) and (c) alternate: this shared machine's speed drifts
                runs.append(("b", asyncio.run(scenario(url, [args.model], args.requests, args.clients,
                                                       args.new_tokens))))
                runs.append(("c", asyncio.run(scenario(url, [args.model] + [n for n, _ in adapters], args.requests,
                                                       args.clients, args.new_tokens))))
        finally:
            proc.terminate()
            code = proc.wait(timeout=60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    labels = {"a": "(a) one at a time, base", "b": f"(b) {args.clients} concurrent, base only",
              "c": f"(c) {args.clients} concurrent, {args.adapters} adapters + base"}
    lines = [f"# serve_load: {args.model}, {args.dtype}", "",
             f"command: `{' '.join(['python', 'bench/' + Path(__file__).name, *sys.argv[1:]])}`", "",
             f"CPU: {cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}; "
             f"adapters: {args.adapters} x LoRA r={args.rank} all-linear, random-init (B ~ N(0, 1e-3)); "
             f"{args.new_tokens} new tokens per request (ignore_eos), max batch {args.max_batch}; "
             f"server exit code after SIGTERM: {code}", "",
             "| scenario | requests | tokens | wall s | output tok/s | p50 latency s | p95 latency s | TTFT p50 s | TTFT p95 s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, (key, r) in enumerate(runs):
        lines.append(f"| {labels[key]}{f' #{(i + 1) // 2}' if key != 'a' and args.repeats > 1 else ''} | "
                     f"{r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.1f} | "
                     f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} |")
    speed = {k: statistics.median(r["tok_s"] for key, r in runs if key == k) for k in "abc"}
    pairs = [runs[i + 1][1]["tok_s"] / runs[i][1]["tok_s"] for i in range(1, len(runs), 2)]  # (c) / (b) in turn
    lines += ["", f"(b) / (a) = **{speed['b'] / speed['a']:.2f}x** (target >= 3x); (c) / (b) = "
              f"**{speed['c'] / speed['b']:.2f}x** (target >= 0.85x); medians of {args.repeats} alternating runs, "
              f"(c) / (b) per pair: {', '.join(f'{p:.2f}' for p in pairs)}"]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or ROOT / "bench" / "results" / f"serve_load-{args.dtype}.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
