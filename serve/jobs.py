"""OpenAI chat-completions request -> a small typed :class:`ChatJob`, checked, independent of
how it will run (local slots, Ray Serve). Everything a client can get wrong is an
:class:`ApiError` here, before any model work.

Images: at most one per user message (LLaVA places it first in its turn, ``<image>\n``) and
at most ``MAX_IMAGES`` per conversation, each with the user turn that carries it, in order;
more is a 400. A system message replaces the bundle's system prompt.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mra.core.errors import LimitExceeded, MissingDependency, MraError
from mra.runtime.constraint import Grammar, json_object_grammar, json_schema_grammar

from .protocol import ApiError

MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_IMAGES = 8  # per conversation: each is decoded, encoded and fills its rows of the context


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from besides ``data:`` URLs."""
    allow_files: Path | None = None  # local paths (or file:// URLs) inside this folder
    allow_urls: bool = False  # http(s) URLs, fetched with a size cap, bounded redirects and one deadline
    max_image_bytes: int = 20 << 20
    url_timeout_s: float = 10.0  # one deadline for a whole fetch; build_app keeps it within the request timeout


@dataclass(frozen=True)
class ImageInput:
    """The conversation's image: its encoded bytes (PNG, JPEG, ...) and their sha256."""
    data: bytes
    key: str

    def open(self):
        """The decoded RGB PIL image, through the runtime's one image gate (``load_image``). The
        request parser checked only the header (:func:`load_image_url`); the pixels are decoded
        here, when the job runs, under the queue bound, and kept for the backend in this process."""
        im = self.__dict__.get("_decoded")
        if im is None:
            from mra.runtime.preprocess import load_image

            im = load_image(self.data)
            object.__setattr__(self, "_decoded", im)
        return im

    def __getstate__(self) -> dict:  # another process (a Ray replica) gets the bytes, not the pixels
        return {"data": self.data, "key": self.key}


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    text: str
    image: bool = False  # this user turn carries an image (the job's next one)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: until the context is full
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: Grammar | None = None  # response_format json_object / json_schema, checked and bounded
    ignore_eos: bool = False  # llama.cpp server's extension: generate exactly max_tokens (benchmarks)
    logprobs: int | None = None  # None: off; k: each token's log-probability and k alternatives (top_logprobs)


@dataclass(frozen=True)
class ChatJob:
    """One chat completion to run: what the backend needs and nothing about HTTP."""
    messages: tuple[Message, ...]
    images: tuple[ImageInput, ...]  # in the order of the user turns that carry them
    params: SamplingParams
    model: str = ""
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    meta: dict[str, Any] = field(default_factory=dict)  # free for backends (e.g. a routing hint)
    detail: str | None = None  # the image's image_url.detail: low | high | auto (docs/resolution.md)
    max_image_tokens: int | None = None  # extension field: the image's row budget
    image_embeddings: tuple[Any, ...] | None = None  # the images already encoded elsewhere (runtime Embeddings)

    @property
    def image(self) -> ImageInput | None:
        """The conversation's first image (its follow-ups carry it too: a routing key)."""
        return self.images[0] if self.images else None

    @property
    def system(self) -> str | None:
        texts = [m.text for m in self.messages if m.role == "system"]
        return "\n".join(texts) if texts else None

    @property
    def turns(self) -> list[Message]:
        """The user/assistant messages, alternating, the last one a user's."""
        return [m for m in self.messages if m.role != "system"]


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class RequestLimits:
    """What one request body may hold, checked before any model work (docs/reliability.md)."""
    max_json_depth: int = 32  # nesting of the body's objects and lists (a schema's included)
    max_json_items: int = 100_000  # values in the body: each is a Python object once parsed
    max_messages: int = 256
    max_parts: int = 64  # content parts per message
    max_text_chars: int = 1 << 20  # all message texts together: checked before anything is tokenized
    max_tokens: int = 1 << 20  # max_tokens beyond the backend's context is refused by the backend
    max_stop_chars: int = 256  # per stop string
    max_id_chars: int = 256  # model, user


