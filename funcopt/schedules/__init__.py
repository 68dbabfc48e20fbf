"""Schedules: pure functions ``count -> value`` for learning rates and other hyperparameters.

Like ``optax`` schedules. ``count`` is the 0-based number of updates done so far, a 0-dim int64
tensor (Python ints are accepted too); the value is a float64 tensor on the count's device
(float32 on MPS). Every schedule is written with tensor arithmetic and ``torch.where`` only
(no Python branch on a tensor value), so it runs under ``torch.func.vmap`` (a batch of counts)
and ``torch.compile``. Hyperparameters given as Python numbers are validated when the schedule
is built; they may also be 0-dim tensors.

Pass a schedule as ``learning_rate`` to any optimizer: the k-th ``update`` uses
``schedule(k - 1)``, which is the learning rate ``torch.optim.lr_scheduler`` gives the k-th
``optimizer.step()`` when ``scheduler.step()`` is called after every ``optimizer.step()``.

========================== ==========================================================
funcopt                    torch.optim.lr_scheduler equivalent (base lr ``b``)
========================== ==========================================================
constant(b)                (no scheduler)
linear(b*s, b*e, n)        LinearLR(start_factor=s, end_factor=e, total_iters=n)
polynomial(b, 0, p, n)     PolynomialLR(total_iters=n, power=p)
exponential_decay(b, 1, g) ExponentialLR(gamma=g)
exponential_decay(b, n, g, staircase=True)  StepLR(step_size=n, gamma=g)
piecewise_constant(b, {m: g for m in ms})   MultiStepLR(milestones=ms, gamma=g)
cosine_decay(b, n, e/b)    CosineAnnealingLR(T_max=n, eta_min=e) (up to step n)
sgdr(b, n, m, e)           CosineAnnealingWarmRestarts(T_0=n, T_mult=m, eta_min=e)
one_cycle(n, b, ...)       OneCycleLR(max_lr=b, total_steps=n, ...) (lr)
one_cycle_momentum(n, ...) OneCycleLR(..., cycle_momentum=True) (momentum / beta1)
join([s1, s2], [m])        SequentialLR([sch1, sch2], milestones=[m])
========================== ==========================================================

The package is split by concept: decays, step functions, :func:`join` and warmups (``_basic``);
warm restarts and the 1cycle policy (``_cyclic``); validation helpers (``_common``).
"""

from funcopt.schedules._basic import (
    constant,
    cosine_decay,
    exponential_decay,
    join,
    linear,
    piecewise_constant,
    polynomial,
    warmup_cosine_decay,
    warmup_exponential_decay,
)
from funcopt.schedules._common import Value as Value
from funcopt.schedules._cyclic import cosine_restarts, one_cycle, one_cycle_momentum, sgdr

__all__ = [
    "constant",
    "linear",
    "polynomial",
    "exponential_decay",
    "cosine_decay",
    "warmup_cosine_decay",
    "warmup_exponential_decay",
    "piecewise_constant",
    "join",
    "sgdr",
    "cosine_restarts",
    "one_cycle",
    "one_cycle_momentum",
]
