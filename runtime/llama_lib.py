"""llama.cpp's process-wide set-up: the one import of llama_cpp, its log routed to Python
logging (and captured for error messages), the backend initialised once, and the CPU weight
buffer choice every model load in the process shares."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
from typing import Any

from mra.core.errors import MraError

from .llama_enums import constant

log = logging.getLogger("mra.runtime.llama")


def extra_buffers_default() -> bool:
    """llama.cpp's extra CPU weight buffers (AMX, repacked layouts) unless this build uses AMX:
    ``ggml_backend_amx_mul_mat`` segfaults on some Sapphire-Rapids-class CPUs (llama.cpp issue
    #20824; measured here: every Q8_0 / Q4_0 decode of the tiny model killed the process), and a
    crashed process is worse than the speed AMX gives. ``MRA_LLAMA_EXTRA_BUFFERS=1|0`` overrides."""
    env = os.environ.get("MRA_LLAMA_EXTRA_BUFFERS")
    if env in ("0", "1"):
        return env == "1"
    return b"AMX_INT8 = 1" not in llama_lib().llama_print_system_info()


_lib: Any = None
_recent_errors: collections.deque[str] = collections.deque(maxlen=4)  # ERROR and WARN lines, newest last
_listeners: list[list[str]] = []  # capture_llama_log() blocks in progress
_log_callback: Any = None  # kept referenced: llama.cpp calls it for the life of the process


def llama_lib():
    """Import llama_cpp once, route its log to Python logging, init the backend. This is the
    one owner of llama.cpp's process-wide log callback: code that wants the log lines uses
    :func:`capture_llama_log` instead of installing its own (which would deafen this one)."""
    global _lib, _log_callback
    if _lib is None:
        try:
            import llama_cpp
        except ImportError as e:
            raise MraError(f"llama-cpp-python | cannot import it ({e}); install it with "
                           "`pip install 'mra-edge[llm]'` (it compiles llama.cpp)") from None
        warn, error, cont = (constant(f"GGML_LOG_LEVEL_{n}") for n in ("WARN", "ERROR", "CONT"))
        last = [0]

        @llama_cpp.llama_log_callback
        def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            msg = text.decode("utf-8", "replace")
            level = last[0] if level == cont else level
            last[0] = level
            for lines in list(_listeners):
                lines.append(msg)
            msg = msg.strip()
            if msg and level in (warn, error):  # kept for the MraError message
                _recent_errors.append(msg)
            if msg:
                log.debug("%s", msg)

        _log_callback = _on_log
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _lib = llama_cpp
    return _lib


@contextlib.contextmanager
def capture_llama_log():
    """Collect llama.cpp's log lines (all levels) while the block runs, beside the runtime's own
    error capture."""
    llama_lib()
    lines: list[str] = []
    _listeners.append(lines)
    try:
        yield lines
    finally:
        _listeners.remove(lines)


def last_error() -> str:
    """llama.cpp's latest error or warning lines (a failed allocation is logged as a warning)."""
    if not _recent_errors:
        return "no message from llama.cpp"
    return " / ".join(list(_recent_errors)[-2:])