def _show(v: Any) -> str:
    """A client's value for an error message: short, and never a deep repr."""
    if isinstance(v, (dict, list)):
        return f"a JSON {'object' if isinstance(v, dict) else 'array'} of {len(v)}"
    if isinstance(v, str):
        return repr(v[:40] + "...") if len(v) > 40 else repr(v)
    return "null" if v is None else repr(v)[:40]


def _text(v: Any, where: str, param: str = "messages") -> str:
    if not isinstance(v, str):
        raise bad(f"{where} | got {_show(v)}, expected a string", param)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"{where} | not valid UTF-8 text: {e.reason} at character {e.start}; send UTF-8 text (a lone "
                  "surrogate escape such as \\ud800 has no character)", param) from None
    return v


def parse_chat_request(body: Any, policy: ImagePolicy = ImagePolicy(),
                       limits: RequestLimits = RequestLimits()) -> ChatJob:
    """Check an OpenAI ``/v1/chat/completions`` body and turn it into a job (blocking: it may
    decode an image or fetch a URL; call it off the event loop). Every field it reads is typed
    and bounded by ``limits``; the body's nesting is bounded where it is read (app.py)."""
    if not isinstance(body, dict):
        raise bad(f"body | got {type(body).__name__}, expected a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages | expected a non-empty list of {role, content}", "messages")
    if len(raw) > limits.max_messages:
        raise bad(f"messages | {len(raw)} messages, the bound is {limits.max_messages}; shorten the conversation",
                  "messages", "limit_exceeded")
    n = body.get("n", 1)
    if n is not None and (type(n) is not int or n != 1):
        raise bad(f"n | got {_show(n)}, only n=1 is supported", "n")
    if body.get("tools") or body.get("functions"):
        raise bad("tools | function calling is not supported; use response_format json_schema", "tools")
    if body.get("logit_bias"):
        raise bad("logit_bias | not supported by mra-serve; leave it unset", "logit_bias")
    for name in ("model", "user"):
        v = body.get(name)
        if v is not None and (not isinstance(v, str) or len(v) > limits.max_id_chars):
            raise bad(f"{name} | got {_show(v)}, expected a string of at most {limits.max_id_chars} characters", name)
    for name in ("frequency_penalty", "presence_penalty"):  # accepted as OpenAI's clients send them, not applied
        _number(body, name, 0.0, -2.0, 2.0)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad(f"stream_options | got {_show(options)}, expected an object such as {{\"include_usage\": true}}",
                  "stream_options")
    params = _sampling(body, limits)  # the cheap checks (and the bounded grammar compile) before any image

    messages: list[Message] = []
    images: list[ImageInput] = []
    chars = 0
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} | got {_show(m)}, expected an object with role and content", "messages")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad(f"{where}.role | got {_show(role)}, expected system, user or assistant", "messages")
        text, found = _content(m.get("content"), where, role, policy, limits)
        chars += len(text)
        if chars > limits.max_text_chars:
            raise bad(f"messages | more than {limits.max_text_chars} characters of text, the bound of one request; "
                      "shorten the prompt", "messages", "context_length_exceeded")
        if found is not None:
            if len(images) == MAX_IMAGES:
                raise bad(f"{where} | image {MAX_IMAGES + 1}; a conversation takes at most {MAX_IMAGES}: start a new "
                          "conversation", "messages", "too_many_images")
            images.append(found)
        messages.append(Message(role, text, found is not None))
    _check_order(messages)
    return ChatJob(tuple(messages), tuple(images), params, str(body.get("model") or ""),
                   _flag(body, "stream"), _flag(options or {}, "include_usage", "stream_options.include_usage"),
                   detail=_detail(raw), max_image_tokens=_max_image_tokens(body))


