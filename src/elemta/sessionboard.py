"""Open SMTP sessions per worker process, on one shared memory page, so that max_connections
caps the whole daemon exactly however unevenly the kernel spreads connections over workers;
and the sessions in DATA per worker, so that the governor reserves DATA buffers for all of them
(each worker's own count let every worker fill the same headroom: OOM-killed with 2 workers).

Created by the supervisor before it forks (an anonymous MAP_SHARED mapping is inherited);
each worker writes only its own slot, anyone may read the sum. Aligned 8-byte stores are
single instructions here, so a reader never sees a torn value.
"""

from __future__ import annotations

import mmap
import struct

_SLOT = struct.Struct("q")


class SessionBoard:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, _SLOT.size * slots * 2)  # sessions, then sessions in DATA
        self._all = struct.Struct(f"{slots}q")

    def set(self, slot: int, sessions: int) -> None:
        _SLOT.pack_into(self._map, slot * _SLOT.size, sessions)

    def total(self) -> int:
        return sum(self._all.unpack_from(self._map))

    def ahead(self, slot: int, pending: int = 0) -> bool:
        """Does worker `slot` (with `pending` connections accepted but not yet counted) have
        more than two sessions more than the least busy other worker? Workers are numbered
        from 1 (the supervisor's slot 0 holds no sessions)."""
        counts = self._all.unpack_from(self._map)
        others = [n for i, n in enumerate(counts) if i not in (0, slot)]
        return bool(others) and counts[slot] + pending > min(others) + 2

    def set_in_data(self, slot: int, sessions: int) -> None:
        _SLOT.pack_into(self._map, (self.slots + slot) * _SLOT.size, sessions)

    def in_data(self) -> int:
        return sum(self._all.unpack_from(self._map, self.slots * _SLOT.size))
