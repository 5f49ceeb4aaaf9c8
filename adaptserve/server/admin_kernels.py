"""/admin/kernels: show the kernel registry and autotuner, pin a variant, offer one on probation.

Changes run on the engine thread between steps (AsyncEngine.call), so a swap never lands mid-step.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from adaptserve.server.errors import APIError


class PinRequest(BaseModel):
    op: str  # decode_attention | prefill_attention
    variant: str | None = None  # None lifts the pin


class OfferRequest(BaseModel):
    op: str
    variant: str


def kernel_state(runner) -> dict[str, Any]:
    graphs = runner.graphs
    return {
        "registry": runner.registry.snapshot(),
        "autotuner": None if runner.autotuner is None else runner.autotuner.snapshot(),
        "cuda_graphs": None
        if graphs is None
        else {
            "batch_sizes": graphs.sizes,
            "captured": len(graphs.graphs),
            "captures": graphs.num_captures,
            "capture_seconds": round(graphs.capture_seconds, 3),
        },
    }


def add_kernel_admin_routes(app: FastAPI, state) -> None:
    async def on_engine(fn):
        ctx = state.ready_context()
        try:
            return await ctx.engine.call(fn)
        except ValueError as error:
            raise APIError(400, str(error), "variant") from None

    @app.get("/admin/kernels")
    async def show() -> dict[str, Any]:
        return await on_engine(lambda: kernel_state(state.ready_context().engine.engine.runner))

    @app.post("/admin/kernels/pin")
    async def pin(body: PinRequest) -> dict[str, Any]:
        def apply():
            event = state.ready_context().engine.engine.runner.registry.pin(body.op, body.variant)
            return vars(event)

        return await on_engine(apply)

    @app.post("/admin/kernels/offer")
    async def offer(body: OfferRequest) -> dict[str, Any]:
        def apply():
            tuner = state.ready_context().engine.engine.runner.autotuner
            if tuner is None:
                raise ValueError("the autotuner is off (--autotune off); pin the variant instead")
            return {"buckets": tuner.offer(body.op, body.variant)}

        return await on_engine(apply)
