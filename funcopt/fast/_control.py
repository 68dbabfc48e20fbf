"""Switching the fast routes off, and the CPU allocator setting that large pure steps want."""

from __future__ import annotations

from contextlib import AbstractContextManager

from funcopt.fast._switch import FAST_SWITCH

__all__ = ["fast_path_enabled", "is_fast_path_enabled", "configure_cpu_allocator"]


def is_fast_path_enabled() -> bool:
    """Whether the fast routes may be used in this thread (True unless switched off)."""
    return FAST_SWITCH.enabled


def fast_path_enabled(enabled: bool) -> AbstractContextManager[None]:
    """Context manager switching the fast routes on or off in this thread, like ``torch.no_grad``.

    Example:
        >>> with funcopt.fast.fast_path_enabled(False):
        ...     updates, state = tx.update(grads, state, params)  # the per-leaf reference path
    """
    return FAST_SWITCH.set(enabled)


def configure_cpu_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30) -> bool:
    """Makes glibc keep large freed CPU blocks for reuse instead of returning them to the OS.

    Like setting ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` before starting Python.
    By default glibc serves every block above 32 MB with a fresh ``mmap``, whose pages fault
    on first touch: a pure optimizer step on one 16M-element tensor then spends most of its
    time in page faults (see the README section "Performance: the fast path and donation").
    Raising both thresholds keeps those blocks in the heap so the next step reuses them. The price: freed memory stays with the
    process (its resident size does not shrink). Process-wide and opt-in; funcopt never calls
    it by itself.

    Args:
        mmap_threshold: blocks at least this large (bytes) still come from ``mmap``.
        trim_threshold: free memory at the top of the heap above this size is returned.

    Returns:
        True if both settings were applied (Linux with glibc), False elsewhere.
    """
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        if name is None:
            return False
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, int(mmap_threshold)) == 1
        return bool(ok and libc.mallopt(m_trim_threshold, int(trim_threshold)) == 1)
    except (OSError, AttributeError):
        return False
