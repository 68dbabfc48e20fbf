"""CRC-32 of large buffers on several threads (used by :mod:`funcopt.checkpoint`).

The checksum is zlib's CRC-32. It is computed by ISA-L (the ``isal`` package, a dependency on
the platforms it ships wheels for), whose folding kernel runs at about 20 GB/s per core where
``zlib.crc32`` runs at about 4; both give the same value, so files written with either read with
either, and without ``isal`` funcopt falls back to ``zlib.crc32``. Both release the GIL, so a
buffer split into chunks is checksummed by a small thread pool; the chunks' CRCs are joined with
:func:`crc32_combine` (zlib's ``crc32_combine``, which Python does not expose: CRC-32 is linear
over GF(2), so the CRC of ``a + b`` is the CRC of ``a`` advanced over ``len(b)`` zero bytes, XOR
the CRC of ``b``). Advancing uses a table of the 32x32 GF(2) operators for 2**k zero bytes, built
once. The result equals ``zlib.crc32`` of the whole.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

try:
    from isal.isal_zlib import crc32 as crc32_kernel
except ImportError:  # a platform without isal wheels: the same CRC, 4-5x slower
    from zlib import crc32 as crc32_kernel

__all__ = ["crc32", "crc32_async", "crc32_combine", "crc32_kernel", "crc32_many"]

CHUNK = 16 << 20
"""Bytes per task of :func:`crc32_async` (checksums computed while a file is written)."""
SHARED_CHUNK = 8 << 20
"""Bytes per task of :func:`crc32`, whose caller works with the pool: small tasks keep both
busy to the end (measured loading a 300 MB file from the page cache: 8 MiB beat 1, 2 and 4)."""
ASYNC_MIN = 1 << 20
""":func:`crc32_async` checksums buffers of at least this size on the pool."""

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


def _workers() -> int:
    return min(8, os.cpu_count() or 1)


def _pool() -> ThreadPoolExecutor | None:
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():  # a forked child cannot use its parent's threads
        workers = _workers()
        _POOL = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="funcopt-crc") if workers > 1 else None)
    return _POOL[1]


def crc32_async(view: memoryview) -> Callable[[], int]:
    """Starts the CRC-32 of ``view`` (a byte memoryview) on the pool; the returned call waits for it.

    Buffers under :data:`ASYNC_MIN` bytes are checksummed at once on the calling thread."""
    n = len(view)
    pool = _pool() if n >= ASYNC_MIN else None
    if pool is None:
        value = crc32_kernel(view)
        return lambda: value
    starts = list(range(0, n, CHUNK))
    futures: list[Any] = [pool.submit(crc32_kernel, view[s:s + CHUNK]) for s in starts]

    def result() -> int:
        return _join([fut.result() for fut in futures], starts, CHUNK, n)

    return result


def _join(parts: list[int], starts: list[int], chunk: int, n: int) -> int:
    value = parts[0]
    for s, part in zip(starts[1:], parts[1:]):
        value = crc32_combine(value, part, min(chunk, n - s))
    return value


def crc32(view: memoryview) -> int:
    """``zlib.crc32(view)``, computed on several threads (the caller's included) for large buffers."""
    return crc32_many([view])[0]


def crc32_many(views: list[memoryview]) -> list[int]:
    """``[zlib.crc32(v) for v in views]``, computed on several threads (the caller's included).

    All buffers are cut into :data:`SHARED_CHUNK`-byte chunks in one shared queue that the pool's
    threads and the caller drain together: no thread idles while another still has chunks (page
    faults of a memory-mapped file make chunk times uneven), not even between two buffers."""
    total = sum(len(v) for v in views)
    pool = _pool() if total >= 2 * SHARED_CHUNK else None
    if pool is None:
        return [crc32_kernel(v) for v in views]
    tasks = [(i, s) for i, v in enumerate(views) for s in range(0, max(len(v), 1), SHARED_CHUNK)]
    parts = [0] * len(tasks)
    queue = iter(range(len(tasks)))
    lock = threading.Lock()
    finished = threading.Condition(lock)
    taken, done, failures = [0], [0], []
    stopped = [False]

    def drain() -> None:
        while True:
            with lock:
                t = None if failures or stopped[0] else next(queue, None)
                if t is None:
                    return
                taken[0] += 1
            i, s = tasks[t]
            try:
                parts[t] = crc32_kernel(views[i][s:s + SHARED_CHUNK])
            except Exception as e:  # handed to the caller; no thread takes another chunk
                with lock:
                    failures.append(e)
            except BaseException:  # the caller's KeyboardInterrupt: stop everyone, raise at once
                stopped[0] = True
                raise
            finally:
                with finished:
                    done[0] += 1
                    finished.notify_all()

    for _ in range(min(_workers() - 1, len(tasks) - 1)):
        pool.submit(drain)
    drain()
    with finished:
        # Waits for the chunks taken, not for the helpers: one still queued behind other work (a
        # save's checksums) finds the queue empty when it starts and touches nothing.
        finished.wait_for(lambda: done[0] == taken[0])
    if failures:
        raise failures[0]
    out, t = [], 0
    for v in views:
        count = max(len(v) - 1, 0) // SHARED_CHUNK + 1
        out.append(_join(parts[t:t + count], [s for _, s in tasks[t:t + count]], SHARED_CHUNK, len(v)))
        t += count
    return out
