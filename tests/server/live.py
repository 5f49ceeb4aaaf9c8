"""A real adaptserve server on 127.0.0.1, in a thread of the test process, over weights loaded once."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn

from adaptserve.config import EngineConfig
from adaptserve.model.loaders import LoadedCheckpoint
from adaptserve.server.app import ServerState, create_app
from adaptserve.server.config import ServerConfig

# small enough that several test servers can come and go on a 24 GiB machine
TEST_ENGINE_OPTIONS = {"kv_cache_memory_gib": 0.25, "max_model_len": 2048, "policy": "priority"}


class LiveServer:
    def __init__(self, app, sock: socket.socket):
        self.app = app
        self.state: ServerState = app.state.server
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self._socket = sock
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)

    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._server.started and (not wait_ready or self.health() == 200):
                return self
            time.sleep(0.05)
        raise TimeoutError(f"the server at {self.url} did not become ready in {timeout}s")

    def health(self) -> int | None:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code
        except httpx.HTTPError:
            return None

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


@contextlib.contextmanager
def live_server(
    checkpoint: LoadedCheckpoint,
    server_config: ServerConfig | None = None,
    wait_ready: bool = True,
    **engine_options,
) -> Iterator[LiveServer]:
    options = {**TEST_ENGINE_OPTIONS, **engine_options}
    engine_config = EngineConfig.from_flat(model=checkpoint.source, **options)
    app = create_app(engine_config, server_config or ServerConfig(), checkpoint=checkpoint)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = LiveServer(app, sock).start(wait_ready)
    try:
        yield server
    finally:
        server.stop()
