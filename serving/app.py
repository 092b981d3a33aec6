"""The inference server: SageMaker's `/ping` and `/invocations` contract.

`/ping` returns 200 only after the model loaded and a warm-up prediction
succeeded, and 503 before that. `/invocations` scores CSV, JSON or JSON Lines
rows in one model call and returns JSON or CSV, following `Accept`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving import registry
from serving.parsing import MAX_PAYLOAD_BYTES, RequestError, parse_body
from serving.predictor import Predictor

log = logging.getLogger("serving")

# Batches above this many rows are scored in a worker thread so the event loop
# keeps serving /ping.
THREAD_BATCH_ROWS = 256

# Bytes of an oversized body read and discarded before the 413 is sent.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024

# Seconds a request waits for a model load in progress before a 503.
LOAD_WAIT_S = 30

# For tests only: seconds each model load sleeps before loading, so a test can
# observe /ping returning 503 while the model loads.
LOAD_DELAY_ENV = "TABMODEL_SERVING_LOAD_DELAY"


@dataclass
class ServerConfig:
    """Model location settings of the server."""

    model: str | None = None
    endpoint: str = registry.DEFAULT_ENDPOINT
    poll_seconds: float = 2.0

    @classmethod
    def from_env(cls) -> ServerConfig:
        """Read the configuration `python -m serving` passes to its workers."""
        return cls(
            model=os.environ.get("TABMODEL_SERVING_MODEL") or None,
            endpoint=os.environ.get(
                "TABMODEL_SERVING_ENDPOINT", registry.DEFAULT_ENDPOINT
            ),
            poll_seconds=float(os.environ.get("TABMODEL_SERVING_POLL_SECONDS", "2")),
        )


class ModelHolder:
    """The current predictor, swapped in whole when a new version is deployed."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.predictor: Predictor | None = None
        self.error: str | None = None
        self.loaded_version: str | None = None
        self._lock = threading.Lock()

    def locate(self) -> tuple[str, Path]:
        """Return the version and directory the server should be serving."""
        if self.config.model:
            path = Path(self.config.model)
            if path.is_file():
                return path.name, _unpacked(path)
            return path.name, path
        return registry.current_version(self.config.endpoint)

    def refresh(self) -> None:
        """Load the requested version if it differs from the one being served."""
        with self._lock:
            try:
                version, directory = self.locate()
                if version == self.loaded_version:
                    return
                started = time.perf_counter()
                time.sleep(float(os.environ.get(LOAD_DELAY_ENV) or 0))
                predictor = Predictor(directory, version)
                predictor.warm_up()
            except Exception as error:  # reported by /ping, the server keeps running
                message = f"{type(error).__name__}: {error}"
                # The poller retries every few seconds, so only a new error is
                # logged, not each repeat.
                if message != self.error:
                    log.error("model load failed: %s", message)
                self.error = message
                return
            self.predictor, self.loaded_version, self.error = predictor, version, None
            log.info(
                "serving model version %s from %s (loaded in %.1f s)",
                version,
                directory,
                time.perf_counter() - started,
            )


def _unpacked(tarball: Path) -> Path:
    from tabmodel.packaging import unpack_tarball

    target = Path(os.environ.get("TMPDIR", "/tmp")) / f"tabmodel-{os.getpid()}"
    return unpack_tarball(tarball, target)


def _response_type(accept: str) -> str | None:
    """Pick JSON or CSV from an Accept header; None when neither is acceptable.

    The first acceptable media range wins; one with `q=0` is skipped.
    """
    if not accept.strip():
        return "application/json"
    for part in accept.split(","):
        media_type, *parameters = (item.strip().lower() for item in part.split(";"))
        if any(_is_zero_quality(parameter) for parameter in parameters):
            continue
        if media_type in ("application/json", "application/*", "*/*"):
            return "application/json"
        if media_type in ("text/csv", "text/*"):
            return "text/csv"
    return None


def _is_zero_quality(parameter: str) -> bool:
    name, _, value = parameter.partition("=")
    if name.strip() != "q":
        return False
    try:
        return float(value) == 0.0
    except ValueError:
        return False


def _request_id(request: Request) -> str:
    """Return the client's x-request-id when it is a short token, else a new id."""
    supplied = request.headers.get("x-request-id", "")
    if 0 < len(supplied) <= 64 and supplied.isascii() and supplied.isprintable():
        return supplied
    return uuid.uuid4().hex[:16]


