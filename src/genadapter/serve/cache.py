"""A byte-bounded LRU of deserialised context states, keyed by context id and version."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..state import ContextState


class StateCache:
    """Holds the newest known version of each context; an entry of an older version is a miss.

    The bound counts the states' sums; each state also keeps its normalised adapter once it has answered (see the
    package docstring)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[int, ContextState]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, context_id: str, version: int) -> ContextState | None:
        with self._lock:
            item = self._items.get(context_id)
            if item is None or item[0] != version:
                self.misses += 1
                return None
            self._items.move_to_end(context_id)
            self.hits += 1
            return item[1]

    def put(self, context_id: str, version: int, state: ContextState) -> None:
        with self._lock:
            old = self._items.get(context_id)
            if old is not None and old[0] > version:
                return  # a newer version is already here
            self._drop(context_id)
            if state.nbytes > self.max_bytes:
                return
            self._items[context_id] = (version, state)
            self._bytes += state.nbytes
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def discard(self, context_id: str) -> None:
        with self._lock:
            self._drop(context_id)

    def _drop(self, context_id: str) -> None:
        item = self._items.pop(context_id, None)
        if item is not None:
            self._bytes -= item[1].nbytes

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._items), "bytes": self._bytes, "hits": self.hits, "misses": self.misses}
