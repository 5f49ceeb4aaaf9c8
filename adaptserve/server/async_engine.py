"""AsyncEngine: the engine loop on its own thread, an asyncio queue of outputs per request.

The engine is single-threaded by design, so everything that touches it (adding, aborting, reading its
queues for admission) runs on the engine thread as a command; asyncio callers await the answer. A step
that raises fails every request in flight with a clean error instead of leaving them hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from adaptserve.engine.engine import LLMEngine
from adaptserve.engine.request import RequestOutput, SamplingParams
from adaptserve.server.admission import AdmissionController, AdmissionRejected

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineError(RuntimeError):
    """The engine failed while this request was in flight; the request did not complete."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, admission: AdmissionController | None = None):
        self.engine = engine
        self.admission = admission
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}  # request id → its outputs (or an exception)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.idle = asyncio.Event()  # set while nothing is in flight (graceful shutdown waits on it)

    # ---- life cycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.idle.set()
        self._thread = threading.Thread(target=self._run, name="adaptserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._commands.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    # ---- requests ------------------------------------------------------------------------------------

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        stream: bool = False,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request; raises InvalidRequestError or AdmissionRejected if it is not taken. Returns
        its outputs: deltas when `stream`, else one final output. Closing that iterator before the end
        (a client that went away) aborts the request and frees its blocks; a caller that drops it
        unstarted must call `abort`."""
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        outputs: asyncio.Queue = asyncio.Queue()
        await self.call(
            lambda: self._add(request_id, prompt, params, priority, stream, arrival_time, outputs)
        )
        return self._outputs(request_id, outputs)

    async def _outputs(self, request_id: str, outputs: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)
            else:
                self._forget(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is (safe to call twice, or after it finished)."""
        self._forget(request_id)
        self._commands.put(lambda: self.engine.abort_request(request_id))

    def _forget(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._update_idle()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps; return its result or raise its error."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def command() -> None:
            try:
                future.set_result(fn())
            except BaseException as error:  # handed to the caller
                future.set_exception(error)

        self._commands.put(command)
        return await asyncio.wrap_future(future)

    def _add(self, request_id, prompt, params, priority, stream, arrival_time, outputs) -> None:
        engine = self.engine
        # token ids are checked once, by add_request; text must be encoded first to be measured
        prompt_ids = prompt if isinstance(prompt, list) else engine.encode_prompt(prompt)
        if self.admission is not None:
            max_output = params.max_tokens or engine.max_model_len - len(prompt_ids)
            waited_s = time.monotonic() - arrival_time
            rejection = self.admission.check(len(prompt_ids), max_output, priority, waited_s, request_id)
            if rejection is not None:
                raise AdmissionRejected(rejection)
        engine.add_request(request_id, prompt_ids, params, priority, arrival_time, stream)
        self._queues[request_id] = outputs
        self._loop.call_soon_threadsafe(self.idle.clear)

    def _update_idle(self) -> None:
        if not self._queues:
            self.idle.set()

    # ---- the engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        """Run every queued command, then one step; sleep on the queue while there is nothing to step."""
        while True:
            try:
                command = self._commands.get(block=not self.engine.has_unfinished_requests())
                while command is not None:
                    command()
                    command = self._commands.get_nowait()
                return  # None: stop()
            except queue.Empty:
                pass
            if self.engine.has_unfinished_requests():
                self._step()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # a bug or a device error: fail what is in flight, keep serving
            logger.exception("engine step failed; failing %d requests in flight", len(self._queues))
            self._fail_all(EngineError(f"the engine failed while running this request: {error}"))
            return
        for output in outputs:
            self._deliver(output.request_id, output)

    def _deliver(self, request_id: str, item: Any) -> None:
        outputs = self._queues.get(request_id)
        if outputs is not None:
            self._loop.call_soon_threadsafe(outputs.put_nowait, item)

    def _fail_all(self, error: EngineError) -> int:
        """Abort every request in flight and hand each the error; returns how many."""
        request_ids = list(self._queues)
        for request_id in request_ids:
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("abort of %s also failed", request_id)
            self._deliver(request_id, error)
        return len(request_ids)

    async def abort_all(self, reason: str) -> int:
        """Fail every request in flight (shutdown after the drain timeout); returns how many."""
        return await self.call(lambda: self._fail_all(EngineError(reason)))
