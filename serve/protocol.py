"""The contract between the HTTP app and whatever runs the model: errors, events, the backend.

A backend turns one :class:`~mra.serve.jobs.ChatJob` into an async stream of events:

    Headers({...})?  Text("...")*  Done(finish_reason, prompt_tokens, completion_tokens)

``Headers`` (optional, first) adds response headers, e.g. ``x-mra-replica``; the app reads
events up to the first ``Text`` or ``Done`` before it answers, so an :class:`ApiError` raised
by then (queue full, not ready, context overflow) becomes a proper HTTP error even for a
streamed request. Closing the iterator early (``aclose()``: the client went away, or the
request timed out) must cancel the generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, Union, runtime_checkable


class ApiError(Exception):
    """An OpenAI-style error response: HTTP status, message, type, code and extra headers."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_ready(why: str = "the model is still loading") -> ApiError:
    return ApiError(503, f"not ready | {why}; retry shortly (GET /health says when)", "server_error",
                    "model_not_ready", headers={"Retry-After": "2"})


def queue_full(depth: int, retry_after_s: int = 1) -> ApiError:
    return ApiError(429, f"queue full | {depth} requests already wait; retry after {retry_after_s} s or start the "
                    "server with a larger --queue / --parallel", "rate_limit_error", "queue_full",
                    headers={"Retry-After": str(retry_after_s)})


@dataclass
class Headers:
    """Response headers to add (only before the first Text)."""
    headers: dict[str, str]


@dataclass
class Text:
    """A piece of the answer; with ``logprobs`` asked for, the entries (OpenAI's
    ``choices[].logprobs.content`` items) of the tokens sampled since the last Text."""
    text: str
    logprobs: list[dict] | None = None


@dataclass
class Done:
    """The end: why it stopped (``stop`` | ``length``) and the token counts (image rows included)."""
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict = field(default_factory=dict)  # the Pipeline's Timings.as_dict(), for metrics


Event = Union[Headers, Text, Done]


@runtime_checkable
class Backend(Protocol):
    """What :func:`mra.serve.app.build_app` needs from a model runner (local slots, Ray Serve, ...)."""
    model_id: str

    def ready(self) -> bool:
        """True once requests can be served (GET /health answers 200)."""

    async def start(self) -> None:
        """Begin loading (may return before loading is done: requests get 503 until ready)."""

    async def stop(self) -> None:
        """Release the model(s)."""

    def generate(self, job) -> AsyncIterator[Event]:
        """The events of one job (an async generator); ``aclose()`` cancels it."""

    def gauges(self) -> dict[str, float]:
        """Current values for /metrics, e.g. ``{"queue_depth": 0, "busy_slots": 1}``."""
