"""Building, loading and calling the native kernels (see :mod:`funcopt.fast.native`)."""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from funcopt.fast._switch import ThreadSwitch

__all__ = ["MIN_ELEMENTS", "available", "unavailable_reason", "enabled", "is_enabled", "adam", "sgd", "add", "why_not"]

MIN_ELEMENTS = 1 << 16
"""Steps with fewer elements (over all tensors) keep the torch kernels: there the kernels'
memory traffic is not what costs, and a small script never waits for a compiler."""

_NONTEMPORAL_BYTES = 1 << 22  # outputs of at least 4 MiB are streamed past the cache
_PARALLEL_ELEMENTS = 1 << 16  # smaller calls run on one thread (waking threads costs more)
_SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-std=c11", "-shared", "-fPIC"]
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


class _AdamArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_double)
        for name in ("b2", "w1", "w2", "step_size", "bc2_sqrt", "eps", "weight_decay", "lr_wd")
    ] + [
        (name, ctypes.c_int64)
        for name in ("maximize", "l2", "decoupled", "amsgrad", "write_params", "nontemporal")
    ]


class _SgdArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_double) for name in ("lr", "momentum", "dampening", "weight_decay")] + [
        (name, ctypes.c_int64)
        for name in ("has_buf", "first", "nesterov", "maximize", "l2", "write_params", "nontemporal")
    ]


_SWITCH = ThreadSwitch()


def is_enabled() -> bool:
    """Whether the native kernels may be used in this thread (True unless switched off)."""
    return _SWITCH.enabled


def enabled(flag: bool) -> AbstractContextManager[None]:
    """Context manager switching the native kernels on or off in this thread.

    Example:
        >>> with funcopt.native.enabled(False):
        ...     updates, state = tx.update(grads, state)   # torch's kernels on copies
    """
    return _SWITCH.set(flag)


