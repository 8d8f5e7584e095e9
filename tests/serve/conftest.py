"""A tiny chat model and two tiny adapters on it, made once per session, for the serve tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import save_tiny_model_dir

PROMPTS = ["hello world", "what is the capital of france?", "the quick brown fox", "how are you?",
           "tell me about the lazy dog", "question: what is the answer?"]


@dataclass
class Served:
    model: Path
    adapters: dict[str, Path]


def make_adapter(model_dir: Path, out: Path, seed: int, targets: list[str], r: int, system_prompt: str | None) -> Path:
    """A random LoRA adapter (B not zero, so it changes answers) saved in PEFT's format with lorakit.json."""
    from lorakit.adapters import inject_lora
    from lorakit.adapters.inject import lora_layers
    from lorakit.adapters.state import save_adapter
    from lorakit.models.load import load_model

    loaded = load_model(str(model_dir), "fp32", with_tokenizer=False)
    torch.manual_seed(seed)
    inject_lora(loaded.model, targets, r=r, alpha=2 * r)
    with torch.no_grad():
        for _, layer in lora_layers(loaded.model):
            layer.lora_B.weight.normal_(0, 0.3)
    meta = {"template": "auto", "base_model": str(model_dir)}
    if system_prompt:
        meta["system_prompt"] = system_prompt
    return save_adapter(loaded.model, out, str(model_dir), meta)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    root = tmp_path_factory.mktemp("serve")
    model = save_tiny_model_dir(root / "model")
    adapters = {
        "alpha": make_adapter(model, root / "adapters" / "alpha", 1, ["q_proj", "v_proj", "down_proj"], 4, None),
        "beta": make_adapter(model, root / "adapters" / "beta", 2, ["all-linear"], 8, "answer briefly"),
    }
    return Served(model, adapters)


API_KEY = "test-key"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Live:
    url: str
    key: str
    proc: subprocess.Popen
    served: Served
    adapter_root: Path

    def client(self, key: str | None = None, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.key, max_retries=0, timeout=60, **kw)


def start_server(served: Served, root: Path, *extra: str, key: str | None = API_KEY) -> tuple[subprocess.Popen, str]:
    """`lorakit serve` in a subprocess on a free port of 127.0.0.1, once /health answers."""
    import httpx

    port = free_port()
    env = dict(os.environ, LORAKIT_TEST_KEY=key or "", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    args = [sys.executable, "-m", "lorakit", "serve", "--model", str(served.model), "--dtype", "fp32",
            "--port", str(port), *[f"--adapter={n}={p}" for n, p in served.adapters.items()], *extra]
    if key:
        args += ["--api-key-env", "LORAKIT_TEST_KEY"]
    log = open(root / f"server-{port}.log", "w")  # noqa: SIM115 - the process writes it until it ends
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited {proc.returncode}: {(root / f'server-{port}.log').read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not answer /health within 120 s")


@pytest.fixture(scope="session")
def live(served: Served, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("live")
    adapter_root = root / "adapter-root"
    adapter_root.mkdir()
    proc, url = start_server(served, root, "--max-batch", "6", "--max-prompt-tokens", "200", "--max-tokens", "400",
                             "--allow-runtime-adapters", "--adapter-root", str(adapter_root))
    yield Live(url, API_KEY, proc, served, adapter_root)
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def reference(served: Served):
    """Answers of `lorakit generate`'s code path (one prompt at a time, greedy) per served model id and prompt."""
    from lorakit.eval.generate import GenerationSettings, generate, load_for_inference

    def answers(path: Path | None) -> dict[str, str]:
        im = load_for_inference(str(served.model), path, "fp32")
        return dict(zip(PROMPTS, generate(im, PROMPTS, GenerationSettings(max_new_tokens=24), batch_size=1)))

    out = {str(served.model): answers(None)}
    out.update({name: answers(path) for name, path in served.adapters.items()})
    return out