def _detail(raw: list) -> str | None:
    """The image part's ``image_url.detail`` (low | high | auto), None where not given."""
    for m in raw:
        for part in m.get("content") if isinstance(m.get("content"), list) else ():
            url = part.get("image_url") if isinstance(part, dict) else None
            if isinstance(url, dict) and url.get("detail") is not None:
                if url["detail"] not in ("low", "high", "auto"):
                    raise bad(f"image_url.detail | got {_show(url['detail'])}, expected low, high or auto", "messages")
                return url["detail"]
    return None


def _max_image_tokens(body: dict) -> int | None:
    v = body.get("max_image_tokens")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise bad(f"max_image_tokens | got {_show(v)}, expected a positive integer", "max_image_tokens")
    return v


def _flag(body: dict, name: str, where: str | None = None) -> bool:
    v = body.get(name, False)
    if not isinstance(v, bool) and v is not None:
        raise bad(f"{where or name} | got {_show(v)}, expected true or false", where or name)
    return bool(v)


def _check_order(messages: list[Message]) -> None:
    seen_turn = False
    last = None
    for i, m in enumerate(messages):
        if m.role == "system":
            if seen_turn:
                raise bad(f"messages[{i}] | a system message after the conversation began; put it first", "messages")
            continue
        seen_turn = True
        expected = "user" if last in (None, "assistant") else "assistant"
        if m.role != expected:
            raise bad(f"messages[{i}].role | got {m.role}, expected {expected}: user and assistant turns alternate, "
                      "starting with user (merge consecutive messages of one role)", "messages")
        last = m.role
    if last != "user":
        raise bad("messages | the last message must be the user's (the turn to answer)", "messages")


def _content(content: Any, where: str, role: str, policy: ImagePolicy,
             limits: RequestLimits) -> tuple[str, ImageInput | None]:
    if isinstance(content, str):
        return _text(content, f"{where}.content"), None
    if content is None and role == "assistant":
        return "", None
    if not isinstance(content, list):
        raise bad(f"{where}.content | got {_show(content)}, expected a string or a list of parts", "messages")
    if len(content) > limits.max_parts:
        raise bad(f"{where}.content | {len(content)} parts, the bound is {limits.max_parts}; merge the texts",
                  "messages", "limit_exceeded")
    texts: list[str] = []
    image = None
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(_text(part.get("text"), f"{where}.content[{j}].text"))
        elif kind == "image_url":
            if role != "user":
                raise bad(f"{where}.content[{j}] | images go in user messages", "messages")
            if image is not None:
                raise bad(f"{where}.content[{j}] | a second image in one message; LLaVA places one image first in "
                          "its user turn: put the next image in a later user message", "messages", "too_many_images")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad(f"{where}.content[{j}].image_url | expected {{\"url\": \"data:image/...;base64,...\"}}",
                          "messages")
            image = load_image_url(url, policy)
        elif isinstance(part, dict):
            raise bad(f"{where}.content[{j}].type | got {_show(kind)}, expected text or image_url", "messages")
        else:
            raise bad(f"{where}.content[{j}] | got {_show(part)}, expected an object with a type", "messages")
    return "\n".join(texts), image


