"""Kernel backends: alternative implementations of a declared optimizer's pure step.

Every declared optimizer runs its own kernel (torch's ``_fused_*``/``_foreach_*`` ops) by
default. A backend offers other kernels for some kernel families (``"adam"``, ``"sgd"``...)
for *pure* steps (``update`` and the pure training step), and says per step whether it
applies; the dispatcher tries the registered backends in order and falls back to the
declaration's kernel. ``funcopt.fast.native`` registers itself when imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

if TYPE_CHECKING:
    from funcopt.fast._plan import Plan

__all__ = ["Backend", "register_backend", "backends"]


class Backend(NamedTuple):
    """A kernel backend.

    Attributes:
        name: shown by :func:`funcopt.fast.explain`.
        kernels: kernel family -> kernel for pure steps; a kernel takes a
            :class:`funcopt.fast.KernelCall` whose ``write_params`` says whether it returns
            the new params (the pure training step) or the updates, and writes nothing it is
            given (the new state buffers go into ``call.bufs``).
        reason: ``reason(plan)`` is None where the backend takes this step, else a short
            sentence saying why not (shown by :func:`funcopt.fast.explain`).
    """

    name: str
    kernels: dict[str, Callable[[Any], list[Any]]]
    reason: Callable[[Plan], str | None]


_BACKENDS: list[Backend] = []


def register_backend(backend: Backend) -> None:
    """Adds ``backend`` (tried before the declarations' own kernels, in registration order);
    a backend of the same name is replaced."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend expects a funcopt.fast.Backend, got {type(backend).__name__}")
    _BACKENDS[:] = [b for b in _BACKENDS if b.name != backend.name] + [backend]


def backends() -> tuple[Backend, ...]:
    """The registered backends, in the order they are tried."""
    return tuple(_BACKENDS)
