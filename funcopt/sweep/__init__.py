"""Hyperparameter sweeps: K configurations trained as one batched program.

Like a Python loop over configurations (or one job per configuration), but the K runs share
one program: the forward/backward runs under ``torch.func.vmap`` over K stacked copies of the
parameters, and the optimizer step runs once on the stacked tensors with each configuration's
hyperparameters broadcast along the leading axis (:mod:`funcopt.stacked`). The
hyperparameters live in the optimizer state (``funcopt.inject_hyperparams``), so the K
configurations differ only in data, never in code.

Example:
    >>> hp = funcopt.sweep.grid(learning_rate=[1e-3, 3e-3, 1e-2], weight_decay=[0.0, 1e-2])
    >>> res = funcopt.sweep.sweep(loss_fn, params, funcopt.adamw, hp, lambda step: (X, y),
    ...                           steps=200, eval_fn=accuracy, mode="max")
    >>> print(res)                      # table, best first
    >>> best = res.best()               # hparams, params, opt_state of the winner
    >>> res.plot("sweep.png")           # metric vs each hyperparameter

References: Li et al., "Hyperband: A Novel Bandit-Based Approach to Hyperparameter
Optimization", JMLR 2018 (successive halving, Jamieson & Talwalkar, 2016, arXiv 1502.07943).

The package is split by concept: :func:`sweep` and :func:`successive_halving` (``_sweep``),
the hyperparameter sets ``grid``, ``random_search``... (``_space``), :class:`SweepResult`
(``_result``) and the batched engine ``stacked_update``/``vmapped_update`` (``_stacked``).
"""

from funcopt.sweep._result import BestConfig, SweepResult
from funcopt.sweep._space import choice, grid, log_uniform, random_search, uniform
from funcopt.sweep._stacked import (
    check_stacked_update,
    init_stacked,
    select,
    select_configs,
    stack_params,
    stack_states,
    stacked_update,
    unstack,
    vmapped_update,
)
from funcopt.sweep._sweep import successive_halving, sweep

__all__ = [
    "grid",
    "uniform",
    "log_uniform",
    "choice",
    "random_search",
    "stack_params",
    "init_stacked",
    "stack_states",
    "select",
    "unstack",
    "stacked_update",
    "vmapped_update",
    "check_stacked_update",
    "select_configs",
    "sweep",
    "successive_halving",
    "SweepResult",
    "BestConfig",
]
