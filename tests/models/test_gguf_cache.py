"""The GGUF -> safetensors cache: built once, even when several processes ask at the same time."""

from __future__ import annotations

from pathlib import Path


def test_concurrent_gguf_conversions_convert_once(tmp_path: Path, monkeypatch) -> None:
    """torchrun ranks (or parallel runs) asking for the same GGUF: one converts, the others wait for it."""
    import threading
    import time

    import lorakit.models.load as load

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def convert(path: Path, out: Path) -> None:
        calls.append(path)
        time.sleep(0.3)  # long enough for every other thread to arrive meanwhile
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(load, "_convert_gguf", convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(load.gguf_cache_dir(gguf))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "config.json").exists()
