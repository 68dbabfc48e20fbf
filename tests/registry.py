# A new optimizer = one declaration in funcopt/optimizers + one row here.
"""The one table of optimizer configurations that every optimizer test battery runs over.

Each row names a funcopt factory and its arguments (funcopt names) and, where torch.optim has
the algorithm, the torch.optim class and its arguments (torch names), which the parity tests
compare against. What a battery selects on is read from the optimizers themselves, not flagged
here: a row takes the fast route where its factory declares one (``factory.fast_route``) and
sets none of the route's unsupported arguments (``mask``); it takes the native kernels where a
registered backend named "native" has a kernel for the route's family.

    registry.make("adam")                       # a fresh GradientTransformation
    registry.torch_optimizer("adam", params)    # torch.optim.Adam(params, lr=1e-2)
    registry.names()                            # every row (sorted names)
    registry.names(fast=True)                   # a selection: the rows that take a fast route
    registry.names(native=True, torch=True)     # properties combine (and)

Batteries parametrize over such selections; tests/test_optimizers.py checks that every
optimizer, fast route and native kernel family has a row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

import funcopt
from funcopt import schedules, tree


def _matrices(params):
    """A mask (a function of the params): decay only the leaves with two or more dimensions."""
    return tree.map(lambda p: p.ndim > 1, params)


def _inverse_time(count):
    """A plain-callable learning-rate schedule (count -> value)."""
    return 1e-2 / (1 + count)


def clipped_adam(learning_rate=1e-2, max_norm=1.0, max_delta=0.5):
    """Adam after global-norm and elementwise clipping: a chain of blocks with no fast route."""
    return funcopt.chain(funcopt.clip_by_global_norm(max_norm), funcopt.clip(max_delta), funcopt.adam(learning_rate))


# Optimizers whose update is piecewise constant in the gradients (sign): their unrolled
# gradients are zero almost everywhere, so finite differences check nothing.
_PIECEWISE_CONSTANT = (funcopt.lion,)


@dataclass(frozen=True)
class Row:
    """One optimizer configuration: ``factory(**kwargs)``, and ``torch_class(params, **torch_kwargs)``."""

    name: str
    factory: Callable[..., funcopt.GradientTransformation]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    torch_class: type | None = None
    torch_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def make(self) -> funcopt.GradientTransformation:
        return self.factory(**self.kwargs)

    @property
    def torch(self) -> bool:
        """torch.optim has this configuration (parity tests)."""
        return self.torch_class is not None

    @property
    def fast(self) -> bool:
        """The factory declares a fast route and this configuration sets nothing it cannot take."""
        route = getattr(self.factory, "fast_route", None)
        return route is not None and all(self.kwargs.get(a) is None for a in route.unsupported)

    @property
    def family(self) -> str | None:
        """The kernel family of the fast route (None without one)."""
        return (self.factory.fast_route.family or self.factory.__name__) if self.fast else None

    @property
    def native(self) -> bool:
        """The native backend (funcopt.fast.native, when installed) has a kernel for this row."""
        return self.family is not None and any(
            b.name == "native" and self.family in b.kernels for b in funcopt.fast.backends()
        )

    @property
    def plain(self) -> bool:
        """The factory is one of funcopt.optimizers' (so ``inject_hyperparams`` can wrap it)."""
        return any(self.factory is f for f in optimizer_factories())

    @property
    def maximize(self) -> bool:
        """The optimizer ascends its objective: give it ``objective(name, loss_fn)``."""
        return bool(self.kwargs.get("maximize", False))

    @property
    def differentiable(self) -> bool:
        """Unrolled steps have informative gradients (not a sign-based update)."""
        return not any(self.factory is f for f in _PIECEWISE_CONSTANT)


def _rows(*rows: Row) -> dict[str, Row]:
    table = {}
    for r in rows:
        assert r.name not in table, f"duplicate registry row {r.name!r}"
        table[r.name] = r
    return table


