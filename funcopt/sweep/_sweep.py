"""The sweep entry points :func:`sweep` and :func:`successive_halving` (see :mod:`funcopt.sweep`)."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from funcopt.base import FuncoptError, GradientTransformation, PyTree
from funcopt.transforms import injected_states, inject_hyperparams
from funcopt.sweep._engine import _batch_source, _chunks, _concat, _Plan, _Run, _run_configs, columns_agree, row_kernels
from funcopt.sweep._stacked import _detach, _hp_names, check_stacked_update, select_configs, stack_params
from funcopt.sweep._result import SweepResult, _History
from funcopt.sweep._space import _as_values

__all__ = ["sweep", "successive_halving"]


# ---------------------------------------------------------------------------------------------
# From the user's arguments to a validated plan (the engine is in funcopt.stacked)


def _resolve_optimizer(optimizer: Any, values: dict[str, list[float]]) -> GradientTransformation:
    if isinstance(optimizer, GradientTransformation):
        return optimizer
    if not callable(optimizer):
        raise TypeError(
            f"optimizer must be a factory such as funcopt.adam or an inject_hyperparams-wrapped "
            f"optimizer, got {type(optimizer).__name__}."
        )
    try:
        params = inspect.signature(optimizer).parameters
    except (TypeError, ValueError):
        params = {}
    # Injectable: float (or tensor/schedule) defaults, and required arguments such as sgd's
    # learning_rate. Booleans, integers and strings stay static and cannot vary per config.
    valid = [
        n for n, p in params.items()
        if n != "mask" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and (p.default is p.empty or (not isinstance(p.default, (bool, int, str)) and p.default is not None))
    ]
    unknown = sorted(n for n in values if params and n not in valid)
    if unknown:
        raise FuncoptError(
            f"Unknown hyperparameter(s) {unknown} for {getattr(optimizer, '__name__', optimizer)}; "
            f"valid names: {valid} (boolean, integer and string arguments are static)."
        )
    try:
        return inject_hyperparams(optimizer)(**{n: v[0] for n, v in values.items()})
    except FuncoptError as e:
        raise FuncoptError(
            f"{e} Sweep that argument, or fix it with functools.partial, e.g. "
            "functools.partial(funcopt.sgd, learning_rate=0.1)."
        ) from None


def _make_plan(
    loss_fn, init_params, optimizer, hparams, data, *, eval_fn, eval_every, chunk_size, seeds,
    step_mode, randomness, replay, metric, mode,
) -> _Plan:
    if not callable(loss_fn):
        raise TypeError("loss_fn must be a function (params, batch) -> scalar loss.")
    values = {str(k): _as_values(k, v) for k, v in (hparams or {}).items()}
    lengths = {k: len(v) for k, v in values.items()}
    if len(set(lengths.values())) > 1:
        raise FuncoptError(
            f"hparams have different lengths {lengths}; every name needs one value per "
            "configuration. Use funcopt.sweep.grid(...) for the Cartesian product."
        )
    k = next(iter(lengths.values()), None)
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if k is not None and len(seeds) != k:
            raise FuncoptError(f"seeds has {len(seeds)} entries but hparams define {k} configurations.")
        k = len(seeds)
        if not callable(init_params):
            raise FuncoptError("With seeds, init_params must be a function seed -> params.")
    elif callable(init_params):
        raise FuncoptError("init_params is a function: pass seeds=[...] (one per configuration).")
    if not k:
        raise FuncoptError("Nothing to sweep: give hparams (e.g. grid(...)) and/or seeds.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise FuncoptError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    if eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1):
        raise FuncoptError(f"eval_every must be a positive int or None, got {eval_every!r}.")
    if mode not in ("min", "max"):
        raise FuncoptError(f"mode must be 'min' or 'max', got {mode!r}.")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError("eval_fn must be a function params -> scalar or dict of scalars.")
    if step_mode not in ("auto", "stacked", "vmap"):
        raise FuncoptError(f"step_mode must be 'auto', 'stacked' or 'vmap', got {step_mode!r}.")
    tx = _resolve_optimizer(optimizer, values)
    replay = replay or (chunk_size is not None and chunk_size < k)
    plan = _Plan(loss_fn, tx, values, init_params, seeds, _batch_source(data, replay), eval_fn,
                 eval_every, step_mode, randomness, k)
    plan.factory = None if isinstance(optimizer, GradientTransformation) else optimizer
    # Check the names against a real state (catches non-injected optimizers and static args).
    first = _detach(init_params(seeds[0]) if seeds is not None else init_params)
    first_state = tx.init(first)
    have = _hp_names(first_state)
    if values and not injected_states(first_state):
        raise FuncoptError(
            "The optimizer keeps no hyperparameters in its state, so they cannot differ per "
            "configuration. Pass the factory (e.g. funcopt.adam, which sweep wraps itself) or "
            "funcopt.inject_hyperparams(funcopt.adam)(...)."
        )
    unknown = sorted(set(values) - set(have))
    if unknown:
        raise FuncoptError(f"Unknown hyperparameter(s) {unknown}; this optimizer's state has {have}.")
    if eval_fn is not None:
        with torch.no_grad():
            plan.eval_names = list(plan.evaluate(stack_params(first, 1)))
    valid = ["loss", *plan.eval_names]
    plan.metric = metric if metric is not None else valid[-1] if len(valid) == 1 else valid[1]
    if plan.metric not in valid:
        raise FuncoptError(f"metric {metric!r} is not recorded; choose one of {valid}.")
    plan.mode = mode
    if step_mode in ("auto", "stacked"):
        probe_indices = list(range(min(k, 3)))
        probe = plan.init(probe_indices)
        plan.columns = columns_agree(tx, *probe)
        if step_mode == "auto":
            if plan.columns and row_kernels(plan, *probe, probe_indices) is not None:
                # each configuration's own kernel on its own row: exact whatever the optimizer
                # does across configurations, so the stacked-versus-vmap probe is not needed
                plan.step_mode = "stacked"
            else:
                ok, reason = check_stacked_update(tx, *probe)
                plan.step_mode = "stacked" if ok else "vmap"
                plan.step_reason = reason
    return plan


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, desc=desc, unit="cfg-step", leave=False)


def _rank_positions(run: _Run, plan: _Plan) -> list[int]:
    scores = run.losses[:, -1] if plan.metric == "loss" else run.evals[plan.metric][:, -1]
    sign = -1.0 if plan.mode == "max" else 1.0
    vals = [math.inf if math.isnan(v) else sign * v for v in scores.double().tolist()]
    return sorted(range(len(vals)), key=lambda i: vals[i])


# ---------------------------------------------------------------------------------------------
# Public entry points


def sweep(
    loss_fn: Callable[[PyTree, Any], torch.Tensor],
    init_params: PyTree | Callable[[int], PyTree],
    optimizer: GradientTransformation | Callable[..., GradientTransformation],
    hparams: Mapping[str, Sequence[float]] | None,
    data: Any,
    *,
    steps: int,
    eval_fn: Callable[[PyTree], Any] | None = None,
    eval_every: int | None = None,
    metric: str | None = None,
    mode: str = "min",
    chunk_size: int | None = None,
    seeds: Sequence[int] | None = None,
    step_mode: str = "auto",
    randomness: str = "error",
    progress: bool = True,
) -> SweepResult:
    """Trains K configurations at once, like a loop of K training runs on the same batches.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, written for ONE configuration (it runs
            under ``torch.func.vmap``; with an ``nn.Module`` use ``funcopt.nn.apply``).
        init_params: the initial params (copied to every configuration), or with ``seeds`` a
            function ``seed -> params``.
        optimizer: a factory such as ``funcopt.adamw`` (wrapped with ``inject_hyperparams``
            here, the swept names passed as its arguments) or an already injected optimizer
            ``funcopt.inject_hyperparams(factory)(...)``. To sweep a schedule's parameters, pass
            your own factory, e.g. ``def opt(peak_lr=1e-3): return funcopt.adam(sched(peak_lr))``.
        hparams: name -> K values (``grid``, ``random_search``); ``None``/``{}`` for a seeds-only
            sweep.
        data: a function ``step -> batch``, a list or DataLoader of batches (cycled), or one
            fixed batch (a tensor, tuple or dict). Every configuration sees the same batches.
        steps: number of optimizer steps per configuration.
        eval_fn: ``eval_fn(params) -> scalar or dict of scalars`` for ONE configuration (run
            under vmap); evaluated every ``eval_every`` steps and at the end.
        eval_every: evaluation period in steps (default: only at the end).
        metric: the name ``best()`` and the table rank by: ``"loss"`` (final training loss,
            the default without ``eval_fn``) or a key of ``eval_fn``'s dict (default: its
            first key; ``"eval"`` for a scalar).
        mode: ``"min"`` or ``"max"``: whether a smaller or larger metric is better.
        chunk_size: train at most this many configurations at a time (bounds activation and
            working memory; the final params of all K are kept). ``None``: all K at once.
        seeds: one integer per configuration, passed to ``init_params``.
        step_mode: ``"stacked"`` (one ``update`` on the stacked tensors, fast, for elementwise
            optimizers), ``"vmap"`` (exact for any optimizer) or ``"auto"`` (stacked when a
            probe shows it equals vmap, e.g. not for ``lamb``; see ``funcopt.stacked``).
        randomness: ``torch.func.vmap``'s ``randomness`` (``"different"`` for dropout).
        progress: show a tqdm progress bar.

    Returns:
        A :class:`SweepResult`: per-configuration loss/metric history, final stacked params
        and states, ``best()``, ``to_rows()``, ``plot()``.
    """
    if not isinstance(steps, int) or steps < 1:
        raise FuncoptError(f"steps must be a positive int, got {steps!r}.")
    t0 = time.perf_counter()
    plan = _make_plan(loss_fn, init_params, optimizer, hparams, data, eval_fn=eval_fn,
                      eval_every=eval_every, chunk_size=chunk_size, seeds=seeds,
                      step_mode=step_mode, randomness=randomness, replay=False,
                      metric=metric, mode=mode)
    history = _History(plan.k, steps)
    bar = _progress(plan.k * steps, progress, "sweep")
    runs = []
    try:
        for idx in _chunks(list(range(plan.k)), chunk_size):
            runs.append(_run_configs(plan, idx, 0, steps, bar=bar))
            history.record(runs[-1], 0, steps)
    finally:
        if bar is not None:
            bar.close()
    return history.result(plan, _concat(runs), time.perf_counter() - t0)


def successive_halving(
    loss_fn: Callable[[PyTree, Any], torch.Tensor],
    init_params: PyTree | Callable[[int], PyTree],
    optimizer: GradientTransformation | Callable[..., GradientTransformation],
    hparams: Mapping[str, Sequence[float]] | None,
    data: Any,
    *,
    steps: int,
    rungs: int = 3,
    keep: float = 0.5,
    eval_fn: Callable[[PyTree], Any] | None = None,
    eval_every: int | None = None,
    metric: str | None = None,
    mode: str = "min",
    chunk_size: int | None = None,
    seeds: Sequence[int] | None = None,
    step_mode: str = "auto",
    randomness: str = "error",
    progress: bool = True,
) -> SweepResult:
    """Like :func:`sweep`, but after each of ``rungs`` equal rungs keeps only the best ``keep``
    fraction of configurations (at least one), which continue batched from where they were.

    The survivors of the last rung train ``steps`` steps in total; a configuration dropped after
    rung r trained ``r * steps // rungs``, and its history holds NaN afterwards. Ranking uses
    ``metric``/``mode`` at the end of each rung (as in :func:`sweep`; without ``eval_fn`` the
    training loss of the rung's last step, NaN counting as worst). Other arguments as in
    :func:`sweep`.

    References: Jamieson & Talwalkar, "Non-stochastic Best Arm Identification and
    Hyperparameter Optimization", AISTATS 2016, arXiv 1502.07943.
    """
    if not isinstance(steps, int) or steps < 1:
        raise FuncoptError(f"steps must be a positive int, got {steps!r}.")
    if not isinstance(rungs, int) or not 1 <= rungs <= steps:
        raise FuncoptError(f"rungs must be an int in [1, steps={steps}], got {rungs!r}.")
    if not 0 < keep < 1:
        raise FuncoptError(f"keep must be a fraction in (0, 1), got {keep!r}.")
    t0 = time.perf_counter()
    plan = _make_plan(loss_fn, init_params, optimizer, hparams, data, eval_fn=eval_fn,
                      eval_every=eval_every, chunk_size=chunk_size, seeds=seeds,
                      step_mode=step_mode, randomness=randomness, replay=True,
                      metric=metric, mode=mode)
    bounds = [steps * r // rungs for r in range(rungs + 1)]
    history = _History(plan.k, steps)
    alive = list(range(plan.k))
    params = state = None
    n_alive = [plan.k]
    for _ in range(rungs - 1):
        n_alive.append(max(1, math.ceil(n_alive[-1] * keep)))
    bar = _progress(sum(n * (bounds[r + 1] - bounds[r]) for r, n in enumerate(n_alive)), progress, "halving")
    try:
        for r in range(rungs):
            runs = []
            for pos in _chunks(list(range(len(alive))), chunk_size):
                p = None if params is None else select_configs(params, pos)
                s = None if state is None else select_configs(state, pos)
                runs.append(_run_configs(plan, [alive[i] for i in pos], bounds[r], bounds[r + 1], p, s, bar=bar))
                history.record(runs[-1], bounds[r], bounds[r + 1])
            run = _concat(runs)
            if r < rungs - 1:
                best = sorted(_rank_positions(run, plan)[: n_alive[r + 1]])
                alive = [run.indices[i] for i in best]
                params, state = select_configs(run.params, best), select_configs(run.state, best)
    finally:
        if bar is not None:
            bar.close()
    return history.result(plan, run, time.perf_counter() - t0)
