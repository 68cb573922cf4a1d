"""Stop strings over streamed text (pure): the text up to the first stop string, never past it.

Text arrives in arbitrary deltas, and a stop string may be split across them, so the matcher
holds back the last `len(longest stop) - 1` characters until they can no longer start a stop
string. The output is the same whatever the chunking: the concatenation of everything `feed`
and `flush` return equals the whole text truncated before the earliest stop string.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...] = ()):
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(stops)
        self._hold_len = max((len(s) for s in stops), default=1) - 1
        self._pending = ""  # text received and not yet returned
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Adds a delta; returns the text now safe to send. After a stop string is found,
        `stopped` is True and the text from it on is dropped (so is every later delta)."""
        if self.stopped:
            return ""
        text = self._pending + delta
        # Every stop string that ends in the returned text was looked for already: any match
        # starts in `text`, and the earliest one wins.
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return text[:min(hits)]
        cut = max(0, len(text) - self._hold_len)
        self._pending = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        """The held-back tail, once the text has ended without a stop string."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out
