"""Each open document's recent edits, the input of a next-edit suggestion.

Keystrokes are coalesced into bursts: a burst ends after a pause in typing or when the user
starts typing elsewhere (more than NEAR_LINES away), and its edits are the line hunks between the
text before it and after it (engine/next_edit.line_hunks). The document's text as the last event
left it is kept, so the burst in progress is always the diff to the text as it is now, in the
current lines; older bursts keep the lines of the text right after them.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from dgemma.engine.next_edit import RecentEdit, recent_edits_between

PAUSE_S = 1.5  # typing stopped this long ends a burst
NEAR_LINES = 3  # an edit further than this from the burst's lines starts a new one
MAX_AGE_S = 600.0  # bursts older than this are not recent
KEEP = 8  # edits handed to the model, the newest


@dataclass
class _Document:
    base: str  # the text before the burst in progress
    text: str  # the text after the last change
    changed_at: float = 0.0
    bursts: deque[tuple[float, list[RecentEdit]]] = field(default_factory=lambda: deque(maxlen=KEEP))


class EditHistory:
    def __init__(self) -> None:
        self._docs: dict[str, _Document] = {}

    def opened(self, uri: str, text: str) -> None:
        self._docs[uri] = _Document(base=text, text=text)

    def changed(self, uri: str, text: str, now: float | None = None) -> None:
        """The document is ``text`` now (after a didChange)."""
        now = time.monotonic() if now is None else now
        doc = self._docs.get(uri)
        if doc is None:  # changed before it was opened (a client that skips didOpen): start from here
            self.opened(uri, text)
            return
        if doc.text == text:
            return
        open_edits = recent_edits_between(doc.base, doc.text)
        if open_edits and (now - doc.changed_at > PAUSE_S or not _near(open_edits, doc.text, text)):
            doc.bursts.append((doc.changed_at, open_edits))
            doc.base = doc.text
        doc.text, doc.changed_at = text, now

    def recent(self, uri: str, now: float | None = None) -> list[RecentEdit]:
        """The newest edits of ``uri``, oldest first; the last one is in the text as it is now."""
        now = time.monotonic() if now is None else now
        doc = self._docs.get(uri)
        if doc is None:
            return []
        edits = [e for at, burst in doc.bursts if now - at <= MAX_AGE_S for e in burst]
        edits += recent_edits_between(doc.base, doc.text)
        return edits[-KEEP:]

    def forget(self, uri: str) -> None:
        self._docs.pop(uri, None)


def _near(burst: list[RecentEdit], old: str, new: str) -> bool:
    """The change from ``old`` to ``new`` touches the lines the burst ``burst`` changed (or next to them)."""
    lines = [(e.line, e.line + max(1, e.new.count("\n"))) for e in burst]
    for change in recent_edits_between(old, new):
        if not any(start - NEAR_LINES <= change.line <= end + NEAR_LINES for start, end in lines):
            return False
    return True
