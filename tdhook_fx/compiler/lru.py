"""A bounded mapping that forgets its least recently used entries: the compiler's caches.

Every cache the compiler keeps per model, per capture or per compiled module (captures, site
tables, shape facts per input signature, variants of a compiled module) is one of these, so a
long-running process that sees many input shapes or model states holds a bounded amount.
The sizes are module constants next to each cache (documented in the README).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from tdhook_fx.errors import InvalidArgument


class LRU:
    """At most `size` entries; `get` and `put` mark an entry as the most recently used.

    Safe to share between threads (one lock around each operation).
    """

    def __init__(self, size: int):
        if size < 1:
            raise InvalidArgument(f"an LRU cache holds at least one entry, not {size}")
        self.size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            try:
                self._entries.move_to_end(key)
            except KeyError:
                return default
            return self._entries[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def pop(self, key, default=None):
        with self._lock:
            return self._entries.pop(key, default)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def values(self) -> list:
        with self._lock:
            return list(self._entries.values())

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
