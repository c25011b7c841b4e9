"""Bounded caches of recurrent-state snapshots: prompt prefixes and conversation sessions.

A recurrent model's whole history is one fixed-size state, so a cached prefix is one snapshot
(134 MB for the 7B in fp32) however long the prefix was. Snapshots live in device memory up to a
byte budget (least recently used first out) and spill to host memory up to a second budget; a
snapshot that falls out of both is gone, and the request simply prefills from an earlier point.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, Hashable, TypeVar


from ..model import ModelState
from ..state import cast_state, state_nbytes

K = TypeVar("K", bound=Hashable)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    spills: int = 0
    evictions: int = 0


@dataclass
class _Entry:
    state: ModelState
    nbytes: int
    meta: object = None


class StateCache(Generic[K]):
    """Two-tier LRU: `device_bytes` on the state's device, then `host_bytes` in CPU memory."""

    def __init__(self, device_bytes: int, host_bytes: int):
        self.device_bytes, self.host_bytes = device_bytes, host_bytes
        self._device: OrderedDict[K, _Entry] = OrderedDict()
        self._host: OrderedDict[K, _Entry] = OrderedDict()
        self._used = {"device": 0, "host": 0}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._device) + len(self._host)

    def __contains__(self, key: K) -> bool:
        return key in self._device or key in self._host

    @property
    def used_bytes(self) -> dict[str, int]:
        return dict(self._used)

    def put(self, key: K, state: ModelState, meta: object = None) -> None:
        """Stores a snapshot (the caller passes a copy it will not modify)."""
        nbytes = state_nbytes(state)
        self.pop(key)
        if nbytes > self.device_bytes and nbytes > self.host_bytes:
            return
        self.stats.puts += 1
        if nbytes <= self.device_bytes:
            self._device[key] = _Entry(state, nbytes, meta)
            self._used["device"] += nbytes
            self._shrink_device()
        else:
            self._put_host(key, _Entry(cast_state(state, device="cpu"), nbytes, meta))

    def get(self, key: K) -> tuple[ModelState, object] | None:
        """The snapshot and its metadata (marked recently used), or None."""
        for tier in (self._device, self._host):
            if key in tier:
                tier.move_to_end(key)
                self.stats.hits += 1
                return tier[key].state, tier[key].meta
        self.stats.misses += 1
        return None

    def peek_meta(self, key: K) -> object:
        entry = self._device.get(key) or self._host.get(key)
        return None if entry is None else entry.meta

    def pop(self, key: K) -> None:
        for name, tier in (("device", self._device), ("host", self._host)):
            entry = tier.pop(key, None)
            if entry is not None:
                self._used[name] -= entry.nbytes

    def clear(self) -> None:
        self._device.clear(), self._host.clear()
        self._used = {"device": 0, "host": 0}

    def _shrink_device(self) -> None:
        while self._used["device"] > self.device_bytes:
            key, entry = self._device.popitem(last=False)
            self._used["device"] -= entry.nbytes
            self.stats.spills += 1
            self._put_host(key, _Entry(cast_state(entry.state, device="cpu"), entry.nbytes, entry.meta))

    def _put_host(self, key: K, entry: _Entry) -> None:
        if entry.nbytes > self.host_bytes:
            self.stats.evictions += 1
            return
        self._host[key] = entry
        self._used["host"] += entry.nbytes
        while self._used["host"] > self.host_bytes:
            _, old = self._host.popitem(last=False)
            self._used["host"] -= old.nbytes
            self.stats.evictions += 1


def prefix_keys(tokens: list[int], block: int) -> list[bytes]:
    """Chained hashes of tokens[:block], tokens[:2*block], ...: key j names the prefix of (j+1)*block
    tokens, computed in one pass (each key hashes its block and the previous key)."""
    keys, prev = [], b""
    for end in range(block, len(tokens) + 1, block):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(array("q", tokens[end - block:end]).tobytes())  # int64, native order
        prev = h.digest()
        keys.append(prev)
    return keys


@dataclass
class Session:
    """A conversation's kept state: it has consumed `tokens` (prompt + output but the last token)."""

    tokens: list[int] = field(default_factory=list)
