"""The one base error of the project, and the one policy by which every CLI reports errors.

``MraError`` is torch-free so that the runtime, the exporter and the torch model
(``CheckpointError``, ``ConfigError`` subclass it) share it: a caller catches one type.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Callable


class MraError(Exception):
    """A problem the user can fix; the message says what, where and how.

    ``MraError(what, reason)`` and ``MraError("what | reason")`` read the same and keep both
    parts as data, so a caller that reports the reason under another heading (a skipped file, a
    changed folder) takes ``e.reason`` instead of cutting the text; a message without the
    project's " | " has no parts (both None).
    """

    def __init__(self, what: str, reason: str | None = None):
        if reason is None and isinstance(what, str) and " | " in what:
            what, reason = what.split(" | ", 1)
        self.what, self.reason = (what, reason) if reason is not None else (None, None)
        super().__init__(what if reason is None else f"{what} | {reason}")

    def __reduce__(self):  # pickled across processes (Ray, subprocess pools) with its parts
        return type(self), (self.what, self.reason) if self.reason is not None else self.args


# The kinds callers act on (an HTTP status, a retry, an install hint). Code branches on these
# types, never on a message's text; the text stays for people.

class ContextOverflow(MraError):
    """The prompt (text and image rows) does not fit the LLM's context."""


class LimitExceeded(MraError):
    """An input passes a stated bound (size, pixels, depth, length, schema size): refused before the work."""


class BadImage(MraError):
    """An image that cannot be read, is not an allowed format, or does not decode."""


class BadBundle(MraError):
    """A bundle, manifest or artifact that is missing, inconsistent or corrupt."""


class MissingDependency(MraError):
    """An optional package this feature needs is not installed; the message names the extra."""


class Closed(MraError):
    """The object (a Pipeline, a stream) was closed or superseded; open a new one."""


def run_cli(prog: str, body: Callable[[list[str]], int], argv: list[str], verbose: bool) -> int:
    """Run a CLI's ``body`` under the one error policy of every CLI (mra-run, mra-chat, mra-serve,
    mra-export):
    user errors (``MraError``) are one line and exit 1; Ctrl-C exits 130; a closed stdout
    pipe exits quietly; running out of memory says so; anything else is a bug: one line
    that says so, and the traceback with ``-v``."""
    try:
        return body(argv)
    except MraError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `mra-run ... | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError as e:
        detail = f" ({e})" if str(e) else ""
        print(f"{prog}: error: out of memory{detail}; use a smaller model, image size or batch, or close other "
              "programs", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: say so in one line; -v shows where
        if verbose:
            traceback.print_exc()
        print(f"{prog}: internal error: {type(e).__name__}: {e or 'no message'}"
              + ("" if verbose else " (rerun with -v for the traceback)"), file=sys.stderr)
        return 1


def cli_main(prog: str, body: Callable[[list[str]], int], argv: list[str] | None,
             default_level: int = logging.WARNING) -> int:
    """A CLI's entry point: plain-message logging (``-v`` debug) and :func:`run_cli`."""
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    cli_logging(verbose, default=default_level)
    return run_cli(prog, body, argv, verbose)


def cli_logging(verbose: bool, quiet: bool = False, default: int = logging.WARNING) -> None:
    """Plain-message logging for the CLIs: -v debug, -q warnings only."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else default
    logging.basicConfig(level=level, format="%(message)s")
