"""A real server for the serve tests: the tiny trained run, an engine with small buckets, uvicorn on a
free loopback port in a background thread (shared by the whole session: compiling buckets is the cost)."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

MODEL = "tiny-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn.Server in a daemon thread; `url` once started."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class Served:
    url: str
    engine: Any
    tok: Any
    cfg: Any
    params: Any
    generator: Any
    app_factory: Any  # build_app bound to this engine/tokenizer, for extra apps (API key, limits)


def wait_idle(engine, timeout: float = 20.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if engine.idle() and engine.pool.all_returned():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="session")
def served(tiny_run):
    from polychip.generate import Generator, load_for_inference
    from polychip.serve.api import build_app
    from polychip.serve.engine import Engine, EngineConfig

    cfg, params, tok = load_for_inference(tiny_run)
    # Small pool (2 full contexts' worth short of max_batch) so the load test also exercises waiting for blocks.
    engine = Engine(cfg, params, EngineConfig(max_batch=8, page_size=16, prefill_chunk=32, kv_blocks=49, max_queue=512))
    engine.warmup()
    engine.start()

    def factory(**kw):
        return build_app(engine, tok, MODEL, **kw)

    srv = ServerThread(factory())
    yield Served(srv.url, engine, tok, cfg, params, Generator(cfg, params, tok), factory)
    srv.stop()
    engine.stop()
