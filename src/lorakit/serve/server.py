"""Start `lorakit serve`: bind, load, run uvicorn, drain on SIGTERM and exit 0."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from lorakit.config import ServeConfig
from lorakit.errors import LorakitError


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port fails in a second, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise LorakitError(f"cannot listen on {host}:{port} ({err.strerror or err}); the port is in use or the "
                           "address is not this machine's: choose another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(cfg: ServeConfig, model: str | None, adapters: Sequence[tuple[str, Path]], dtype: str = "auto",
          device: str = "cpu", trust_remote_code: bool = False, log_level: str = "warning") -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise LorakitError(f"lorakit serve needs {err.name}: pip install 'lorakit[serve]'") from None

    from lorakit.serve.app import api_key_from_env, create_app
    from lorakit.serve.engine import Engine
    from lorakit.serve.metrics import Metrics

    api_key = api_key_from_env(cfg.api_key_env)
    if cfg.adapter_root and not Path(cfg.adapter_root).is_dir():
        raise LorakitError(f"--adapter-root {cfg.adapter_root} is not a directory")
    sock = bind(cfg.host, cfg.port)
    metrics = Metrics()
    engine = Engine(model, adapters, cfg, dtype, device, trust_remote_code, metrics)
    app = create_app(engine, metrics, api_key)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    names = ", ".join(engine.models)
    print(f"lorakit serve: http://{shown}:{port} (models: {names}); playground at /, OpenAI API at /v1", flush=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print("warning: listening beyond this machine without an API key (--api-key-env)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=cfg.grace_s, lifespan="on",
                            access_log=False)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it shut down on once it is done; a Python handler makes that a no-op,
    # so a drained SIGTERM ends with exit 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if engine.scheduler.error is not None:
        raise engine.scheduler.error
