"""The FastAPI app: routes, error handlers, and the server's life cycle (loading → ready → draining)."""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptserve.config import EngineConfig
from adaptserve.engine.engine import LLMEngine
from adaptserve.model.loaders import LoadedCheckpoint, ModelLoadError, default_model_path
from adaptserve.server.admin_kernels import add_kernel_admin_routes
from adaptserve.server.admission import AdmissionController, StepTimeModel
from adaptserve.server.async_engine import AsyncEngine
from adaptserve.server.config import ServerConfig
from adaptserve.server.errors import APIError
from adaptserve.server.kv_metrics import kv_report_of
from adaptserve.server.metrics import ServerMetrics
from adaptserve.server.precision_metrics import report_of
from adaptserve.server.protocol import ChatCompletionRequest, CompletionRequest
from adaptserve.server.serving import ClientDisconnected, ServingContext
from adaptserve.server.serving_chat import create_chat_completion
from adaptserve.server.serving_completions import create_completion
from adaptserve.server.warmup import warm_up

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class ServerState:
    """What the routes see: the phase, and once loaded the engine front, metrics and model name."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig):
        self.engine_config = engine_config
        self.server_config = server_config
        self.phase = Phase.LOADING
        self.error: str | None = None
        self.model_name = server_config.served_model_name or _model_name(engine_config.model.model)
        self.metrics = ServerMetrics(self.model_name)
        self.context: ServingContext | None = None
        self.engine: AsyncEngine | None = None

    def ready_context(self) -> ServingContext:
        if self.phase is Phase.READY and self.context is not None:
            return self.context
        message = {
            Phase.LOADING: "the model is still loading; retry shortly",
            Phase.DRAINING: "the server is shutting down and takes no new requests",
            Phase.FAILED: f"the engine failed to start: {self.error}",
        }.get(self.phase, "the server is not ready")
        headers = {"Retry-After": "5"} if self.phase is Phase.LOADING else None
        raise APIError(503, message, None, headers)

    def load(self, checkpoint: LoadedCheckpoint | None) -> LLMEngine:
        """Build the engine and time a few steps (runs in a worker thread)."""
        engine = LLMEngine(self.engine_config, checkpoint=checkpoint, progress=False)
        step_model = StepTimeModel()
        warm_up(engine, step_model)
        admission = AdmissionController(self.server_config.admission, engine.scheduler, step_model)
        engine.stat_loggers += [self.metrics, step_model, admission]
        if engine.control is not None:
            self.metrics.attach_control(engine.control, engine.control.telemetry, clock=engine.clock)
        runner = engine.runner
        self.metrics.attach_precision(lambda: report_of(runner.precision, runner.format_bytes))
        if getattr(runner, "compressed_kv", None) is not None:
            self.metrics.attach_kv_compression(lambda: kv_report_of(engine))
        self.engine = AsyncEngine(engine, admission)
        return engine

    def knobs(self) -> dict[str, float]:
        a = self.server_config.admission
        knobs = {
            **self.engine.engine.knobs.as_gauges(),  # the run-time knobs (controllers keep them current)
            "admission_enabled": float(a.enabled),
            "max_waiting_requests": a.max_waiting_requests,
            "max_waiting_tokens": a.max_waiting_tokens,
        }
        knobs.update({f"ttft_slo_seconds_{t.name}": t.ttft_slo_s for t in a.tiers})
        return knobs


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _model_name(model: str | None) -> str:
    if model is None or model == _default_model_path():
        return DEFAULT_MODEL_NAME
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name or model


def _default_model_path() -> str | None:
    try:
        return default_model_path()
    except ModelLoadError:
        return None


def create_app(
    engine_config: EngineConfig, server_config: ServerConfig, checkpoint: LoadedCheckpoint | None = None
) -> FastAPI:
    """The app; the model loads in the background once it starts, and requests get 503 until then."""
    state = ServerState(engine_config, server_config)

    async def load() -> None:
        try:
            await asyncio.to_thread(state.load, checkpoint)
        except Exception as error:
            logger.exception("engine failed to start")
            state.phase, state.error = Phase.FAILED, str(error)
            return
        # what exists now (weights, tokenizer, caches) lives as long as the server: keep it out of the
        # garbage collector's scans, whose pauses would stall the engine thread and the event loop
        gc.collect()
        gc.freeze()
        state.engine.start()
        state.context = ServingContext(state.engine, state.metrics, state.model_name)
        state.metrics.set_knobs(state.knobs())
        state.phase = Phase.READY
        logger.info("adaptserve ready: serving %s", state.model_name)

    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(load())
        yield
        loading.cancel()
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="adaptserve", lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        if error.status in (400, 404):
            state.metrics.record_outcome("invalid")
        elif error.status == 503:
            state.metrics.record_rejection(state.phase.value)
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        state.metrics.record_outcome("invalid")
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """Unknown routes (404) and wrong methods (405), in the same error shape as everything else."""
        return APIError(error.status_code, str(error.detail), None, dict(error.headers or {})).response()

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, error: ClientDisconnected) -> Response:
        return Response(status_code=499)

    # /health and /v1/models answer 503 while not ready, but as probes, not refused requests: they
    # return the error themselves so that the handler above does not count them as rejections
    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            state.ready_context()
        except APIError as error:
            return error.response()
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        try:
            ctx = state.ready_context()
        except APIError as error:
            return error.response()
        model = {
            "id": ctx.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "adaptserve",
            "max_model_len": ctx.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [model]})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(state.ready_context(), body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(state.ready_context(), body, request)

    add_kernel_admin_routes(app, state)
    return app


def _validation_error(error: RequestValidationError) -> APIError:
    """pydantic's first complaint, as a 400 naming the field (or saying the JSON is malformed)."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}", None)
    field = location[0] if location else None
    path = ".".join(location) or "body"
    got = first.get("input")
    return APIError(400, f"{path}: {first.get('msg')} (got {got!r})"[:500], field)
