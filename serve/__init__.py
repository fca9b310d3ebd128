"""mra-serve: an OpenAI-compatible HTTP server for LLaVA-HR bundles (no torch).

The seam, for other ways of running the model (Ray Serve):

1. :func:`mra.serve.jobs.parse_chat_request` checks an OpenAI chat-completions body and
   returns a :class:`~mra.serve.jobs.ChatJob` (messages, the images' bytes and sha256 keys,
   sampling params with the checked, bounded grammar of ``response_format``), or raises
   :class:`~mra.serve.protocol.ApiError`. It knows nothing about how the job runs.
2. :func:`mra.serve.app.build_app` ``(backend, ServerSettings)`` makes the ASGI app (routes,
   API key, body cap, timeout, SSE, disconnects, metrics) over any object that follows
   :class:`~mra.serve.protocol.Backend`: ``ready()``, ``start()``, ``stop()``, ``gauges()``
   and ``generate(job)``, an async generator of ``Headers`` (optional, first: extra response
   headers such as ``x-mra-replica``), ``Text`` pieces and one ``Done`` (finish reason,
   token counts, timings). Closing it (``aclose()``) cancels the generation; an ApiError
   raised before the first Text becomes the HTTP status.
3. :class:`mra.serve.local.LocalBackend` is this process's backend: one Pipeline whose engine
   decodes ``--parallel N`` sequences in one llama.cpp context, behind a bounded queue (429
   with Retry-After when full, 503 until loaded).

``mra.serve`` imports ``mra.runtime``, never torch.
"""

from .app import ServerSettings, build_app
from .jobs import ChatJob, ImageInput, ImagePolicy, Message, SamplingParams, parse_chat_request
from .local import LocalBackend
from .protocol import ApiError, Backend, Done, Event, Headers, Text

__all__ = ["ApiError", "Backend", "ChatJob", "Done", "Event", "Headers", "ImageInput", "ImagePolicy",
           "LocalBackend", "Message", "SamplingParams", "ServerSettings", "Text", "build_app", "parse_chat_request"]
