"""Per-thread on/off switches with a context manager (the fast routes' and the native backend's)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__: list[str] = []


class ThreadSwitch(threading.local):
    """On unless switched off; ``with switch.set(False): ...`` switches it in this thread only,
    and restores the previous value on exit, errors included (like ``torch.no_grad``)."""

    enabled = True

    @contextlib.contextmanager
    def set(self, flag: bool) -> Iterator[None]:
        previous = self.enabled
        self.enabled = bool(flag)
        try:
            yield
        finally:
            self.enabled = previous


FAST_SWITCH = ThreadSwitch()
"""The switch of every fast route (:func:`funcopt.fast.fast_path_enabled`)."""