class _Library:
    """The compiled kernels of this process, built once on first use (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tried = False
        self.lib: Any = None
        self.reason: str | None = None

    def get(self) -> Any:
        if not self._tried:
            with self._lock:
                if not self._tried:
                    try:
                        lib, reason = _build()
                        if lib is not None:
                            reason = _self_test(lib)
                    except Exception as exc:  # any failure leaves the torch kernels in use
                        lib, reason = None, f"building the native kernels failed: {exc!r}"
                    self.lib, self.reason = (lib if reason is None else None), reason
                    self._tried = True
        return self.lib


_LIBRARY = _Library()


def available() -> bool:
    """Whether the native kernels can run in this process (builds them on the first call)."""
    return _LIBRARY.get() is not None


def unavailable_reason() -> str | None:
    """Why the native kernels are not in use (builds them first if needed); None if they are."""
    _LIBRARY.get()
    return _LIBRARY.reason


def _compiler() -> str | None:
    named = os.environ.get("CC")
    if named:
        return shutil.which(named) or (named if os.path.exists(named) else None)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _build() -> tuple[Any, str | None]:
    """Compiles and loads the kernels; returns (library, None) or (None, why not)."""
    if os.environ.get("FUNCOPT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "switched off by FUNCOPT_NATIVE=0"
    machine = os.uname().machine if hasattr(os, "uname") else "unknown"
    if not sys.platform.startswith("linux") or machine.lower() not in ("x86_64", "amd64"):
        return None, f"the native kernels are built for Linux on x86-64 only (this is {sys.platform} on {machine})"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set $CC or put cc/gcc/clang on PATH)"
    with tempfile.TemporaryDirectory(prefix="funcopt-native-") as tmp:
        target = os.path.join(tmp, "funcopt_native.so")
        proc = subprocess.run(
            [cc, *_FLAGS, str(_SOURCE), "-o", target], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            return None, f"{cc} could not build the native kernels: {detail[-1] if detail else proc.returncode}"
        lib = ctypes.CDLL(target)  # the mapping outlives the file, which the with-block deletes
    expected = ctypes.sizeof(_AdamArgs) * 100 + ctypes.sizeof(_SgdArgs)
    lib.funcopt_native_abi.restype = ctypes.c_int
    if lib.funcopt_native_abi() != expected:
        return None, "the native kernels' argument layout does not match funcopt.native"
    for dtype in _DTYPES.values():
        for name in ("adam", "sgd", "add"):
            fn = getattr(lib, f"funcopt_{name}_{dtype}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib, None


# ---------------------------------------------------------------------------------------------
# Entry points used by the backend (funcopt.fast.native)


def usable(tensors: list[torch.Tensor]) -> bool:
    """Whether a step over ``tensors`` (one column of plain, dense, contiguous float32/float64
    CPU tensors, already checked by the caller) should run the native kernels."""
    if not _SWITCH.enabled or not tensors or tensors[0].device.type != "cpu":
        return False
    if sum(map(torch.Tensor.numel, tensors)) < MIN_ELEMENTS:
        return False
    return _LIBRARY.get() is not None


def why_not(tensors: list[torch.Tensor]) -> str | None:
    """Why :func:`usable` refuses ``tensors``, or None where it accepts them."""
    if not _SWITCH.enabled:
        return "switched off in this thread (funcopt.fast.native.enabled(False))"
    if not tensors or tensors[0].device.type != "cpu":
        return "the tensors are not on the CPU"
    n = sum(map(torch.Tensor.numel, tensors))
    if n < MIN_ELEMENTS:
        return f"the step has {n} elements, below MIN_ELEMENTS = {MIN_ELEMENTS}"
    if _LIBRARY.get() is None:
        return f"not available here: {_LIBRARY.reason}"
    return None


def _call(fn_name: str, dtype: torch.dtype, columns: list[list[torch.Tensor] | None], args: Any) -> None:
    """Runs one kernel over aligned columns (None for an unused array); ``args`` is a
    ``ctypes.byref`` of the kernel's argument struct."""
    first = next(c for c in columns if c is not None)
    n = len(first)
    rows = zip(*[[0] * n if c is None else map(torch.Tensor.data_ptr, c) for c in columns])
    ptrs = [x for row in rows for x in row]  # tensor-major: every array of tensor 0, then of tensor 1...
    sizes = list(map(torch.Tensor.numel, first))
    threads = torch.get_num_threads() if sum(sizes) >= _PARALLEL_ELEMENTS else 1
    lib = _LIBRARY.lib or _LIBRARY.get()  # (the self-test sets .lib before get() returns)
    if lib is None:
        raise RuntimeError(f"funcopt.native: the kernels are not available here ({_LIBRARY.reason})")
    fn = getattr(lib, f"funcopt_{fn_name}_{_DTYPES[dtype]}")
    status = fn(n, (ctypes.c_void_p * len(ptrs))(*ptrs), (ctypes.c_int64 * n)(*sizes), args, threads)
    if status != 0:
        raise MemoryError(f"funcopt.native: the {fn_name} kernel could not allocate its work list")


def _fresh(like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]


def _streams(like: list[torch.Tensor], outputs: int) -> int:
    return int(sum(map(torch.Tensor.numel, like)) * like[0].element_size() * outputs >= _NONTEMPORAL_BYTES)


