"""Token bytes -> streamed text: whole UTF-8 characters only, stop strings cut cleanly, and
the same result joined as the reference's ``decode(ids).strip()``.

A token may end in the middle of a multi-byte character (byte-fallback pieces), and a stop
string may arrive split over several tokens, so text that could still turn into either is
held back until it cannot. Leading whitespace is dropped and trailing whitespace is only
released when more text follows, so the streamed pieces join to the stripped answer.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field


@dataclass
class TextStream:
    stops: tuple[str, ...] = ()
    stopped: bool = False
    _decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    _held: str = ""  # decoded but not yet released
    _started: bool = False  # some non-space text was released

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; returns the text that is now safe to release."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: release what is left (minus trailing whitespace)."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._held
        cut = min((i for i in (text.find(s) for s in self.stops if s) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            text, final = text[:cut], True
        if not self._started:
            text = text.lstrip()
        if final:
            self._held = ""
            return self._mark(text.rstrip())
        # Hold a tail that may begin a stop string, and the whitespace before it.
        safe = text[:len(text) - self._stop_prefix_len(text)]
        safe = safe.rstrip()
        out, self._held = safe, text[len(safe):]
        return self._mark(out)

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _mark(self, out: str) -> str:
        if out:
            self._started = True
        return out
