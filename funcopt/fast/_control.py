"""Switching the fast routes off, and the CPU allocator setting that large pure steps want."""

from __future__ import annotations

import os
import warnings
from contextlib import AbstractContextManager

import torch

from funcopt.fast._switch import FAST_SWITCH

__all__ = ["fast_path_enabled", "is_fast_path_enabled", "configure_cpu_allocator", "auto_cpu_allocator"]


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
    time in page faults (see ``docs/performance.md``). Raising both thresholds keeps those
    blocks in the heap so the next step reuses them. The price: freed memory stays with the
    process (its resident size does not shrink). Process-wide; the first large pure step calls
    it by itself unless told not to (:func:`auto_cpu_allocator`).

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


class _AutoAllocator:
    """The one-time allocator tunings of the first pure CPU steps (:func:`auto_cpu_allocator`).

    Two tiers: a step with a tensor of 128 KB or more (glibc's initial mmap threshold) sets the
    thresholds glibc reaches by itself after freeing a 32 MB block (mmap 32 MB, trim 64 MB),
    silently; a step with a tensor of 32 MB or more applies :func:`configure_cpu_allocator`'s
    1 GB thresholds, with a one-line warning. Neither runs where the user set glibc's
    ``MALLOC_*_THRESHOLD_`` variables.
    """

    medium = 128 << 10  # bytes: glibc's default mmap threshold
    threshold = 32 << 20  # bytes: glibc's largest automatic mmap threshold; larger blocks are mmapped

    def __init__(self) -> None:
        user_set = any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
        self.pending = not user_set and os.environ.get("FUNCOPT_CPU_ALLOCATOR", "auto").lower() not in (
            "0", "off", "false", "no"
        )
        self.applied: str | None = None  # None, "medium" or "large"

    def consider(self, tensors: list[torch.Tensor]) -> None:
        """Tunes the allocator, once per tier, when a pure step makes fresh CPU tensors this large."""
        if not self.pending:
            return
        largest = max(map(torch.Tensor.numel, tensors)) * tensors[0].element_size()
        if largest < self.medium:
            return
        if largest < self.threshold:
            if self.applied is None and configure_cpu_allocator(self.threshold, 2 * self.threshold):
                self.applied = "medium"
            return
        self.pending = False
        if configure_cpu_allocator():
            self.applied = "large"
            warnings.warn(
                "funcopt: large pure CPU steps: glibc now keeps freed blocks of up to 1 GB for reuse "
                "(funcopt.fast.configure_cpu_allocator), about 5x faster steps, freed memory stays with "
                "the process; FUNCOPT_CPU_ALLOCATOR=off or funcopt.fast.auto_cpu_allocator(False) "
                "before the first step switches this off.",
                stacklevel=4,
            )


AUTO_ALLOCATOR = _AutoAllocator()


def auto_cpu_allocator(enabled: bool) -> None:
    """Whether funcopt may tune glibc's allocator by itself (default: yes).

    A pure step (``tx.update``, ``apply_gradients(donate=False)``) makes fresh tensors as large
    as the params. glibc serves blocks above 32 MB with fresh ``mmap`` pages and returns them
    to the OS when freed, so every step pays page faults on all of them (5.5x torch's fused
    in-place step on one 16M-element fp32 tensor). At the first pure CPU step with a tensor of
    32 MB or more, funcopt calls :func:`configure_cpu_allocator` once, with a one-line warning;
    the price is that freed memory stays with the process (at most the pure step's fresh
    params and state, about 3x the params for Adam). Smaller blocks fault too: glibc starts by
    mmapping blocks above 128 KB and trims the top of its heap above twice that, so at the
    first pure CPU step with a tensor of 128 KB or more funcopt sets, silently, the thresholds
    glibc itself would reach after freeing a 32 MB block (mmap 32 MB, trim 64 MB: at most 64 MB
    of freed memory kept; pure Adam update on a 1.1M-element tree measured 2.9 -> 0.7 ms).
    Neither tuning runs where ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` is set. ``auto_cpu_allocator(False)`` (or the
    environment variable ``FUNCOPT_CPU_ALLOCATOR=off``) before that step keeps the system
    allocator's behaviour; the donated step (:func:`funcopt.fast.apply_gradients` with
    ``donate=True``) needs none of this.
    """
    AUTO_ALLOCATOR.pending = bool(enabled)
