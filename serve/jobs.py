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
import hashlib
import io
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .protocol import ApiError

MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_IMAGES = 8  # per conversation: each is decoded, encoded and fills its rows of the context


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from besides ``data:`` URLs."""
    allow_files: Path | None = None  # local paths (or file:// URLs) inside this folder
    allow_urls: bool = False  # http(s) URLs, fetched with a size cap and a timeout
    max_image_bytes: int = 20 << 20
    url_timeout_s: float = 10.0


@dataclass(frozen=True)
class ImageInput:
    """The conversation's image: its encoded bytes (PNG, JPEG, ...) and their sha256."""
    data: bytes
    key: str

    def open(self):
        """The decoded PIL image (RGB conversion is the preprocessing's business); decoded once,
        when the request is checked, and kept for the backend in this process."""
        im = self.__dict__.get("_decoded")
        if im is None:
            from PIL import Image

            im = Image.open(io.BytesIO(self.data))
            im.load()
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
    grammar: str | None = None  # GBNF (response_format json_object / json_schema, converted)
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


def parse_chat_request(body: Any, policy: ImagePolicy = ImagePolicy()) -> ChatJob:
    """Check an OpenAI ``/v1/chat/completions`` body and turn it into a job (blocking: it may
    decode an image or fetch a URL; call it off the event loop)."""
    if not isinstance(body, dict):
        raise bad(f"body | got {type(body).__name__}, expected a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages | expected a non-empty list of {role, content}", "messages")
    if body.get("n", 1) != 1:
        raise bad(f"n | got {body.get('n')!r}, only n=1 is supported", "n")
    if body.get("tools") or body.get("functions"):
        raise bad("tools | function calling is not supported; use response_format json_schema", "tools")

    messages: list[Message] = []
    images: list[ImageInput] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} | expected an object with role and content", "messages")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad(f"{where}.role | got {role!r}, expected system, user or assistant", "messages")
        text, found = _content(m.get("content"), where, role, policy)
        if found is not None:
            if len(images) == MAX_IMAGES:
                raise bad(f"{where} | image {MAX_IMAGES + 1}; a conversation takes at most {MAX_IMAGES}: start a new "
                          "conversation", "messages", "too_many_images")
            images.append(found)
        messages.append(Message(role, text, found is not None))
    _check_order(messages)
    return ChatJob(tuple(messages), tuple(images), _sampling(body), str(body.get("model") or ""),
                   _flag(body, "stream"), bool((body.get("stream_options") or {}).get("include_usage")))


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if not isinstance(v, bool) and v is not None:
        raise bad(f"{name} | got {v!r}, expected true or false", name)
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


def _content(content: Any, where: str, role: str, policy: ImagePolicy) -> tuple[str, ImageInput | None]:
    if isinstance(content, str):
        return content, None
    if content is None and role == "assistant":
        return "", None
    if not isinstance(content, list):
        raise bad(f"{where}.content | expected a string or a list of parts", "messages")
    texts: list[str] = []
    image = None
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
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
        else:
            raise bad(f"{where}.content[{j}] | got type {kind!r}, expected text or image_url", "messages")
    return "\n".join(texts), image


def load_image_url(url: str, policy: ImagePolicy) -> ImageInput:
    """The bytes behind an image URL, checked to decode as an image."""
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
    image = ImageInput(data, hashlib.sha256(data).hexdigest())
    try:
        image.open()
    except Exception as e:  # PIL raises several types for undecodable data
        raise bad(f"image_url | not a decodable image ({type(e).__name__}: {e})", "messages", "bad_image") from None
    return image


def _too_big(n: int, policy: ImagePolicy) -> ApiError:
    return ApiError(413, f"image_url | about {n} bytes, the limit is {policy.max_image_bytes}; send a smaller image",
                    param="messages", code="image_too_large")


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=policy.url_timeout_s) as r:  # noqa: S310 (http(s) checked above)
            data = r.read(policy.max_image_bytes + 1)
    except Exception as e:
        raise bad(f"image_url | cannot fetch {url}: {type(e).__name__}: {e}", "messages", "bad_image") from None
    if len(data) > policy.max_image_bytes:
        raise _too_big(len(data), policy)
    return data


def _read_file(url: str, policy: ImagePolicy) -> bytes:
    if policy.allow_files is None:
        raise bad("image_url | local files are refused; send a data:image/...;base64 URL, or start mra-serve with "
                  "--allow-files DIR", "messages", "file_not_allowed")
    root = policy.allow_files.resolve()
    path = Path(url.removeprefix("file://")).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise bad(f"image_url | {url} is outside the allowed folder {root}", "messages", "file_not_allowed")
    if not path.is_file():
        raise bad(f"image_url | {url}: no such file under {root}", "messages", "bad_image")
    if path.stat().st_size > policy.max_image_bytes:
        raise _too_big(path.stat().st_size, policy)
    return path.read_bytes()


def _sampling(body: dict) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise bad(f"max_tokens | got {max_tokens!r}, expected an integer >= 1", "max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p | got 0, expected 0 < top_p <= 1", "top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad(f"seed | got {seed!r}, expected an integer", "seed")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise bad(f"stop | got {stop!r}, expected a non-empty string or a list of at most {MAX_STOP}", "stop")
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
        raise bad(f"top_logprobs | got {top!r}, expected an integer from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
    if not on:
        raise bad("top_logprobs | needs logprobs: true", "top_logprobs")
    return top


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise bad(f"{name} | got {v!r}, expected a number in [{lo}, {hi}]", name)
    return float(v)


def _grammar(fmt: Any) -> str | None:
    from mra.core.errors import MraError
    from mra.runtime.grammar import json_object_grammar, schema_to_gbnf

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
            return schema_to_gbnf(json.dumps(schema))
    except MraError as e:
        raise bad(str(e), "response_format") from None
    raise bad(f"response_format | got {fmt!r}, expected type text, json_object or json_schema", "response_format")
