"""The OpenAI-compatible ASGI app, on any :class:`~mra.serve.protocol.Backend`.

    app = build_app(backend, ServerSettings(api_key="..."))
    uvicorn.run(app, host="127.0.0.1", port=8080)

Routes: ``POST /v1/chat/completions`` (non-streamed, or server-sent events in OpenAI's chunk
format ending with ``[DONE]``), ``POST /v1/mra/encode`` (encode an image ahead: its prompt prefix
into the cache), ``GET /v1/models``, ``GET /health`` (503 until the backend is ready),
``GET /metrics`` (Prometheus text). Every error is OpenAI's error JSON with its status.
The app owns what is HTTP: the API key, the body size cap, the per-request timeout, noticing a
client that went away (it closes the backend's event stream, which cancels the generation),
and the metrics; the backend owns running the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .jobs import ChatJob, ImagePolicy, RequestLimits, load_image_url, parse_chat_request
from .metrics import Metrics
from .protocol import ApiError, Backend, Done, Event, Headers, Text, not_ready

log = logging.getLogger("mra.serve")


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/* when set
    max_body_bytes: int = 32 << 20
    request_timeout_s: float = 600.0  # queue wait + generation
    images: ImagePolicy = field(default_factory=ImagePolicy)
    limits: RequestLimits = field(default_factory=RequestLimits)


def build_app(backend: Backend, settings: ServerSettings = ServerSettings()) -> Starlette:
    """The ASGI app serving ``backend``; the backend is started and stopped with the app."""
    metrics = Metrics()
    # fetching an image URL is part of the request: its deadline is never longer than the request's
    images = dataclasses.replace(settings.images, url_timeout_s=min(settings.images.url_timeout_s,
                                                                    settings.request_timeout_s))

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "api key | missing or wrong; send the header `Authorization: Bearer KEY` with the "
                           "key mra-serve was started with", code="invalid_api_key")

    async def health(request: Request) -> Response:
        if backend.ready():
            return JSONResponse({"status": "ok", "model": backend.model_id})
        error = getattr(backend, "error", None)  # why loading failed, where the backend knows
        raise not_ready(f"loading failed: {error}" if error else "the model is still loading")

    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [{"id": backend.model_id, "object": "model", "created": 0,
                                                         "owned_by": "mra-edge"}]})

    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(metrics.render(backend.gauges()), media_type="text/plain; version=0.0.4")

    async def chat(request: Request) -> Response:
        start = time.perf_counter()
        try:
            check_key(request)
            body = await _read_json(request, settings.max_body_bytes, settings.limits)
            job = await asyncio.to_thread(parse_chat_request, body, images, settings.limits)
            if not backend.ready():
                raise not_ready()
            run = _Run(job, backend.generate(job), start + settings.request_timeout_s, start, metrics,
                       job.model or backend.model_id)
            headers = await run.begin()
        except ApiError as e:
            metrics.finished(e.status, time.perf_counter() - start)
            raise
        if job.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        return JSONResponse(await run.collect(request), headers=headers)

    async def encode(request: Request) -> Response:
        """Encode ahead: ``{"image_url": {"url": ...}, "system": optional}`` -> the image's prefix
        evaluated into the cache, so the first question about it is answered at cached speed."""
        check_key(request)
        body = await _read_json(request, settings.max_body_bytes, settings.limits)
        url = body.get("image_url") if isinstance(body, dict) else None
        url = url.get("url") if isinstance(url, dict) else url
        system = body.get("system") if isinstance(body, dict) else None
        if not isinstance(url, str) or not (system is None or isinstance(system, str)):
            raise ApiError(400, "encode | expected {\"image_url\": {\"url\": \"data:image/...\"}, \"system\": "
                           "optional text}", param="image_url")
        image = await asyncio.to_thread(load_image_url, url, settings.images)
        if not backend.ready():
            raise not_ready()
        run = getattr(backend, "encode", None)
        if run is None:
            raise ApiError(501, "encode | this backend does not encode ahead (mra-serve --ray); send the image with "
                           "the first question", code="not_supported")
        try:
            done = await asyncio.wait_for(run(image, system), settings.request_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise ApiError(504, "timeout | encoding took longer than the server's --timeout", "server_error",
                           "timeout") from None
        return JSONResponse({"object": "mra.image_prefix", **done})

    async def api_error(request: Request, e: ApiError) -> Response:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def http_error(request: Request, e: HTTPException) -> Response:
        kind = "not_found" if e.status_code == 404 else None
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path} | {e.detail}",
                                     code=kind).body(), status_code=e.status_code)

    async def server_error(request: Request, e: Exception) -> Response:
        log.exception("request failed")
        return JSONResponse(ApiError(500, f"internal error | {type(e).__name__}: {e}", "server_error").body(),
                            status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models),
              Route("/v1/mra/encode", encode, methods=["POST"]),
              Route("/health", health), Route("/metrics", prometheus)]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})


async def _read_json(request: Request, limit: int, limits: RequestLimits):
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    data = bytearray()
    try:
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise _too_large(len(data), limit)
    except ClientDisconnect:
        raise ApiError(499, "client disconnected before its body was read", code="client_closed") from None
    data = bytes(data)
    depth, items = await asyncio.to_thread(json_shape, data)
    if depth > limits.max_json_depth:
        raise ApiError(400, f"body | JSON nested {depth} deep, the bound is {limits.max_json_depth}; flatten the "
                       "request", code="limit_exceeded")
    if items > limits.max_json_items:
        raise ApiError(400, f"body | about {items} JSON values, the bound is {limits.max_json_items}; send fewer "
                       "messages, parts or schema entries", code="limit_exceeded")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # a JSONDecodeError, bad UTF-8, an integer of 5,000 digits
        raise ApiError(400, f"body | not valid JSON ({str(e)[:200]})") from None


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # unrolled: linear, ~250 MB/s


def json_shape(data: bytes, chunk: int = 1 << 22) -> tuple[int, int]:
    """(deepest nesting of ``[``/``{``, number of values, about) of JSON text, strings skipped,
    found without parsing it and in bounded memory: Python's parser recurses (200,000 ``[`` is a
    RecursionError) and makes an object per value (28 MB of ``[],`` took 730 MB)."""
    skeleton = _JSON_STRING.sub(b"", data)
    deepest = level = 0
    items = skeleton.count(b",") + skeleton.count(b"[") + skeleton.count(b"{") + 1
    for s in range(0, len(skeleton), chunk):
        a = np.frombuffer(skeleton, np.uint8, min(chunk, len(skeleton) - s), s)
        step = ((a == 91) | (a == 123)).astype(np.int32) - ((a == 93) | (a == 125))
        run = np.cumsum(step) + level
        deepest, level = max(deepest, int(run.max())), int(run[-1])
    return deepest, items


def _too_large(n: int, limit: int) -> ApiError:
    return ApiError(413, f"body | {n} bytes, the limit is {limit}; send a smaller image or raise --max-body-mb",
                    code="body_too_large")


class _Run:
    """One request's event stream, turned into an OpenAI response (whole, or as SSE chunks)."""

    def __init__(self, job: ChatJob, events: AsyncIterator[Event], deadline: float, start: float, metrics: Metrics,
                 model: str):
        self.job, self.events, self.deadline, self.start, self.metrics = job, events, deadline, start, metrics
        self.model = model  # echoed in every response, as OpenAI does
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.first: Event | None = None
        self.ttft: float | None = None
        self.tokens = 0

    async def _next(self) -> Event:
        remaining = self.deadline - time.perf_counter()
        if remaining <= 0:
            raise ApiError(504, "timeout | the request took longer than the server's --timeout; ask for fewer "
                           "max_tokens or raise --timeout", "server_error", "timeout")
        try:
            if hasattr(asyncio, "timeout_at"):  # Python 3.11+: a timer handle, not a task per event
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + remaining):
                    ev = await self.events.__anext__()
            else:
                ev = await asyncio.wait_for(self.events.__anext__(), remaining)
        except (asyncio.TimeoutError, TimeoutError):
            raise ApiError(504, "timeout | the request took longer than the server's --timeout; ask for fewer "
                           "max_tokens or raise --timeout", "server_error", "timeout") from None
        except StopAsyncIteration:
            raise ApiError(500, "backend | the event stream ended without Done", "server_error") from None
        if isinstance(ev, Text) and self.ttft is None:
            self.ttft = time.perf_counter() - self.start
        return ev

    async def begin(self) -> dict[str, str]:
        """Read up to the first Text or Done (errors before then are HTTP errors); the headers to send."""
        headers: dict[str, str] = {}
        try:
            while True:
                ev = await self._next()
                if isinstance(ev, Headers):
                    headers.update(ev.headers)
                    continue
                self.first = ev
                return headers
        except BaseException:
            await self.close()
            raise

    async def _rest(self) -> AsyncIterator[Event]:
        ev = self.first
        while True:
            if not isinstance(ev, Headers):
                yield ev
            if isinstance(ev, Done):
                return
            ev = await self._next()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.events.aclose()

    def _finish(self, status: int, done: Done | None) -> None:
        t = done.timings if done else {}
        self.metrics.finished(status, time.perf_counter() - self.start, self.ttft, t.get("decode_tokens_per_s"),
                              done.completion_tokens if done else 0, t,
                              t.get("image_size") if t.get("images_encoded") or t.get("image_cache_hits") else None)

    def _usage(self, done: Done) -> dict:
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
        t = done.timings
        if "reused" in t:  # positions served from the KV cache (earlier turns, the image prefix)
            usage["prompt_tokens_details"] = {"cached_tokens": int(t["reused"])}
        if "image_rows" in t:  # where the time to first token went, which other servers do not show
            usage["mra"] = {"image_rows": int(t["image_rows"]), "queued_ms": round(t["queued_s"] * 1e3, 3),
                            "vision_ms": round(t["vision_s"] * 1e3, 3), "prefill_ms": round(t["prefill_s"] * 1e3, 3)}
        if t.get("image_size"):  # the input size the image's budget chose (docs/resolution.md)
            usage["image_size"] = int(t["image_size"])
            usage["image_tokens"] = int(t["image_rows"])
        return usage

    async def collect(self, request: Request) -> dict:
        """The whole answer; a client that disconnects meanwhile cancels the generation."""
        async def gather() -> tuple[str, Done]:
            parts = []
            async for ev in self._rest():
                if isinstance(ev, Text):
                    parts.append(ev.text)
                    logprobs.extend(ev.logprobs or ())
                elif isinstance(ev, Done):
                    return "".join(parts), ev
            raise AssertionError("unreachable")

        logprobs: list[dict] = []

        task = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # the client went away: stop generating for nobody
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                self._finish(499, None)
                raise ApiError(499, "client disconnected", code="client_closed")
            text, done = task.result()
        except ApiError as e:
            if e.status != 499:
                self._finish(e.status, None)
            raise
        finally:
            gone.cancel()
            await self.close()
        self._finish(200, done)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None if self.job.params.logprobs is None else {"content": logprobs},
                             "finish_reason": done.finish_reason}],
                "usage": self._usage(done)}

    def _chunk(self, delta: dict, finish: str | None = None, logprobs: list[dict] | None = None, **extra) -> bytes:
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
                          "finish_reason": finish}], **extra}
        return b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n"

    async def sse(self) -> AsyncIterator[bytes]:
        """OpenAI's chunk stream; the response has started, so a late error is an error event."""
        done = None
        status = 200
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            async for ev in self._rest():
                if isinstance(ev, Text):
                    yield self._chunk({"content": ev.text}, logprobs=ev.logprobs)
                elif isinstance(ev, Done):
                    done = ev
                    yield self._chunk({}, ev.finish_reason)
                    if self.job.include_usage:
                        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                             "model": self.model, "choices": [], "usage": self._usage(ev)}
                        yield b"data: " + json.dumps(c).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        except ApiError as e:
            status = e.status
            yield b"data: " + json.dumps(e.body()).encode() + b"\n\n"
        except BaseException:  # cancelled: the client went away
            status = 499
            raise
        finally:
            await self.close()
            self._finish(status, done)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
