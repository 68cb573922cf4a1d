"""Stop strings over streamed text (pure): the text up to the first stop string, never past it.

Text arrives in arbitrary deltas, and a stop string may be split across them, so the matcher
holds back the last `len(longest stop) - 1` characters until they can no longer start a stop
string. The output is the same whatever the chunking: the concatenation of everything `feed`
and `flush` return is the text up to where the first stop string to be completed begins (as if
the text were fed one character at a time and stopped at once).
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
        # lies in `text`. The one that ends first wins (generation would have stopped there),
        # then the longer of those ending together, so the cut does not depend on the chunking.
        hits = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return text[:min(hits)[1]]
        cut = max(0, len(text) - self._hold_len)
        self._pending = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        """The held-back tail, once the text has ended without a stop string."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out