def create_app(config: ServerConfig | None = None) -> Starlette:
    """Build the ASGI application for `config` (default: from the environment)."""
    config = config or ServerConfig.from_env()
    holder = ModelHolder(config)

    async def ping(request: Request) -> Response:
        predictor = holder.predictor
        if predictor is None:
            status = "failed" if holder.error else "loading"
            return JSONResponse(
                {"status": status, "error": holder.error}, status_code=503
            )
        return JSONResponse({"status": "ready", "version": predictor.version})

    async def invocations(request: Request) -> Response:
        request_id = _request_id(request)
        try:
            return await _invoke(request, request_id)
        except RequestError as error:
            log.warning(
                "request %s rejected (%d): %s",
                request_id,
                error.status,
                error.body["error"],
            )
            body = {**error.body, "request_id": request_id}
            return JSONResponse(
                body, status_code=error.status, headers={"x-request-id": request_id}
            )
        except ClientDisconnect:
            log.info(
                "request %s: client disconnected before the body ended", request_id
            )
            return Response(status_code=400)
        except Exception:
            # A bug or a model failure, not a client error: logged with its
            # traceback, returned without details, and the worker keeps serving.
            log.exception("request %s failed", request_id)
            return JSONResponse(
                {"error": "Internal server error.", "request_id": request_id},
                status_code=500,
                headers={"x-request-id": request_id},
            )

    async def _invoke(request: Request, request_id: str) -> Response:
        predictor = await _loaded_predictor()
        if predictor is None:
            raise RequestError(
                503, "The model is not loaded yet; retry after /ping returns 200."
            )

        accept = request.headers.get("accept", "")
        response_type = _response_type(accept)
        if response_type is None:
            raise RequestError(
                406,
                f"Unsupported Accept {accept[:64]!r}.",
                received=accept[:64],
                expected="application/json or text/csv",
            )

        body = await _read_limited(request)
        columns = parse_body(body, request.headers.get("content-type", ""))
        rows = len(next(iter(columns.values())))
        if rows > THREAD_BATCH_ROWS:
            probabilities = await run_in_threadpool(predictor.predict, columns)
        else:
            probabilities = predictor.predict(columns)

        labels = predictor.labels(probabilities)
        headers = {"x-request-id": request_id, "x-model-version": predictor.version}
        if response_type == "text/csv":
            lines = ["probability,label"]
            lines += [
                f"{p:.6f},{label}"
                for p, label in zip(probabilities, labels, strict=True)
            ]
            return Response(
                "\n".join(lines) + "\n", media_type="text/csv", headers=headers
            )

        predictions = [
            {"probability": round(float(p), 6), "label": label}
            for p, label in zip(probabilities, labels, strict=True)
        ]
        return JSONResponse(
            {"predictions": predictions, "model_version": predictor.version},
            headers=headers,
        )

    async def _loaded_predictor() -> Predictor | None:
        # With several workers, /ping may succeed on one worker while another
        # still loads, so a request waits for a load in progress instead of
        # failing at once.
        deadline = time.monotonic() + LOAD_WAIT_S
        while holder.predictor is None and holder.error is None:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        return holder.predictor

    async def poll_for_versions() -> None:
        while True:
            await asyncio.sleep(config.poll_seconds)
            await run_in_threadpool(holder.refresh)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        load = loop.run_in_executor(None, holder.refresh)
        poller = None
        if not config.model:
            poller = asyncio.create_task(poll_for_versions())
        yield
        if poller:
            poller.cancel()
        await asyncio.wait_for(asyncio.shield(load), timeout=None)

    routes = [
        Route("/ping", ping, methods=["GET"]),
        Route("/invocations", invocations, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.holder = holder
    return app


async def _read_limited(request: Request) -> bytes:
    """Read the body, or raise a 413 once it exceeds MAX_PAYLOAD_BYTES.

    An oversized body is read to its end (up to DRAIN_LIMIT_BYTES) and
    discarded before the 413 goes out: a client still sending would otherwise
    see the connection reset instead of the response.
    """
    declared = request.headers.get("content-length", "")
    too_large = None
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_PAYLOAD_BYTES:
        too_large = f"Payload of {declared} bytes exceeds the limit."
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_PAYLOAD_BYTES:
            too_large = too_large or "Payload exceeds the limit."
        if too_large:
            chunks.clear()
            if size > DRAIN_LIMIT_BYTES:
                break
        else:
            chunks.append(chunk)
    if too_large:
        raise RequestError(
            413, too_large, expected=f"at most {MAX_PAYLOAD_BYTES} bytes"
        )
    return b"".join(chunks)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def create_app_from_env() -> Starlette:
    """Application factory for uvicorn workers, which also configures logging.

    Workers started with `--workers` are fresh processes, so the logging setup
    of `python -m serving` does not reach them.
    """
    level = os.environ.get("TABMODEL_SERVING_LOG_LEVEL", "info").upper()
    logging.basicConfig(level=level, format=LOG_FORMAT)
    return create_app(ServerConfig.from_env())