def adam(
    g: list[torch.Tensor],
    mu: list[torch.Tensor],
    nu: list[torch.Tensor],
    nu_max: list[torch.Tensor] | None,
    p: list[torch.Tensor] | None,
    *,
    lr: float,
    b1: float,
    b2: float,
    eps: float,
    step: int,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    write_params: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
    """One Adam/AdamW step (``step`` is 1-based) into fresh tensors, one dtype.

    Returns ``(out, mu', nu', nu_max')``: ``out`` is the update or, with ``write_params``, the
    new params; ``nu_max'`` is None without AMSGrad. ``p`` is needed for weight decay and
    ``write_params``. Nothing passed in is written.
    """
    bc1 = 1 - b1**step
    args = _AdamArgs(
        b2=b2, w1=1 - b1, w2=1 - b2, step_size=lr / bc1, bc2_sqrt=math.sqrt(1 - b2**step), eps=eps,
        weight_decay=weight_decay, lr_wd=lr * weight_decay if decoupled else 0.0,
        maximize=int(maximize), l2=int(bool(weight_decay) and not decoupled),
        decoupled=int(bool(weight_decay) and decoupled), amsgrad=int(nu_max is not None),
        write_params=int(write_params), nontemporal=_streams(g, 4 if nu_max is not None else 3),
    )
    out, mu_out, nu_out = _fresh(g), _fresh(g), _fresh(g)
    max_out = _fresh(g) if nu_max is not None else None
    _call("adam", g[0].dtype, [g, mu, nu, nu_max, p, out, mu_out, nu_out, max_out], ctypes.byref(args))
    return out, mu_out, nu_out, max_out


def sgd(
    g: list[torch.Tensor],
    buf: list[torch.Tensor] | None,
    p: list[torch.Tensor] | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    first: bool,
    has_buf: bool,
    write_params: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """One SGD step into fresh tensors, one dtype; returns ``(out, buf')``.

    ``has_buf``: the optimizer keeps a momentum buffer (``buf`` may be None on the first step,
    when ``buf' = d``). ``out`` is the update or, with ``write_params``, the new params.
    """
    args = _SgdArgs(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        has_buf=int(has_buf), first=int(first), nesterov=int(nesterov), maximize=int(maximize),
        l2=int(bool(weight_decay)), write_params=int(write_params),
        nontemporal=_streams(g, 2 if has_buf else 1),
    )
    out = _fresh(g)
    buf_out = _fresh(g) if has_buf else None
    _call("sgd", g[0].dtype, [g, None if first else buf, p, out, buf_out], ctypes.byref(args))
    return out, buf_out


def add(x: list[torch.Tensor], y: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fresh ``x + y`` leaf-wise (one dtype, equal shapes), as ``torch._foreach_add``."""
    out = _fresh(x)
    _call("add", x[0].dtype, [x, y, out], ctypes.byref(ctypes.c_int64(_streams(x, 1))))
    return out


# ---------------------------------------------------------------------------------------------
# Self-test after loading


def _self_test(lib: Any) -> str | None:
    """Compares every kernel with torch's on random data; returns a reason on any mismatch."""
    previous = _LIBRARY.lib
    _LIBRARY.lib = lib  # _call reads it; get() holds the lock, so no other thread runs a kernel
    try:
        gen = torch.Generator().manual_seed(0)
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
            sizes = [37, 1 << 15, (1 << 15) + 77]  # tails, a whole chunk, several chunks
            rand = lambda scale=1.0: [torch.randn(n, generator=gen, dtype=dtype) * scale for n in sizes]
            p, g, m = rand(), rand(0.1), rand(0.01)
            v, vmax = [x.abs() for x in rand(0.01)], [x.abs() for x in rand(0.02)]
            for amsgrad, wd, decoupled in ((False, 0.0, False), (True, 0.1, False), (False, 0.1, True)):
                out, mo, vo, xo = adam(
                    g, m, v, vmax if amsgrad else None, p, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, step=3,
                    weight_decay=wd, decoupled=decoupled, maximize=amsgrad, write_params=True,
                )
                ref = [[t.clone() for t in c] for c in (p, m, v, vmax)]
                kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
                kernel(ref[0], g, ref[1], ref[2], ref[3] if amsgrad else [], [torch.tensor(3.0)] * len(p), lr=1e-2, beta1=0.9,
                       beta2=0.999, weight_decay=wd, eps=1e-8, amsgrad=amsgrad, maximize=amsgrad)
                pairs = list(zip(out + mo + vo, ref[0] + ref[1] + ref[2]))
                if amsgrad:
                    pairs += list(zip(xo, ref[3]))
                if not all(torch.allclose(a, b, rtol=tol, atol=tol * 1e-3) for a, b in pairs):
                    return f"self-test: the native Adam kernel disagrees with torch ({dtype})"
            out, bo = sgd(g, m, p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01,
                          maximize=True, first=False, has_buf=True, write_params=True)
            ref_p, ref_b = [t.clone() for t in p], [t.clone() for t in m]
            torch._fused_sgd_(ref_p, g, ref_b, weight_decay=0.01, momentum=0.9, lr=0.1, dampening=0.1,
                              nesterov=False, maximize=True, is_first_step=False)
            if not all(torch.allclose(a, b, rtol=tol, atol=tol * 1e-3) for a, b in zip(out + bo, ref_p + ref_b)):
                return f"self-test: the native SGD kernel disagrees with torch ({dtype})"
            if not all(torch.equal(a, b) for a, b in zip(add(p, g), torch._foreach_add(p, g))):
                return f"self-test: the native add kernel disagrees with torch ({dtype})"
        return None
    finally:
        _LIBRARY.lib = previous
