"""Run the app under uvicorn with a graceful drain: on SIGTERM (or Ctrl-C) the server keeps its port
open but answers new requests with 503, lets in-flight requests finish for up to `drain_timeout_s`,
fails the rest cleanly, then exits 0. A second signal exits at once."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from adaptserve.config import EngineConfig
from adaptserve.server.app import Phase, ServerState, create_app
from adaptserve.server.config import ServerConfig

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.state.phase is Phase.DRAINING or self._loop is None:
            self.should_exit = self.force_exit = True  # second signal, or before the loop runs
            return
        previous, self.state.phase = self.state.phase, Phase.DRAINING
        logger.info("signal %s: draining (no new requests; in flight ones have %.0fs)", sig,
                    self.state.server_config.drain_timeout_s)  # fmt: skip
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain(previous)))

    async def _drain(self, previous: Phase) -> None:
        engine = self.state.engine
        if previous is Phase.READY and engine is not None:
            try:
                await asyncio.wait_for(engine.idle.wait(), self.state.server_config.drain_timeout_s)
            except TimeoutError:
                failed = await engine.abort_all("the server shut down before this request finished")
                logger.warning("drain timeout: failed %d requests still in flight", failed)
        await asyncio.sleep(0.1)  # let the last responses flush
        self.should_exit = True


def serve(engine_config: EngineConfig, server_config: ServerConfig, log_level: str = "info") -> None:
    app = create_app(engine_config, server_config)
    config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )
    DrainingServer(config, app.state.server).run()
