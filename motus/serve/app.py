"""The policy server's HTTP and websocket API (FastAPI), over a `Deployment` that follows a registry alias.

    POST /act        one request (see `motus.serve.request`) -> {"actions": [[...]], "version": N, ...}
    WS   /stream     the same, one JSON message per request, for a control loop; a bad message is answered with
                     its error and the stream stays open
    GET  /healthz    200 while a version is serving, 503 before the first one is loaded (readiness, liveness)
    GET  /metadata   name, version, lineage record, action spaces, normalisation, precision; refusals, swaps
    GET  /metrics    Prometheus

Requests go through one inference thread (`Batcher`): torch on a CPU or one GPU runs one forward pass at a time
best, and with `max_batch` > 1 the requests that arrive together share one. A request is checked against, and
answered by, the version that was serving when it arrived, so a swap never changes a request's contract under it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue
import threading
import time
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response

from ..contracts import SERVING_MODES
from .deployment import Deployment
from .request import BadRequest, PolicyRequest, parse_request
from .served import ServedVersion

log = logging.getLogger(__name__)


class NotServing(RuntimeError):
    """No version is loaded yet (or every one so far was refused)."""


class Batcher:
    """One inference thread: takes what is queued (up to `max_batch`, waiting `wait_s` for more after the first),
    answers each request on the version it was checked against, one forward pass per version and group."""

    def __init__(self, max_batch: int = 1, wait_s: float = 0.0, on_batch: Any = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch, self.wait_s = max_batch, wait_s
        self.on_batch = on_batch or (lambda n: None)  # told the size of every forward pass
        self._queue: queue.Queue[tuple[ServedVersion, PolicyRequest, concurrent.futures.Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="motus-serve-infer", daemon=True)
        self._thread.start()

    def submit(self, served: ServedVersion, request: PolicyRequest) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((served, request, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.perf_counter() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    left = deadline - time.perf_counter()
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            by_version: dict[int, list[tuple[ServedVersion, PolicyRequest, concurrent.futures.Future]]] = {}
            for entry in batch:
                by_version.setdefault(id(entry[0]), []).append(entry)
            for entries in by_version.values():
                served = entries[0][0]
                try:
                    answers = served.act([r for _, r, _ in entries])
                except Exception as e:  # noqa: BLE001 - handed to each request of the batch
                    for _, _, fut in entries:
                        fut.set_exception(e)
                    continue
                self.on_batch(len(entries))
                for (_, _, fut), answer in zip(entries, answers, strict=True):
                    fut.set_result(answer)


# FastAPI reads the handlers' annotations to tell a Request or WebSocket from a query parameter: its types are
# module-level names here, where it resolves them
def create_app(deployment: Deployment, *, max_batch: int = 1, batch_wait_ms: float = 0.0) -> FastAPI:
    metrics = deployment.metrics
    batcher = Batcher(max_batch, batch_wait_ms / 1000.0, on_batch=metrics.batch.observe)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        deployment.start()  # follow the alias while the server runs
        try:
            yield
        finally:
            deployment.stop()
            batcher.close()

    app = FastAPI(title="motus serve", description=__doc__, lifespan=lifespan)
    app.state.deployment, app.state.batcher = deployment, batcher

    async def answer(body: Any, transport: str) -> tuple[int, dict[str, Any]]:
        t = time.perf_counter()
        served = deployment.current
        default = served.contract.modes[0] if served is not None else "vla"
        mode = body.get("mode", default) if isinstance(body, dict) else "?"
        mode = mode if mode in SERVING_MODES else "other"  # a bounded label set
        if served is None:
            metrics.answered(mode, transport, "unavailable", None)
            return 503, {"error": f"no version of {deployment.target.uri} is serving yet", "field": None}
        try:
            request = parse_request(body, served.contract)
        except BadRequest as e:
            metrics.answered(mode, transport, "bad-request", None)
            return 422, e.to_json()
        try:
            out = await asyncio.wrap_future(batcher.submit(served, request))
        except Exception as e:  # noqa: BLE001 - the server answers 500 and keeps serving
            log.exception("%s failed to answer a request", served.label)
            metrics.answered(mode, transport, "error", None)
            return 500, {"error": f"{served.label} failed: {type(e).__name__}: {e}", "field": None}
        seconds = time.perf_counter() - t
        metrics.answered(mode, transport, "ok", seconds)
        return 200, {**out, "seconds": round(seconds, 6)}

    @app.post("/act")
    async def act(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            metrics.answered("other", "http", "bad-request", None)
            return JSONResponse({"error": "the body is not JSON", "field": "request"}, status_code=400)
        status, payload = await answer(body, "http")
        return JSONResponse(payload, status_code=status)

    @app.websocket("/stream")
    async def stream(ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                text = await ws.receive_text()
                try:
                    body = json.loads(text)
                except json.JSONDecodeError:
                    await ws.send_json({"status": 400, "error": "the message is not JSON", "field": "request"})
                    continue
                status, payload = await answer(body, "websocket")
                await ws.send_json({"status": status, **payload})
        except WebSocketDisconnect:
            return

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        served = deployment.current
        if served is None:
            last = deployment.metadata()["last_refusal"]
            return JSONResponse({"status": "not serving", "target": deployment.target.uri, "last_refusal": last},
                                status_code=503)
        return JSONResponse({"status": "ok", "serving": served.label})

    @app.get("/metadata")
    async def metadata() -> JSONResponse:
        return JSONResponse(deployment.metadata())

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
