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

import inspect

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

import funcopt
from funcopt import schedules, tree
from tests import optax_oracles
from tests.muon_reference import MuonOnMatrices, other_leaves_frozen


def _matrices(params):
    """A mask (a function of the params): decay only the leaves with two or more dimensions."""
    return tree.map(lambda p: p.ndim > 1, params)


def _inverse_time(count):
    """A plain-callable learning-rate schedule (count -> value)."""
    return 1e-2 / (1 + count)


def _inverse_time64(count):
    """``_inverse_time`` computed in float64 from a torch or a JAX count (for the optax rows: an
    int tensor divided by a Python float is float32 in torch)."""
    c = count.to(torch.float64) if isinstance(count, torch.Tensor) else count.astype("float64")
    return 1e-2 / (1 + c)


def clipped_adam(learning_rate=1e-2, max_norm=1.0, max_delta=0.5):
    """Adam after global-norm and elementwise clipping: a chain of blocks with no fast route."""
    return funcopt.chain(funcopt.clip_by_global_norm(max_norm), funcopt.clip(max_delta), funcopt.adam(learning_rate))


def _contrib(name, factory, kwargs, **row):
    """A row of an optax.contrib optimizer: the same arguments on both sides (funcopt follows optax's names)."""
    return Row(name, factory, kwargs, optax_name=f"contrib.{factory.__name__}", optax_kwargs=kwargs, **row)


def lookahead_adam(learning_rate=1e-2, sync_period=5, slow_step_size=0.5, reset_state=False):
    """Lookahead around Adam, the slow weights in the state."""
    return funcopt.lookahead(funcopt.adam(learning_rate), sync_period, slow_step_size, reset_state=reset_state)


def squared_grads():
    """A deterministic Hessian-diagonal stand-in for Sophia: ``g * g`` of the incoming gradients
    (tests/optax_oracles.py gives optax the same)."""

    def update(updates, state, params=None, **extra_args):
        return tree.map(lambda g: g * g, updates), state

    return funcopt.GradientTransformation(lambda params: funcopt.EmptyState(), update)


def ema_params_adam(learning_rate=1e-2, decay=0.9):
    """Adam with an EMA of its params in the state."""
    return funcopt.ema_params(funcopt.adam(learning_rate), decay)


def noisy_chain_sgd(learning_rate=0.05, eta=0.01):
    """Annealed gradient noise (seeded from the state), then SGD."""
    return funcopt.chain(funcopt.add_noise(eta, 0.55, key=1), funcopt.sgd(learning_rate))


def skip_not_finite_adam(learning_rate=1e-2):
    """Adam that skips steps with NaN/Inf gradients (optax.MultiSteps(k=1, skip_not_finite))."""
    return funcopt.skip_updates_if(funcopt.adam(learning_rate), funcopt.skip_not_finite)


# Optimizers whose update is piecewise constant in the gradients (sign): their unrolled
# gradients are zero almost everywhere, so finite differences check nothing.
_PIECEWISE_CONSTANT = (funcopt.lion,)
# Muon's Newton-Schulz runs in bfloat16 (as torch's): its output is a function of the bfloat16
# cast of the momentum, piecewise constant in the gradients too.
_PIECEWISE_CONSTANT += (funcopt.muon, funcopt.muon_with_adamw)
# Rprop moves each element by -sign(g) * step_size; its step sizes change by sign tests only.
_PIECEWISE_CONSTANT += (funcopt.rprop,)
# signSGD and signum step by the sign of the gradient (of its EMA).
_PIECEWISE_CONSTANT += (funcopt.sign_sgd, funcopt.signum)


