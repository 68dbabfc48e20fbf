"""Fast routes for optimizer steps, and the training step that uses them.

An optimizer step is memory-bound, and the reference path (a chain of per-leaf blocks) makes
one fresh tensor per operation per leaf. So an optimizer may *declare* a fast route next to
its reference math (:func:`declare`, :class:`FastRoute`): a multi-tensor kernel over flat leaf
lists (torch's ``_fused_*``/``_foreach_*`` ops), its hyperparameters and its state buffers.
The dispatcher here is generic: it reads the state layout from the optimizer's own ``init``,
checks the step, and runs

- a registered backend's kernel for pure steps where one applies (:mod:`funcopt.fast.native`:
  single-pass C kernels for large float32/float64 CPU steps of Adam, AdamW and SGD);
- otherwise the declaration's kernel, on fresh copies where it writes in place, so ``update``
  stays pure;
- in place on the caller's buffers in a *donated* training step (:func:`apply_gradients`,
  :func:`make_step`).

The fast route returns the same state types as the reference chain and the same numbers to
float rounding, so a run may switch routes at any step. It runs only where it is valid: not
under ``torch.compile`` or ``torch.func`` transforms; every tensor a plain dense contiguous
float32/float64 ``torch.Tensor`` on one CPU or CUDA device, none requiring grad; every
hyperparameter a Python number or an unbatched 0-dim tensor not requiring grad; no ``mask``;
the state laid out as the optimizer's ``init`` builds it. :func:`explain` says which route a
step takes and why a faster one was not; :func:`fast_path_enabled` switches them off.
"""

from funcopt.fast._backends import Backend, backends, register_backend
from funcopt.fast._control import (
    auto_cpu_allocator,
    configure_cpu_allocator,
    fast_path_enabled,
    is_fast_path_enabled,
)
from funcopt.fast._explain import Route, explain, fast_path_applies
from funcopt.fast._plan import KernelCall
from funcopt.fast._route import FastRoute, declare, fast_path_of
from funcopt.fast._step import DonatedValueError, apply_gradients, grad_and_value, is_donated, make_step

# Optional backends: each registers itself on import. Removing a backend's folder and its line
# here leaves every route working on the declarations' own (torch) kernels.
from funcopt.fast import native as native  # noqa: E402

__all__ = [
    "FastRoute",
    "KernelCall",
    "declare",
    "fast_path_of",
    "Backend",
    "register_backend",
    "backends",
    "Route",
    "explain",
    "fast_path_applies",
    "fast_path_enabled",
    "is_fast_path_enabled",
    "configure_cpu_allocator",
    "auto_cpu_allocator",
    "DonatedValueError",
    "apply_gradients",
    "is_donated",
    "make_step",
    "grad_and_value",
]