def load_image_url(url: str, policy: ImagePolicy) -> ImageInput:
    """The bytes behind an image URL, their header checked by the runtime's image gate (a format
    it decodes, a pixel count within its bound); the pixels are decoded only when the job runs."""
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64") or not head[5:].startswith("image/"):
            raise bad("image_url | expected a data:image/<type>;base64,<data> URL", "messages", "bad_image")
        if len(payload) > policy.max_image_bytes * 4 // 3 + 4:
            raise _too_big(len(payload) * 3 // 4, policy)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad(f"image_url | bad base64 ({e})", "messages", "bad_image") from None
    elif url.startswith(("http://", "https://")):
        if not policy.allow_urls:
            raise bad("image_url | http(s) URLs are refused; send the image as a data: URL, or start mra-serve "
                      "with --allow-urls", "messages", "url_not_allowed")
        data = _fetch(url, policy)
    else:
        data = _read_file(url, policy)
    if len(data) > policy.max_image_bytes:
        raise _too_big(len(data), policy)
    from mra.core.errors import LimitExceeded, MraError
    from mra.runtime.preprocess import probe_image

    try:
        probe_image(data, "image_url")
    except LimitExceeded as e:
        raise bad(str(e), "messages", "image_too_large") from None
    except MraError as e:
        raise bad(str(e), "messages", "bad_image") from None
    return ImageInput(data, hashlib.sha256(data).hexdigest())


def _too_big(n: int, policy: ImagePolicy) -> ApiError:
    return ApiError(413, f"image_url | about {n} bytes, the limit is {policy.max_image_bytes}; send a smaller image",
                    param="messages", code="image_too_large")


MAX_REDIRECTS = 3


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    """GET an http(s) image within one overall deadline (``url_timeout_s``: connecting, headers,
    redirects and body together; a server that trickles bytes is cut there), at most
    MAX_REDIRECTS redirects to http(s) URLs, at most ``max_image_bytes``."""
    deadline = time.monotonic() + policy.url_timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        status, location, data = _get(url, policy, deadline)
        if location is None:
            if status != 200:
                raise bad(f"image_url | {url} answered HTTP {status}, expected 200", "messages", "bad_image")
            return data
        url = urllib.parse.urljoin(url, location)
        if not url.startswith(("http://", "https://")):
            raise bad(f"image_url | redirected to {url}; only http(s) URLs are fetched", "messages", "bad_image")
    raise bad(f"image_url | more than {MAX_REDIRECTS} redirects; send the final URL", "messages", "bad_image")


def _get(url: str, policy: ImagePolicy, deadline: float) -> tuple[int, str | None, bytes]:
    """One GET: (status, redirect location or None, body). A timer shuts the socket down at the
    deadline, which ends any read blocked on it: per-read socket timeouts alone never bound a
    server that sends a byte every few seconds."""
    import http.client

    parts = urllib.parse.urlsplit(url)
    remaining = deadline - time.monotonic()
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    try:
        conn = cls(parts.hostname or "", parts.port, timeout=max(remaining, 0.001))
    except (ValueError, http.client.HTTPException) as e:  # a bad port and the like
        raise bad(f"image_url | cannot fetch {url}: {e}", "messages", "bad_image") from None
    sockets: list[socket.socket] = []  # the connection gives its socket up to the response: keep it here
    timer = threading.Timer(max(remaining, 0.0), _shut, (sockets,))
    timer.daemon = True
    timer.start()
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.connect()  # bounded by the connection's timeout
        sockets.append(conn.sock)
        if time.monotonic() >= deadline:  # the timer fired while connecting
            raise TimeoutError
        conn.request("GET", target, headers={"Accept": "image/*", "User-Agent": "mra-serve"})
        r = conn.getresponse()
        if r.status in (301, 302, 303, 307, 308) and r.getheader("location"):
            return r.status, r.getheader("location"), b""
        declared = r.getheader("content-length", "")
        if declared.isdigit() and int(declared) > policy.max_image_bytes:
            raise _too_big(int(declared), policy)
        data = bytearray()
        while chunk := r.read1(1 << 16):
            data += chunk
            if len(data) > policy.max_image_bytes:
                raise _too_big(len(data), policy)
        if time.monotonic() >= deadline:  # the timer cut the body short
            raise TimeoutError
        return r.status, None, bytes(data)
    except ApiError:
        raise
    except Exception as e:  # refused, reset, a bad status line, a certificate, the deadline, ...
        if time.monotonic() >= deadline:
            raise bad(f"image_url | fetching {url} took longer than {policy.url_timeout_s:g} s (the deadline for a "
                      "whole fetch, inside the server's --timeout); send the image as a data: URL",
                      "messages", "bad_image") from None
        raise bad(f"image_url | cannot fetch {url}: {type(e).__name__}: {e}", "messages", "bad_image") from None
    finally:
        timer.cancel()
        conn.close()


def _shut(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _read_file(url: str, policy: ImagePolicy) -> bytes:
    """A file inside ``allow_files``, read only if it is a regular file within the size bound
    (a FIFO or a device there never blocks or floods the parser)."""
    from mra.core.files import open_regular

    if policy.allow_files is None:
        raise bad("image_url | local files are refused; send a data:image/...;base64 URL, or start mra-serve with "
                  "--allow-files DIR", "messages", "file_not_allowed")
    root = policy.allow_files.resolve()
    path = Path(url.removeprefix("file://")).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise bad(f"image_url | {url} is outside the allowed folder {root}", "messages", "file_not_allowed")
    try:
        with open_regular(path) as f:
            data = f.read(policy.max_image_bytes + 1)
    except FileNotFoundError:
        raise bad(f"image_url | {url}: no such file under {root}", "messages", "bad_image") from None
    except OSError as e:
        raise bad(f"image_url | {url}: {e.strerror or e}", "messages", "bad_image") from None
    if len(data) > policy.max_image_bytes:
        raise _too_big(len(data), policy)
    return data


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is not None and (type(v) is not int or not lo <= v <= hi):
        raise bad(f"{name} | got {_show(v)}, expected an integer in [{lo}, {hi}]", name)
    return v


def _sampling(body: dict, limits: RequestLimits = RequestLimits()) -> SamplingParams:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, 1, limits.max_tokens)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p | got 0, expected 0 < top_p <= 1", "top_p")
    seed = _integer(body, "seed", -(1 << 63), (1 << 64) - 1)
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else None
    if stop is None:
        stops = ()
    if stops is None or len(stops) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= limits.max_stop_chars
                                                         for s in stops):
        raise bad(f"stop | got {_show(stop)}, expected a non-empty string or a list of at most {MAX_STOP}, each of "
                  f"1 to {limits.max_stop_chars} characters", "stop")
    for s in stops:
        _text(s, "stop", "stop")
    ignore_eos = _flag(body, "ignore_eos")
    if ignore_eos and max_tokens is None:
        raise bad("ignore_eos | needs max_tokens (it generates exactly that many tokens)", "ignore_eos")
    return SamplingParams(max_tokens, temperature, top_p, seed, stops, _grammar(body.get("response_format")),
                          ignore_eos, _logprobs(body))


def _logprobs(body: dict) -> int | None:
    from mra.runtime.pipeline import MAX_TOP_LOGPROBS

    on = _flag(body, "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return 0 if on else None
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad(f"top_logprobs | got {_show(top)}, expected an integer from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
    if not on:
        raise bad("top_logprobs | needs logprobs: true", "top_logprobs")
    return top


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise bad(f"{name} | got {_show(v)}, expected a number in [{lo}, {hi}]", name)
    return float(v)


def _grammar(fmt: Any) -> Grammar | None:
    """response_format as a checked grammar: compiled here without a vocabulary, under the
    constraint limits, so a schema past a bound is a 400 before the request is queued."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return json_object_grammar()
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise bad("response_format.json_schema | expected {\"name\": ..., \"schema\": {...}}",
                          "response_format")
            return json_schema_grammar(schema)
    except MissingDependency as e:  # the server's installation, not the request
        raise ApiError(501, str(e), "server_error", "not_installed") from None
    except LimitExceeded as e:
        raise bad(str(e), "response_format", "limit_exceeded") from None
    except MraError as e:
        raise bad(str(e), "response_format") from None
    raise bad(f"response_format | got {_show(fmt)}, expected type text, json_object or json_schema", "response_format")