@dataclass(frozen=True)
class Row:
    """One optimizer configuration: ``factory(**kwargs)``, and ``torch_class(params, **torch_kwargs)``."""

    name: str
    factory: Callable[..., funcopt.GradientTransformation]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    torch_class: type | None = None
    torch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # A function tx -> tx that routes the leaves the factory does not take to another optimizer
    # (muon: the non-2-D leaves of the batteries' params, frozen; see tests/muon_reference.py).
    route: Callable[[funcopt.GradientTransformation], funcopt.GradientTransformation] | None = None
    # Where optax has the algorithm: its name under optax ("adabelief", "contrib.prodigy") and
    # its arguments (optax names); tests/test_optax_parity.py runs both for 50 float64 steps.
    optax_name: str | None = None
    optax_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # Extra keyword arguments both updates take each step, computed from the objective:
    # "value" (the loss at the current params, for polyak_sgd and momo).
    update_extras: tuple[str, ...] = ()
    # Relative tolerance of the optax trajectory comparison, where the math cannot match to
    # 1e-9 (say why next to the row).
    optax_rtol: float = 1e-9
    # Where optax's counterpart takes optax objects (lookahead, sam): a function of
    # ``optax_kwargs`` returning the optax transformation (tests/optax_oracles.py), used instead
    # of ``optax.<optax_name>(**optax_kwargs)``; ``optax_name`` still names the oracle.
    optax_factory: Callable[..., Any] | None = None

    def make(self) -> funcopt.GradientTransformation:
        tx = self.factory(**self.kwargs)
        return tx if self.route is None else self.route(tx)

    @property
    def torch(self) -> bool:
        """torch.optim has this configuration (parity tests)."""
        return self.torch_class is not None

    @property
    def optax(self) -> bool:
        """optax has this configuration (tests/test_optax_parity.py)."""
        return self.optax_name is not None

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
        if self.route is not None:  # inject_hyperparams(factory) alone would miss the route
            return False
        return any(self.factory is f for f in optimizer_factories())

    @property
    def maximize(self) -> bool:
        """The optimizer ascends its objective: give it ``objective(name, loss_fn)``."""
        return bool(self.kwargs.get("maximize", False))

    @property
    def counts_every_call(self) -> bool:
        """Every step count in the state advances on each update (not in sam, whose outer
        optimizer steps once every ``sync_period`` calls)."""
        return self.factory is not funcopt.sam

    @property
    def differentiable(self) -> bool:
        """Unrolled steps have informative gradients: not a sign-based update, and no state
        rounded to a narrower dtype (``mu_dtype``: piecewise constant in the gradients too)."""
        return not any(self.factory is f for f in _PIECEWISE_CONSTANT) and self.kwargs.get("mu_dtype") is None


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
    Row(
        "sgd_momentum",
        funcopt.sgd, dict(learning_rate=0.1, momentum=0.9), SGD, dict(lr=0.1, momentum=0.9),
        optax_name="sgd", optax_kwargs=dict(learning_rate=0.1, momentum=0.9),
    ),
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
    Row(
        "adam", funcopt.adam, dict(learning_rate=1e-2), Adam, dict(lr=1e-2),
        optax_name="adam", optax_kwargs=dict(learning_rate=1e-2),
    ),
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
    # optax's mu_dtype: the first moment stored in bfloat16 (computed in the params' dtype)
    Row(
        "adam_mu_bf16", funcopt.adam, dict(learning_rate=1e-2, mu_dtype=torch.bfloat16),
        optax_name="adam", optax_kwargs=dict(learning_rate=1e-2, mu_dtype="bfloat16"),
    ),
    Row(
        "adamw_mu_bf16", funcopt.adamw, dict(learning_rate=1e-2, mu_dtype=torch.bfloat16),
        optax_name="adamw", optax_kwargs=dict(learning_rate=1e-2, weight_decay=1e-2, mu_dtype="bfloat16"),
    ),
    Row("adam_schedule", funcopt.adam, dict(learning_rate=_inverse_time)),
    Row("adam_tensor_lr", funcopt.adam, dict(learning_rate=torch.tensor(1e-2, dtype=torch.float64))),
    Row(
        "adamw", funcopt.adamw, dict(learning_rate=1e-2), AdamW, dict(lr=1e-2),
        optax_name="adamw", optax_kwargs=dict(learning_rate=1e-2, weight_decay=1e-2),
    ),
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
    Row(
        "lion_mu_bf16", funcopt.lion, dict(learning_rate=3e-3, mu_dtype=torch.bfloat16),
        optax_name="lion", optax_kwargs=dict(learning_rate=3e-3, mu_dtype="bfloat16"),
    ),
    Row("lion_mask", funcopt.lion, dict(learning_rate=3e-3, weight_decay=0.1, mask=_matrices)),
    Row("lamb", funcopt.lamb, dict(learning_rate=1e-2, weight_decay=1e-2)),
    # --- Muon: 2-D leaves only, so the batteries' biases and scalars stay frozen on both sides
    # (route= around funcopt.muon; MuonOnMatrices gives torch.optim.Muon the 2-D params only).
    # muon_with_adamw (Muon + AdamW): its parity with torch.optim.Muon + torch.optim.AdamW is in
    # tests/test_muon.py, with the float32 tolerance that AdamW's ulps need there.
    Row("muon", funcopt.muon, dict(learning_rate=0.02), MuonOnMatrices, dict(lr=0.02), route=other_leaves_frozen),
    Row(
        "muon_plain_no_decay_original",
        funcopt.muon, dict(learning_rate=0.02, weight_decay=0.0, momentum=0.9, nesterov=False, adjust_lr_fn="original"),
        MuonOnMatrices, dict(lr=0.02, weight_decay=0.0, momentum=0.9, nesterov=False, adjust_lr_fn="original"),
        route=other_leaves_frozen,
    ),
    Row(
        "muon_match_rms_adamw_ns3",
        funcopt.muon, dict(learning_rate=0.01, adjust_lr_fn="match_rms_adamw", ns_steps=3, eps=1e-4),
        MuonOnMatrices, dict(lr=0.01, adjust_lr_fn="match_rms_adamw", ns_steps=3, eps=1e-4),
        route=other_leaves_frozen,
    ),
    Row(
        "muon_with_adamw",
        funcopt.muon_with_adamw, dict(learning_rate=0.02, adamw_learning_rate=1e-2, adamw_weight_decay=0.05),
    ),
    # --- Adadelta, Rprop, ASGD (tests/test_classic.py adds bfloat16, interop and ASGD averaging)
    Row("adadelta", funcopt.adadelta, dict(), torch.optim.Adadelta, dict()),
    Row(
        "adadelta_l2_maximize",
        funcopt.adadelta, dict(learning_rate=0.5, rho=0.8, eps=1e-4, weight_decay=0.05, maximize=True),
        torch.optim.Adadelta, dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.05, maximize=True),
    ),
    Row("adadelta_schedule", funcopt.adadelta, dict(learning_rate=schedules.warmup_cosine_decay(0.0, 2.0, 3, 100))),
    Row("rprop", funcopt.rprop, dict(), torch.optim.Rprop, dict()),
    Row(
        "rprop_etas_step_sizes_maximize",
        funcopt.rprop, dict(learning_rate=0.05, etas=(0.3, 1.5), step_sizes=(1e-4, 0.5), maximize=True),
        torch.optim.Rprop, dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-4, 0.5), maximize=True),
    ),
    Row("asgd", funcopt.asgd, dict(learning_rate=0.05), torch.optim.ASGD, dict(lr=0.05)),
    Row(
        "asgd_averaging_l2_maximize",
        funcopt.asgd, dict(learning_rate=0.05, lambd=1e-3, alpha=0.6, t0=5.0, weight_decay=0.01, maximize=True),
        torch.optim.ASGD, dict(lr=0.05, lambd=1e-3, alpha=0.6, t0=5.0, weight_decay=0.01, maximize=True),
    ),
    Row("asgd_schedule", funcopt.asgd, dict(learning_rate=schedules.warmup_cosine_decay(0.0, 0.1, 3, 100), t0=2.0)),
    # --- Adafactor (reference chain only: its row/column factors are not shaped like the params)
    Row("adafactor", funcopt.adafactor, dict(), torch.optim.Adafactor, dict()),
    Row(
        "adafactor_eps_d_decay_maximize",
        funcopt.adafactor,
        dict(learning_rate=0.05, beta2_decay=-0.5, eps=(1e-3, 1e-2), d=2.0, weight_decay=0.05, maximize=True),
        torch.optim.Adafactor,
        dict(lr=0.05, beta2_decay=-0.5, eps=(1e-3, 1e-2), d=2.0, weight_decay=0.05, maximize=True),
    ),
    # --- optax aliases (catalog A): each against optax itself (tests/test_optax_parity.py)
    Row("adabelief", funcopt.adabelief, dict(learning_rate=1e-2), optax_name="adabelief", optax_kwargs=dict(learning_rate=1e-2)),
    Row(
        "adabelief_nesterov",
        funcopt.adabelief, dict(learning_rate=1e-2, b1=0.8, eps=1e-8, eps_root=1e-12, nesterov=True),
        optax_name="adabelief", optax_kwargs=dict(learning_rate=1e-2, b1=0.8, eps=1e-8, eps_root=1e-12, nesterov=True),
    ),
    Row("adan", funcopt.adan, dict(learning_rate=1e-2), optax_name="adan", optax_kwargs=dict(learning_rate=1e-2)),
    Row(
        "adan_weight_decay",
        funcopt.adan, dict(learning_rate=1e-2, b1=0.9, b3=0.95, eps_root=0.0, weight_decay=0.05),
        optax_name="adan", optax_kwargs=dict(learning_rate=1e-2, b1=0.9, b3=0.95, eps_root=0.0, weight_decay=0.05),
    ),
    Row("amsgrad", funcopt.amsgrad, dict(learning_rate=1e-2), optax_name="amsgrad", optax_kwargs=dict(learning_rate=1e-2)),
    Row(
        "amsgrad_mu_bf16", funcopt.amsgrad, dict(learning_rate=1e-2, mu_dtype=torch.bfloat16),
        optax_name="amsgrad", optax_kwargs=dict(learning_rate=1e-2, mu_dtype="bfloat16"),
    ),
    Row(
        "amsgrad_eps_root_no_nu_correction",
        funcopt.amsgrad, dict(learning_rate=1e-2, b2=0.99, eps_root=1e-8, bias_correction_nu=False),
        optax_name="amsgrad", optax_kwargs=dict(learning_rate=1e-2, b2=0.99, eps_root=1e-8, bias_correction_nu=False),
    ),
    Row("adamaxw", funcopt.adamaxw, dict(learning_rate=2e-2), optax_name="adamaxw", optax_kwargs=dict(learning_rate=2e-2)),
    Row(
        "adamaxw_mask",
        funcopt.adamaxw, dict(learning_rate=2e-2, weight_decay=0.1, mask=_matrices),
        optax_name="adamaxw", optax_kwargs=dict(learning_rate=2e-2, weight_decay=0.1, mask=_matrices),
    ),
    Row("nadamw", funcopt.nadamw, dict(learning_rate=1e-2), optax_name="nadamw", optax_kwargs=dict(learning_rate=1e-2)),
    Row(
        "nadamw_mu_bf16", funcopt.nadamw, dict(learning_rate=1e-2, mu_dtype=torch.bfloat16),
        optax_name="nadamw", optax_kwargs=dict(learning_rate=1e-2, mu_dtype="bfloat16"),
    ),
    Row(
        "nadamw_eps_root_decay",
        funcopt.nadamw, dict(learning_rate=1e-2, b1=0.8, eps_root=1e-8, weight_decay=0.05),
        optax_name="nadamw", optax_kwargs=dict(learning_rate=1e-2, b1=0.8, eps_root=1e-8, weight_decay=0.05),
    ),
    Row("yogi", funcopt.yogi, dict(learning_rate=1e-2), optax_name="yogi", optax_kwargs=dict(learning_rate=1e-2)),
    Row("novograd", funcopt.novograd, dict(learning_rate=1e-2), optax_name="novograd", optax_kwargs=dict(learning_rate=1e-2)),
    Row(
        "novograd_weight_decay",
        funcopt.novograd, dict(learning_rate=1e-2, b2=0.5, eps_root=1e-6, weight_decay=0.1),
        optax_name="novograd", optax_kwargs=dict(learning_rate=1e-2, b2=0.5, eps_root=1e-6, weight_decay=0.1),
    ),
    Row("sm3", funcopt.sm3, dict(learning_rate=0.05), optax_name="sm3", optax_kwargs=dict(learning_rate=0.05)),
    Row("fromage", funcopt.fromage, dict(learning_rate=1e-2), optax_name="fromage", optax_kwargs=dict(learning_rate=1e-2)),
    Row(
        "fromage_schedule",
        funcopt.fromage, dict(learning_rate=_inverse_time64, min_norm=1e-3),
        optax_name="fromage", optax_kwargs=dict(learning_rate=_inverse_time64, min_norm=1e-3),
    ),
    Row("lars", funcopt.lars, dict(learning_rate=0.5), optax_name="lars", optax_kwargs=dict(learning_rate=0.5)),
    Row(
        "lars_masks_nesterov",
        funcopt.lars,
        dict(learning_rate=0.1, weight_decay=0.01, weight_decay_mask=_matrices, trust_ratio_mask=_matrices, nesterov=True),
        optax_name="lars",
        optax_kwargs=dict(
            learning_rate=0.1, weight_decay=0.01, weight_decay_mask=_matrices, trust_ratio_mask=_matrices, nesterov=True
        ),
    ),
    Row("sign_sgd", funcopt.sign_sgd, dict(learning_rate=1e-2), optax_name="sign_sgd", optax_kwargs=dict(learning_rate=1e-2)),
    Row("signum", funcopt.signum, dict(learning_rate=1e-2), optax_name="signum", optax_kwargs=dict(learning_rate=1e-2)),
    Row(
        "signum_beta_schedule",
        funcopt.signum, dict(learning_rate=_inverse_time64, beta=0.5),
        optax_name="signum", optax_kwargs=dict(learning_rate=_inverse_time64, beta=0.5),
    ),
    Row(
        "optimistic_gradient_descent",
        funcopt.optimistic_gradient_descent, dict(learning_rate=1e-2),
        optax_name="optimistic_gradient_descent", optax_kwargs=dict(learning_rate=1e-2),
    ),
    Row(
        "optimistic_gradient_descent_alpha_beta",
        funcopt.optimistic_gradient_descent, dict(learning_rate=1e-2, alpha=0.5, beta=0.8),
        optax_name="optimistic_gradient_descent", optax_kwargs=dict(learning_rate=1e-2, alpha=0.5, beta=0.8),
    ),
    Row(
        "optimistic_adam_v2",
        funcopt.optimistic_adam_v2, dict(learning_rate=1e-2),
        optax_name="optimistic_adam_v2", optax_kwargs=dict(learning_rate=1e-2),
    ),
    Row(
        "optimistic_adam_v2_mu_bf16",
        funcopt.optimistic_adam_v2, dict(learning_rate=1e-2, mu_dtype=torch.bfloat16),
        optax_name="optimistic_adam_v2", optax_kwargs=dict(learning_rate=1e-2, mu_dtype="bfloat16"),
    ),
    Row(
        "optimistic_adam_v2_plain_adam",
        funcopt.optimistic_adam_v2, dict(learning_rate=1e-2, alpha=0.5, beta=2.0, eps_root=1e-8, nesterov=False),
        optax_name="optimistic_adam_v2",
        optax_kwargs=dict(learning_rate=1e-2, alpha=0.5, beta=2.0, eps_root=1e-8, nesterov=False),
    ),
    # noisy_sgd: JAX draws other noise than funcopt, so only eta=0 can follow optax's trajectory;
    # tests/test_catalog_aliases.py checks the noise's mean and variance against eta / t**gamma.
    Row("noisy_sgd", funcopt.noisy_sgd, dict(learning_rate=0.05, key=3)),
    Row(
        "noisy_sgd_no_noise",
        funcopt.noisy_sgd, dict(learning_rate=0.05, eta=0.0), optax_name="noisy_sgd", optax_kwargs=dict(learning_rate=0.05, eta=0.0, key=0),
    ),
    # (the batteries' objective has its minimum near 1.9: f_min=-5 over-estimates the gap, so the
    # first steps are Polyak's and the rest capped; sps+'s clipping of a negative gap is checked in
    # tests/test_catalog_aliases.py)
    Row(
        "polyak_sgd",
        funcopt.polyak_sgd, dict(max_learning_rate=0.25, f_min=-5.0),
        optax_name="polyak_sgd", optax_kwargs=dict(max_learning_rate=0.25, f_min=-5.0), update_extras=("value",),
    ),
    Row(
        "polyak_sgd_sps_plus",
        funcopt.polyak_sgd, dict(max_learning_rate=0.5, scaling=0.5, f_min=0.0, eps=1e-6, variant="sps+"),
        optax_name="polyak_sgd", optax_kwargs=dict(max_learning_rate=0.5, scaling=0.5, f_min=0.0, eps=1e-6, variant="sps+"),
        update_extras=("value",),
    ),
    # --- optax.contrib (catalog B): each against optax.contrib itself (tests/test_optax_parity.py);
    # tests/test_catalog_contrib.py adds the schedulefree package, eval params and value= errors.
    _contrib("schedule_free_adamw", funcopt.schedule_free_adamw, dict(learning_rate=1e-2)),
    # optax's warmup_steps= schedule (warmup_constant_schedule) computes in float32 (its int32
    # count over an int), funcopt's in float64: 2e-5. tests/test_catalog_contrib.py runs both with
    # one float64 warmup schedule and matches optax to 1e-9.
    _contrib(
        "schedule_free_adamw_warmup_decay", funcopt.schedule_free_adamw,
        dict(learning_rate=2e-2, warmup_steps=5, b1=0.8, b2=0.99, weight_decay=0.01, weight_lr_power=1.0),
        optax_rtol=2e-5,
    ),
    _contrib("schedule_free_sgd", funcopt.schedule_free_sgd, dict(learning_rate=0.05)),
    _contrib(
        "schedule_free_sgd_warmup_decay", funcopt.schedule_free_sgd,
        dict(learning_rate=0.05, warmup_steps=5, b1=0.95, weight_decay=0.01),
        optax_rtol=2e-5,
    ),
    _contrib("adopt", funcopt.adopt, dict(learning_rate=1e-2)),
    _contrib(
        "adopt_nesterov_no_clipping", funcopt.adopt,
        dict(learning_rate=1e-2, b2=0.99, eps=1e-8, nesterov=True, use_clipping=False),
    ),
    _contrib("ademamix", funcopt.ademamix, dict(learning_rate=1e-2)),
    _contrib(
        "ademamix_decay", funcopt.ademamix,
        dict(learning_rate=1e-2, b1=0.8, b3=0.999, alpha=3.0, eps_root=1e-9, weight_decay=0.05),
    ),
    _contrib("prodigy", funcopt.prodigy, dict()),
    _contrib(
        "prodigy_safeguard_decay", funcopt.prodigy,
        dict(betas=(0.8, 0.99), beta3=0.9, estim_lr0=1e-4, estim_lr_coef=0.5, weight_decay=0.01, safeguard_warmup=True),
    ),
    _contrib("dadapt_adamw", funcopt.dadapt_adamw, dict()),
    _contrib(
        "dadapt_adamw_decay", funcopt.dadapt_adamw, dict(betas=(0.8, 0.99), eps=1e-6, estim_lr0=1e-4, weight_decay=0.01)
    ),
    # optax computes MADGRAD's lambda = (lr + eps) * sqrt(count + 1) in float32 (jnp.sqrt of its
    # int32 count is float32 even with x64); funcopt keeps float64. With lambda rounded to float32
    # as optax does, the first 18 steps agree to 1e-15.
    _contrib("madgrad", funcopt.madgrad, dict(learning_rate=1e-2), optax_rtol=1e-5),
    _contrib(
        "madgrad_decay", funcopt.madgrad, dict(learning_rate=2e-2, momentum=0.5, weight_decay=0.01, eps=1e-5),
        optax_rtol=1e-5,
    ),
    _contrib("cocob", funcopt.cocob, dict()),
    _contrib("cocob_decay", funcopt.cocob, dict(learning_rate=0.5, alpha=10.0, weight_decay=0.01)),
    _contrib("dog", funcopt.dog, dict()),
    _contrib(
        "dog_lr_init_decay", funcopt.dog, dict(init_step=("learning_rate", 1e-2), eps=1e-6, weight_decay=0.01)
    ),
    _contrib("dog_distance_init", funcopt.dog, dict(init_step=("distance", 1e-3))),
    _contrib("dowg", funcopt.dowg, dict()),
    _contrib("dowg_decay", funcopt.dowg, dict(init_estim_sq_dist=1e-2, eps=1e-6, weight_decay=0.01)),
    _contrib("momo", funcopt.momo, dict(learning_rate=0.5), update_extras=("value",)),
    _contrib(
        "momo_adapt_lower_bound", funcopt.momo,
        dict(learning_rate=1.0, beta=0.8, lower_bound=-4.0, weight_decay=0.01, adapt_lower_bound=True),
        update_extras=("value",),
    ),
    # --- blocks and wrappers (catalog C): lookahead, sam and sophia against optax through
    # tests/optax_oracles.py; the compositions without an optax oracle run the batteries only
    # (tests/test_catalog_wrappers.py, test_sam.py, test_sophia.py add their oracles).
    Row(
        "lookahead_adam", lookahead_adam, dict(learning_rate=1e-2, sync_period=5, slow_step_size=0.5),
        optax_name="lookahead", optax_factory=optax_oracles.lookahead_adam,
        optax_kwargs=dict(learning_rate=1e-2, sync_period=5, slow_step_size=0.5),
    ),
    Row(
        "lookahead_adam_reset", lookahead_adam,
        dict(learning_rate=1e-2, sync_period=3, slow_step_size=0.8, reset_state=True),
        optax_name="lookahead", optax_factory=optax_oracles.lookahead_adam,
        optax_kwargs=dict(learning_rate=1e-2, sync_period=3, slow_step_size=0.8, reset_state=True),
    ),
    Row(
        "sam_sgd", funcopt.sam, dict(optimizer=funcopt.sgd(0.1), rho=0.05),
        optax_name="contrib.sam", optax_factory=optax_oracles.sam_sgd, optax_kwargs=dict(learning_rate=0.1, rho=0.05),
    ),
    Row(
        "sam_momentum_sync3_no_reset", funcopt.sam,
        dict(
            optimizer=funcopt.sgd(0.05, momentum=0.9),
            adv_optimizer=funcopt.chain(funcopt.normalize(), funcopt.sgd(0.02, momentum=0.5)),
            sync_period=3, reset_state=False,
        ),
        optax_name="contrib.sam", optax_factory=optax_oracles.sam_sgd,
        optax_kwargs=dict(learning_rate=0.05, momentum=0.9, rho=0.02, adv_momentum=0.5, sync_period=3, reset_state=False),
    ),
    Row(
        "sophia_squared_grads", funcopt.sophia, dict(learning_rate=1e-2, hessian_diagonal_fn=squared_grads()),
        optax_name="contrib.sophia", optax_factory=optax_oracles.sophia, optax_kwargs=dict(learning_rate=1e-2),
    ),
    Row(
        "sophia_interval3_decay", funcopt.sophia,
        dict(
            learning_rate=2e-2, b1=0.9, b2=0.95, gamma=0.05, clip_threshold=0.5, weight_decay=0.01,
            update_interval=3, hessian_diagonal_fn=squared_grads(),
        ),
        optax_name="contrib.sophia", optax_factory=optax_oracles.sophia,
        optax_kwargs=dict(learning_rate=2e-2, b1=0.9, b2=0.95, gamma=0.05, clip_threshold=0.5, weight_decay=0.01, update_interval=3),
    ),
    Row("ema_params_adam", ema_params_adam, dict(learning_rate=1e-2, decay=0.9)),
    Row("add_noise_sgd", noisy_chain_sgd, dict(learning_rate=0.05, eta=0.01)),
    Row("skip_not_finite_adam", skip_not_finite_adam, dict(learning_rate=1e-2)),
    # --- Compositions: a chain with no fast route; inject_hyperparams around a fast one
    Row("chain_clip_adam", clipped_adam, dict(learning_rate=1e-2)),
    Row("inject_adam", funcopt.inject_hyperparams(funcopt.adam), dict(learning_rate=1e-2)),
)


# Optimizers the dense batteries cannot run (their inputs differ in kind), each with the test
# file that covers them against their torch.optim oracle instead.
OWN_BATTERY: dict[Callable[..., funcopt.GradientTransformation], str] = {
    funcopt.sparse_adam: "tests/test_sparse_adam.py (sparse COO gradients)",
    funcopt.dpsgd: "tests/test_dpsgd.py (per-example gradients with a leading batch axis)",
}


def optimizer_factories() -> list[Callable[..., funcopt.GradientTransformation]]:
    """The optimizer factories funcopt.optimizers exports."""
    return [f for f in (getattr(funcopt.optimizers, n) for n in funcopt.optimizers.__all__) if inspect.isfunction(f)]


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


def update_kwargs(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The extra keyword arguments the row's ``update`` takes each step (its ``update_extras``),
    e.g. ``{"value": value}`` for polyak_sgd; ``value`` is the loss at the current params."""
    return {k: value for k in ROWS[name].update_extras}


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
