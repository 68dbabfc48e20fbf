"""CRC-32 of large buffers on several threads (used by :mod:`funcopt.checkpoint`).

``zlib.crc32`` releases the GIL, so a buffer split into chunks is checksummed by a small thread
pool; the chunks' CRCs are joined with :func:`crc32_combine` (zlib's ``crc32_combine``, which
Python does not expose: CRC-32 is linear over GF(2), so the CRC of ``a + b`` is the CRC of ``a``
advanced over ``len(b)`` zero bytes, XOR the CRC of ``b``). Advancing uses a table of the 32x32
GF(2) operators for 2**k zero bytes, built once. The result equals ``zlib.crc32`` of the whole.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

__all__ = ["crc32", "crc32_async", "crc32_combine"]

CHUNK = 16 << 20
"""Bytes per task; :func:`crc32` checksums buffers under two chunks on the calling thread."""
ASYNC_MIN = 1 << 20
""":func:`crc32_async` without ``caller_helps`` checksums buffers of at least this size on the pool."""

_POLY = 0xEDB88320
_OPS: list[list[int]] = []
_POOL: tuple[int, ThreadPoolExecutor | None] | None = None


def _times(op: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= op[i]
        vec >>= 1
        i += 1
    return out


def _square(op: list[int]) -> list[int]:
    return [_times(op, column) for column in op]


def _operators() -> list[list[int]]:
    if not _OPS:
        op = [_POLY] + [1 << n for n in range(31)]  # one zero bit
        for _ in range(3):
            op = _square(op)  # 2, 4, 8 zero bits: one zero byte
        table = [op]
        for _ in range(63):
            table.append(_square(table[-1]))
        _OPS.extend(table)
    return _OPS


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc1 = crc32(a)``, ``crc2 = crc32(b)`` and ``len2 = len(b)``."""
    ops = _operators()
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _times(ops[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


def _pool() -> ThreadPoolExecutor | None:
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():  # a forked child cannot use its parent's threads
        workers = min(8, os.cpu_count() or 1)
        _POOL = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="funcopt-crc") if workers > 1 else None)
    return _POOL[1]


def crc32_async(view: memoryview, *, caller_helps: bool = False) -> Callable[[], int]:
    """Starts the CRC-32 of ``view`` (a byte memoryview) on the pool; the returned call waits for it.

    With ``caller_helps`` the thread that waits computes the last chunk itself instead of idling.
    """
    n = len(view)
    pool = _pool() if n >= (2 * CHUNK if caller_helps else ASYNC_MIN) else None
    if pool is None:
        value = zlib.crc32(view)
        return lambda: value
    starts = list(range(0, n, CHUNK))
    queued = starts[:-1] if caller_helps else starts
    futures: list[Any] = [pool.submit(zlib.crc32, view[s:s + CHUNK]) for s in queued]

    def result() -> int:
        parts = [fut.result() for fut in futures]
        if caller_helps:
            parts.append(zlib.crc32(view[starts[-1]:]))
        value = parts[0]
        for s, part in zip(starts[1:], parts[1:]):
            value = crc32_combine(value, part, min(CHUNK, n - s))
        return value

    return result


def crc32(view: memoryview) -> int:
    """``zlib.crc32(view)``, computed on several threads (the caller's included) for large buffers."""
    return crc32_async(view, caller_helps=True)()
