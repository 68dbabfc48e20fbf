"""Single-pass C kernels for the *pure* CPU steps of Adam, AdamW and SGD, built at first use.

torch's fused optimizer kernels (``torch._fused_adam_`` and friends) only update buffers in
place, so a pure step built on them must first copy everything it may not overwrite: a pure
Adam ``update`` + ``apply_updates`` then moves 76 bytes per float32 element where torch's
in-place step moves 28. The kernels here read the old tensors and write the results into
fresh ones in a single pass, with non-temporal stores for large outputs (no read-for-ownership
of the fresh memory):

===============================================  ==========================  =================
step                                             torch kernels on copies     these kernels
===============================================  ==========================  =================
Adam ``update`` (reads g, m, v; writes u, m, v)  60 B/element                24 B/element
``apply_updates`` (reads p, u; writes p)         16                          12
Adam pure step (``apply_gradients``)             64                          28 (torch's own)
SGD-momentum ``update``                          44                          16
===============================================  ==========================  =================

This backend registers itself with :mod:`funcopt.fast` for the pure CPU steps of ``adam``,
``adamw`` and ``sgd`` (and with :func:`funcopt.apply_updates` for float tensors) when the step has
at least :data:`MIN_ELEMENTS` elements; everything else (CUDA, donated steps, other
optimizers, small trees, ``torch.func`` transforms, ``torch.compile``) is unchanged. The
arithmetic follows torch's fused CPU kernels with the hyperparameters cast to the element type
first, so the numbers equal the in-place fast path's to float rounding (tests check both, and
the native Adam step against ``torch.optim.Adam(fused=True)``).

**Building.** The C source (``funcopt/fast/native/kernels.c``, about 300 lines) is compiled the
first time a large enough step runs, with the C compiler named by ``$CC`` or found on
``PATH`` (``cc``, ``gcc``, ``clang``), as ``-O3 -march=native -fopenmp``, into a temporary
directory that is deleted right after loading: nothing is left on disk, and nothing is reused
across processes (a library built for one CPU never runs on another). It takes about 1.3 s,
once per process. The library runs its threads in the OpenMP runtime torch already loaded
(``torch.get_num_threads()`` threads). After loading, a self-test compares every kernel with
torch's on random data; any failure (no compiler, no OpenMP, no AVX2, not Linux on x86-64, a
self-test mismatch) leaves the torch kernels in use, and :func:`unavailable_reason` says why.

**Switching off.** Set ``FUNCOPT_NATIVE=0`` in the environment (read at the first use), or
use ``with funcopt.fast.native.enabled(False): ...`` (this thread only).
"""

from __future__ import annotations

from typing import Any

import torch

from funcopt.base import register_tree_adder
from funcopt.fast._backends import Backend, register_backend
from funcopt.fast._plan import Plan
from funcopt.fast.native import _library
from funcopt.fast.native._library import (
    MIN_ELEMENTS,
    adam,
    add,
    available,
    enabled,
    is_enabled,
    sgd,
    unavailable_reason,
    usable,
    why_not,
)

__all__ = ["MIN_ELEMENTS", "available", "unavailable_reason", "enabled", "is_enabled", "BACKEND"]

_DTYPES = (torch.float32, torch.float64)


def _adam_kernel(call: Any) -> list[torch.Tensor]:
    """The ``"adam"`` family (adam, adamw) for pure steps, one dtype group."""
    h, bufs = call.h, call.bufs
    out, bufs["mu"], bufs["nu"], bufs["nu_max"] = adam(
        call.g, bufs["mu"], bufs["nu"], bufs["nu_max"], call.p, lr=call.lr, b1=h["b1"], b2=h["b2"], eps=h["eps"],
        step=int(call.step), weight_decay=h["weight_decay"], decoupled=h["decoupled_weight_decay"], maximize=h["maximize"],
        write_params=call.write_params,
    )
    return out


def _sgd_kernel(call: Any) -> list[torch.Tensor]:
    """The ``"sgd"`` family for pure steps, one dtype group."""
    h, bufs = call.h, call.bufs
    has_buf = bufs["momentum_buffer"] is not None
    first = has_buf and call.first
    out, bufs["momentum_buffer"] = sgd(
        call.g, bufs["momentum_buffer"], call.p, lr=call.lr, momentum=h["momentum"] if has_buf else 0.0,
        dampening=h["dampening"], nesterov=h["nesterov"], weight_decay=h["weight_decay"], maximize=h["maximize"],
        first=first, has_buf=has_buf, write_params=call.write_params,
    )
    return out


def _reason(plan: Plan) -> str | None:
    return why_not(plan.g)


BACKEND = Backend("native", {"adam": _adam_kernel, "sgd": _sgd_kernel}, _reason)
"""The backend registered with :mod:`funcopt.fast` when this package is imported."""


def _tree_add(p: list[torch.Tensor], u: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """``apply_updates``'s adder for large float32/float64 CPU trees of one dtype (bitwise the
    same sums as ``torch._foreach_add``), None elsewhere. Only from 32x ``MIN_ELEMENTS`` (2M
    elements): below that torch's add is as fast or faster (measured, 2 threads: 46 vs 33 us at
    70K elements, equal at 1.1M), the one-pass streaming add pays off on trees past the cache."""
    if (
        p[0].dtype in _DTYPES
        and usable(p)  # first: it rejects small trees cheaply
        and sum(map(torch.Tensor.numel, p)) >= _library.MIN_ELEMENTS << 5
        and len(set(t.dtype for t in p)) == 1
        and set(map(torch.Tensor.get_device, p)) == {-1}
        and all(map(torch.Tensor.is_contiguous, p))
        and all(map(torch.Tensor.is_contiguous, u))
    ):
        return add(p, u)
    return None


register_backend(BACKEND)
register_tree_adder(_tree_add)