SGD, Adam, AdamW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW

ROWS: dict[str, Row] = _rows(
    # --- SGD
    Row("sgd", funcopt.sgd, dict(learning_rate=0.1), SGD, dict(lr=0.1)),
    Row(
        "sgd_l2_maximize",
        funcopt.sgd, dict(learning_rate=0.1, weight_decay=0.1, maximize=True),
        SGD, dict(lr=0.1, weight_decay=0.1, maximize=True),
    ),
    Row("sgd_momentum", funcopt.sgd, dict(learning_rate=0.1, momentum=0.9), SGD, dict(lr=0.1, momentum=0.9)),
    Row(
        "sgd_momentum_dampening_l2",
        funcopt.sgd, dict(learning_rate=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
        SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    ),
    Row(
        "sgd_nesterov_l2_maximize",
        funcopt.sgd, dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
        SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
    ),
    Row(
        "sgd_momentum_schedule",
        funcopt.sgd, dict(learning_rate=schedules.warmup_cosine_decay(0.0, 0.1, 3, 100), momentum=0.9),
    ),
    # --- Adam, AdamW (weight_decay: L2 in adam, decoupled in adamw)
    Row("adam", funcopt.adam, dict(learning_rate=1e-2), Adam, dict(lr=1e-2)),
    Row(
        "adam_l2_maximize",
        funcopt.adam, dict(learning_rate=1e-2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1, maximize=True),
        Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, maximize=True),
    ),
    Row(
        "adam_amsgrad_l2_maximize",
        funcopt.adam, dict(learning_rate=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
        Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
    ),
    Row(
        "adam_decoupled_amsgrad",
        funcopt.adam, dict(learning_rate=1e-2, weight_decay=0.1, amsgrad=True, decoupled_weight_decay=True),
        Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, decoupled_weight_decay=True),
    ),
    Row("adam_schedule", funcopt.adam, dict(learning_rate=_inverse_time)),
    Row("adam_tensor_lr", funcopt.adam, dict(learning_rate=torch.tensor(1e-2, dtype=torch.float64))),
    Row("adamw", funcopt.adamw, dict(learning_rate=1e-2), AdamW, dict(lr=1e-2)),
    Row(
        "adamw_amsgrad_maximize",
        funcopt.adamw, dict(learning_rate=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
        AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
    ),
    Row("adamw_mask", funcopt.adamw, dict(learning_rate=1e-2, weight_decay=0.1, mask=_matrices)),
    # --- Adamax, NAdam, RAdam (weight_decay: L2, or decoupled_weight_decay=True)
    Row("adamax", funcopt.adamax, dict(learning_rate=2e-2), torch.optim.Adamax, dict(lr=2e-2)),
    Row(
        "adamax_l2",
        funcopt.adamax, dict(learning_rate=2e-2, weight_decay=0.05),
        torch.optim.Adamax, dict(lr=2e-2, weight_decay=0.05),
    ),
    Row("nadam", funcopt.nadam, dict(learning_rate=1e-2), torch.optim.NAdam, dict(lr=1e-2)),
    Row(
        "nadam_l2",
        funcopt.nadam, dict(learning_rate=1e-2, weight_decay=0.05),
        torch.optim.NAdam, dict(lr=1e-2, weight_decay=0.05),
    ),
    Row(
        "nadam_decoupled",
        funcopt.nadam, dict(learning_rate=1e-2, weight_decay=0.05, decoupled_weight_decay=True),
        torch.optim.NAdam, dict(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True),
    ),
    Row("radam", funcopt.radam, dict(learning_rate=1e-2), torch.optim.RAdam, dict(lr=1e-2)),
    Row(
        "radam_l2",
        funcopt.radam, dict(learning_rate=1e-2, weight_decay=0.05),
        torch.optim.RAdam, dict(lr=1e-2, weight_decay=0.05),
    ),
    Row(
        "radam_decoupled",
        funcopt.radam, dict(learning_rate=1e-2, weight_decay=0.05, decoupled_weight_decay=True),
        torch.optim.RAdam, dict(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True),
    ),
    # --- RMSprop, Adagrad
    Row("rmsprop", funcopt.rmsprop, dict(learning_rate=1e-3), torch.optim.RMSprop, dict(lr=1e-3)),
    Row(
        "rmsprop_centered_momentum_l2_maximize",
        funcopt.rmsprop, dict(learning_rate=1e-2, centered=True, momentum=0.5, weight_decay=0.05, maximize=True),
        torch.optim.RMSprop, dict(lr=1e-2, centered=True, momentum=0.5, weight_decay=0.05, maximize=True),
    ),
    Row("adagrad", funcopt.adagrad, dict(learning_rate=0.05), torch.optim.Adagrad, dict(lr=0.05)),
    Row(
        "adagrad_lr_decay_l2_maximize",
        funcopt.adagrad,
        dict(learning_rate=0.05, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.1, maximize=True),
        torch.optim.Adagrad,
        dict(lr=0.05, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.1, maximize=True),
    ),
    # --- Lion (decoupled decay, optionally masked), LAMB: not in torch.optim (see test_parity's
    # element-by-element references)
    Row("lion", funcopt.lion, dict(learning_rate=3e-3)),
    Row("lion_no_decay", funcopt.lion, dict(learning_rate=3e-3, weight_decay=0.0)),
    Row("lion_mask", funcopt.lion, dict(learning_rate=3e-3, weight_decay=0.1, mask=_matrices)),
    Row("lamb", funcopt.lamb, dict(learning_rate=1e-2, weight_decay=1e-2)),
    # --- Compositions: a chain with no fast route; inject_hyperparams around a fast one
    Row("chain_clip_adam", clipped_adam, dict(learning_rate=1e-2)),
    Row("inject_adam", funcopt.inject_hyperparams(funcopt.adam), dict(learning_rate=1e-2)),
)


# Optimizers the dense batteries cannot run (their inputs differ in kind), each with the test
# file that covers them against their torch.optim oracle instead.
OWN_BATTERY: dict[Callable[..., funcopt.GradientTransformation], str] = {
    funcopt.sparse_adam: "tests/test_sparse_adam.py (sparse COO gradients)",
}


def optimizer_factories() -> list[Callable[..., funcopt.GradientTransformation]]:
    """The optimizer factories funcopt.optimizers exports."""
    return [f for f in (getattr(funcopt.optimizers, n) for n in funcopt.optimizers.__all__) if callable(f)]


def row(name: str) -> Row:
    return ROWS[name]


def make(name: str) -> funcopt.GradientTransformation:
    """A fresh ``GradientTransformation`` for the row ``name``."""
    return ROWS[name].make()


def torch_optimizer(name: str, params, **overrides) -> torch.optim.Optimizer:
    """The torch.optim optimizer of the row ``name`` over ``params`` (``overrides``: e.g. ``fused=True``)."""
    r = ROWS[name]
    if r.torch_class is None:
        raise KeyError(f"registry row {name!r} has no torch.optim counterpart")
    return r.torch_class(params, **{**r.torch_kwargs, **overrides})


def objective(name: str, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """What to give the row's optimizer so that it lowers ``loss_fn``: ``-loss_fn`` where it maximizes."""
    if not ROWS[name].maximize:
        return loss_fn
    return lambda *args, **kwargs: -loss_fn(*args, **kwargs)


def names(**where: bool) -> list[str]:
    """The sorted row names whose properties equal ``where``, e.g. ``names(fast=True, torch=True)``."""
    for key in where:
        if not isinstance(getattr(Row, key, None), property):
            raise TypeError(f"registry.names: no row property {key!r}")
    return sorted(n for n, r in ROWS.items() if all(getattr(r, k) == v for k, v in where.items()))
