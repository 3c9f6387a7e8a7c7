"""Keys and values of recent generations, reused when a new prompt starts with the same tokens.

An RLM conversation only grows: root turn k's prompt is turn k-1's prompt, its answer
and the REPL feedback. Without reuse every turn re-ran the whole conversation through
the model (a 2,000-token history costs about 10 s of prefill on this 2-core machine);
with it, a turn prefills only the new messages. Tasks also share their system prompt,
so the first turn of a task reuses another task's keys for it.

An entry that the new prompt fully extends (the same conversation continuing) is moved
to the new generation. When only a part is shared (another task, same system prompt),
that part is copied, so the entry stays usable by its own conversation. Reused keys
were computed one token at a time during decoding rather than in a prefill chunk, so
logits can differ from a cold prefill in the last float32 bits (like any change of chunk
size); greedy output is the same in practice.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from kowalski_node.llm.builtin.model import LayerRangeCache

DEFAULT_MAX_ENTRIES = 8
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MIN_TOKENS = 32  # below this, copying costs more than it saves


@dataclass
class _Entry:
    ids: tuple[int, ...]  # the tokens whose keys/values `cache` holds, in order
    cache: LayerRangeCache


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """A small LRU of KV caches keyed by their token sequences; safe to use from any thread."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        min_tokens: int = DEFAULT_MIN_TOKENS,
    ) -> None:
        if max_entries < 0 or max_bytes < 0 or min_tokens < 1:
            raise ValueError("max_entries and max_bytes must be >= 0, min_tokens >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._entries: list[_Entry] = []  # most recently used last
        self._lock = threading.Lock()
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.cache.nbytes for e in self._entries)

    def take(self, ids: Sequence[int], spare: int) -> tuple[LayerRangeCache, int] | None:
        """A cache already holding the longest reusable prefix of `ids`, and that length.

        At least one prompt token is always left to prefill (its logits start decoding).
        `spare` is the room to reserve after the prompt when a shared prefix is copied.
        """
        limit = len(ids) - 1
        with self._lock:
            best: _Entry | None = None
            best_len = 0
            for entry in self._entries:
                n = min(common_prefix(entry.ids, ids), limit, entry.cache.length)
                if n > best_len:
                    best, best_len = entry, n
            if best is None or best_len < self.min_tokens:
                return None
            if best_len == len(best.ids):
                self._entries.remove(best)  # the same conversation goes on: hand it over
                cache = best.cache
                cache.truncate(best_len)
            else:
                self._entries.remove(best)
                self._entries.append(best)  # still useful to its own conversation
                cache = best.cache.copy_prefix(best_len, len(ids) - best_len + spare)
            self.hits += 1
            self.reused_tokens += best_len
            return cache, best_len

    def put(self, ids: Sequence[int], cache: LayerRangeCache) -> None:
        """Remember a finished generation's cache (`ids` may be longer than what it holds)."""
        length = cache.length
        if length < self.min_tokens or self.max_entries == 0:
            return
        key = tuple(ids[:length])
        size = cache.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            # An entry that is a prefix of the new one is now redundant.
            self._entries = [e for e in self._entries if common_prefix(e.ids, key) < len(e.ids)]
            self._entries.append(_Entry(key, cache))
            total = sum(e.cache.nbytes for e in self._entries)
            while self._entries and (
                len(self._entries) > self.max_entries or total > self.max_bytes
            ):
                total -= self._entries.pop(0).cache.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
