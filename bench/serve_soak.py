"""Soak `lorakit serve`: many requests with random parameters, some malformed, some dropped early.

One server (`python -m lorakit serve` in a subprocess) with a base model and 2 adapters. Clients send
--requests requests, --concurrency at a time: random model (base or adapter), max_tokens, temperature,
top_p, seed, stop strings, streamed or not; about 8% malformed (bad JSON, unknown model, max_tokens over
the cap, an oversize prompt, a bad temperature) and about 8% streams the client closes after the first
piece. Checks at the end:

- no crash: the server answers /health, no 5xx, every malformed request got its 4xx;
- no leaked rows: batch size and queue depth back to 0;
- memory flat: the server's RSS at the end within 10% of its RSS after warm-up (the first 10% of requests);
- SIGTERM: exit code 0.

    python bench/serve_soak.py                                # tiny random model, 2,000 requests
    python bench/serve_soak.py --model smollm2-135m-instruct --requests 300

Exits 1 when a check fails; writes bench/results/serve_soak-<model>.md with the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over the lazy dog what is the capital of france hello world".split()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(model: str, work: Path) -> tuple[str, list[tuple[str, Path]]]:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "src"))
    from tests.serve.conftest import make_adapter  # random adapters in PEFT's format (B not zero)

    if model == "tiny":
        from tests.conftest import save_tiny_model_dir

        model = str(save_tiny_model_dir(work / "model"))
    names = [("q_proj", "v_proj"), ("all-linear",)]
    return model, [(f"soak{i}", make_adapter(Path(model) if Path(model).is_dir() else model, work / f"soak{i}", i,
                                             list(t), 8, None)) for i, t in enumerate(names)]


def request(rng: random.Random, models: list[str], cap: int) -> tuple[str, object, str]:
    """(kind, body, expectation): kind ok / drop / bad; body a dict or raw bytes."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
    body: dict = {"model": rng.choice(models), "messages": [{"role": "user", "content": prompt}],
                  "max_tokens": rng.randint(1, 32), "stream": rng.random() < 0.5}
    if rng.random() < 0.5:
        body["temperature"] = rng.choice([0, 0.3, 0.7, 1.0, 1.5])
        body["top_p"] = rng.choice([1.0, 0.9, 0.5])
        body["seed"] = rng.randint(0, 1000)
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(WORDS)]
    roll = rng.random()
    if roll < 0.08:
        bad = rng.choice(["json", "model", "max_tokens", "prompt", "temperature"])
        if bad == "json":
            return "bad", b'{"model": ', "400"
        if bad == "model":
            body["model"] = "no-such-model"
            return "bad", body, "404"
        if bad == "max_tokens":
            body["max_tokens"] = cap + 1
        elif bad == "prompt":
            body["messages"][0]["content"] = "the quick brown fox " * 400
        else:
            body["temperature"] = -1
        return "bad", body, "400"
    if roll < 0.16:
        body.update(stream=True, max_tokens=32)
        return "drop", body, "200"
    return "ok", body, "200"


async def run(url: str, pid: int, n: int, concurrency: int, models: list[str], cap: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    jobs = [request(rng, models, cap) for _ in range(n)]
    stats: Counter = Counter()
    problems: list[str] = []
    rss: list[tuple[int, float]] = []
    done = 0
    async with httpx.AsyncClient(timeout=120) as client:
        queue = list(reversed(jobs))

        async def worker() -> None:
            nonlocal done
            while queue:
                kind, body, expect = queue.pop()
                try:
                    if isinstance(body, bytes):
                        r = await client.post(url + "/v1/chat/completions", content=body,
                                              headers={"Content-Type": "application/json"})
                        status = r.status_code
                    elif body.get("stream"):
                        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                            status = r.status_code
                            async for line in r.aiter_lines():
                                if kind == "drop" and '"content"' in line:
                                    break  # the client goes away mid-answer
                                if line.startswith("data: {") and '"error"' in line[:20]:
                                    problems.append(f"stream error: {line[:200]}")
                    else:
                        r = await client.post(url + "/v1/chat/completions", json=body)
                        status = r.status_code
                        if status == 200:
                            json.loads(r.text)["choices"][0]["message"]["content"]  # well-formed answer
                except Exception as err:  # noqa: BLE001 - counted and reported
                    problems.append(f"{type(err).__name__}: {err}")
                    continue
                stats[f"{kind} {status}"] += 1
                if str(status) != expect:
                    problems.append(f"{kind} request answered {status}, expected {expect}: {str(body)[:200]}")
                done += 1
                if done % max(1, n // 20) == 0:
                    rss.append((done, rss_mb(pid)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        health = (await client.get(url + "/health")).json()
    return {"stats": stats, "problems": problems, "rss": rss, "wall": wall, "health": health}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (a random 2-layer model) or any lorakit model name")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import httpx

    work = Path(tempfile.mkdtemp(prefix="serve-soak-"))
    cap = 64
    try:
        model, adapters = prepare(args.model, work)
        port = free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = work / "server.log"
        proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", model, "--dtype", args.dtype,
                                 "--port", str(port), "--max-batch", "16", "--max-tokens", str(cap),
                                 "--max-prompt-tokens", "256", *[f"--adapter={n}={p}" for n, p in adapters]],
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
        url = f"http://127.0.0.1:{port}"
        for _ in range(1200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited: {log.read_text()}") from None
                time.sleep(0.25)
        models = [model] + [n for n, _ in adapters]
        result = asyncio.run(run(url, proc.pid, args.requests, args.concurrency, models, cap, args.seed))
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        server_log = log.read_text()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rss = result["rss"]
    warm = next((mb for done, mb in rss if done >= args.requests // 10), rss[0][1] if rss else float("nan"))
    end = rss[-1][1] if rss else float("nan")
    growth = (end - warm) / warm if warm else float("nan")
    health = result["health"]
    checks = {
        "no unexpected status or client error": not result["problems"],
        "no 5xx": not any(k.endswith(" 500") or k.split()[-1].startswith("5") for k in result["stats"]),
        "batch and queue back to 0": health.get("batch_size") == 0 and health.get("queue_depth") == 0,
        "RSS within 10% of the warm-up": abs(growth) <= 0.10,
        "exit 0 on SIGTERM": code == 0,
        "no traceback in the server log": "Traceback" not in server_log,
    }
    lines = [f"# serve_soak: {args.model}, {args.dtype}", "",
             f"command: `{' '.join(['python', 'bench/' + Path(__file__).name, *sys.argv[1:]])}`", "",
             f"{args.requests} requests, {args.concurrency} at a time, {result['wall']:.1f} s; "
             f"answers by kind and status: {dict(sorted(result['stats'].items()))}", "",
             f"server RSS after warm-up {warm:.0f} MB, at the end {end:.0f} MB ({growth:+.1%}); "
             f"samples (requests done, MB): {[(d, round(m)) for d, m in rss]}", "",
             "| check | result |", "|---|---|"]
    lines += [f"| {name} | {'ok' if ok else 'FAILED'} |" for name, ok in checks.items()]
    if result["problems"]:
        lines += ["", "problems (first 10):", *[f"- {p}" for p in result["problems"][:10]]]
    text = "\n".join(lines) + "\n"
    print(text)
    name = Path(args.model).name if args.model != "tiny" else "tiny"
    out = args.out or ROOT / "bench" / "results" / f"serve_soak-{name}.md"
    out.write_text(text)
    print(f"wrote {out}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
