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
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from funcopt.base import FuncoptError, GradientTransformation, PyTree
from funcopt.inject import _find_states, inject_hyperparams
from funcopt.stacked import (
    _batch_source,
    _chunks,
    _concat,
    _detach,
    _hp_names,
    _Plan,
    _Run,
    _run_configs,
    check_stacked_update,
    init_stacked,
    select,
    select_configs,
    stack_params,
    stack_states,
    unstack,
)

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
    "sweep",
    "successive_halving",
    "SweepResult",
    "BestConfig",
]


# ---------------------------------------------------------------------------------------------
# Hyperparameter sets


def _as_values(name: str, values: Any) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise FuncoptError(f"hyperparameter {name!r} needs a list of values, got {values!r}.")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise FuncoptError(f"hyperparameter {name!r} has a non-numeric value {v!r}; sweeps take numbers.")
        out.append(float(v))
    if not out:
        raise FuncoptError(f"hyperparameter {name!r} has no values.")
    return out


def grid(**axes: Sequence[float]) -> dict[str, list[float]]:
    """The Cartesian product of per-name value lists, like ``sklearn.model_selection.ParameterGrid``.

    Returns a dict of equal-length lists (the first name varies slowest), e.g.
    ``grid(learning_rate=[0.1, 0.01], momentum=[0.0, 0.9])`` gives 4 configurations.
    """
    if not axes:
        raise FuncoptError("grid needs at least one name=[values] argument.")
    lists = {k: _as_values(k, v) for k, v in axes.items()}
    out: dict[str, list[float]] = {k: [] for k in lists}
    total = math.prod(len(v) for v in lists.values())
    names = list(lists)
    for flat in range(total):
        rest = flat
        for k in reversed(names):
            n = len(lists[k])
            out[k].append(lists[k][rest % n])
            rest //= n
    return out


@dataclass(frozen=True)
class _Distribution:
    kind: str
    low: float = 0.0
    high: float = 1.0
    values: tuple[float, ...] = ()

    def sample(self, n: int, gen: torch.Generator) -> list[float]:
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        if self.kind == "uniform":
            return (self.low + (self.high - self.low) * u).tolist()
        if self.kind == "log_uniform":
            lo, hi = math.log(self.low), math.log(self.high)
            return torch.exp(lo + (hi - lo) * u).tolist()
        idx = torch.randint(len(self.values), (n,), generator=gen)
        return [self.values[i] for i in idx.tolist()]


def uniform(low: float, high: float) -> _Distribution:
    """Uniform on ``[low, high)``, for :func:`random_search`."""
    if not low < high:
        raise FuncoptError(f"uniform needs low < high, got low={low!r}, high={high!r}.")
    return _Distribution("uniform", float(low), float(high))


def log_uniform(low: float, high: float) -> _Distribution:
    """Log-uniform on ``[low, high)`` (``scipy.stats.loguniform``), for learning rates and decays."""
    if not 0 < low < high:
        raise FuncoptError(f"log_uniform needs 0 < low < high, got low={low!r}, high={high!r}.")
    return _Distribution("log_uniform", float(low), float(high))


def choice(values: Sequence[float]) -> _Distribution:
    """Uniform over a finite list of numbers, for :func:`random_search`."""
    return _Distribution("choice", values=tuple(_as_values("choice", values)))


def random_search(num: int, *, seed: int = 0, **distributions: _Distribution) -> dict[str, list[float]]:
    """``num`` random configurations, each name drawn independently from its distribution.

    Like ``sklearn.model_selection.ParameterSampler``; e.g.
    ``random_search(16, learning_rate=log_uniform(1e-4, 1e-1), b1=uniform(0.8, 0.99))``.
    Reproducible for a given ``seed``.
    """
    if not isinstance(num, int) or num < 1:
        raise FuncoptError(f"random_search needs num >= 1, got {num!r}.")
    if not distributions:
        raise FuncoptError("random_search needs at least one name=distribution argument.")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, dist in distributions.items():
        if not isinstance(dist, _Distribution):
            raise FuncoptError(
                f"random_search: {name!r} must be uniform(...), log_uniform(...) or choice([...]); "
                f"got {type(dist).__name__}. For a fixed list of values use grid()."
            )
        out[name] = dist.sample(num, gen)
    return out


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
    # Check the names against a real state (catches non-injected optimizers and static args).
    first = _detach(init_params(seeds[0]) if seeds is not None else init_params)
    first_state = tx.init(first)
    have = _hp_names(first_state)
    if values and not _find_states(first_state):
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
    if step_mode == "auto":
        probe = plan.init(list(range(min(k, 3))))
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


# ---------------------------------------------------------------------------------------------
# Results


class BestConfig(NamedTuple):
    """The winning configuration of a sweep: ordinary (unstacked) params and optimizer state.

    ``opt_state`` holds this configuration's hyperparameters, so training can continue with
    ``SweepResult.optimizer.update(grads, opt_state, params)``.
    """

    index: int
    hparams: dict[str, float]
    value: float
    params: PyTree
    opt_state: PyTree
    seed: int | None


@dataclass
class SweepResult:
    """What :func:`sweep` and :func:`successive_halving` return.

    Attributes:
        hparams: name -> the K values, in configuration order.
        loss: ``(K, steps)`` training loss per configuration and step (NaN where not trained).
        evals: name -> ``(K, len(eval_steps))`` metric history (NaN where not evaluated).
        eval_steps: the step counts at which ``evals`` were taken.
        steps_trained: steps each configuration trained (< steps for those halving dropped).
        params: final params of the configurations in ``kept``, stacked along axis 0.
        opt_state: their stacked optimizer states.
        kept: the configurations whose final params are held (all K for :func:`sweep`).
        optimizer: the (injected) optimizer the states belong to.
        metric: the name used to rank (``"loss"`` or an ``eval_fn`` key); ``mode``: min/max.
        step_mode: ``"stacked"`` or ``"vmap"``: how the optimizer step ran (``step_note``: why).
        seconds: wall time of the sweep; ``seeds``: the seeds, if any.
    """

    hparams: dict[str, list[float]]
    loss: torch.Tensor
    evals: dict[str, torch.Tensor]
    eval_steps: list[int]
    steps_trained: list[int]
    params: PyTree
    opt_state: PyTree
    kept: list[int]
    optimizer: GradientTransformation
    metric: str
    mode: str
    step_mode: str
    step_note: str
    seconds: float
    seeds: list[int] | None = None

    @property
    def k(self) -> int:
        """The number of configurations."""
        return self.loss.shape[0]

    def final(self, metric: str | None = None) -> torch.Tensor:
        """``(K,)`` float64: each configuration's last recorded value of ``metric``."""
        name = metric or self.metric
        if name == "loss":
            hist = self.loss
        elif name in self.evals:
            hist = self.evals[name]
        else:
            raise FuncoptError(f"metric {name!r} is not recorded; choose one of {['loss', *self.evals]}.")
        out = torch.full((self.k,), float("nan"), dtype=torch.float64)
        for i in range(self.k):
            row = hist[i].double()
            seen = torch.nonzero(~torch.isnan(row)).flatten()
            if len(seen):
                out[i] = row[seen[-1]]
        return out

    def ranking(self, metric: str | None = None) -> list[int]:
        """Configuration indices, best first: most steps trained, then by ``metric`` (NaN last)."""
        values = self.final(metric).tolist()
        sign = -1.0 if self.mode == "max" else 1.0

        def key(i: int) -> tuple[int, float]:
            v = values[i]
            return (-self.steps_trained[i], math.inf if math.isnan(v) else sign * v)

        return sorted(range(self.k), key=key)

    def select(self, index: int) -> tuple[PyTree, PyTree]:
        """Configuration ``index``'s final ``(params, opt_state)`` as ordinary trees."""
        if not 0 <= index < self.k:
            raise FuncoptError(f"index {index} is out of range for {self.k} configurations.")
        if index not in self.kept:
            raise FuncoptError(
                f"configuration {index} was dropped after {self.steps_trained[index]} steps; only "
                f"the survivors' params are kept: {self.kept}."
            )
        pos = self.kept.index(index)
        return select(self.params, pos), select(self.opt_state, pos)

    def best(self, metric: str | None = None) -> BestConfig:
        """The best configuration by ``metric`` (default: the sweep's), with its params and state."""
        i = self.ranking(metric)[0]
        params, state = self.select(i)
        value = float(self.final(metric)[i])
        return BestConfig(i, {n: v[i] for n, v in self.hparams.items()}, value, params, state,
                          None if self.seeds is None else self.seeds[i])

    def to_rows(self, sort: bool = True) -> list[dict[str, Any]]:
        """One dict per configuration: index, hyperparameters, seed, steps, final loss and metrics."""
        finals = {"loss": self.final("loss"), **{n: self.final(n) for n in self.evals}}
        order = self.ranking() if sort else range(self.k)
        rows = []
        for i in order:
            row: dict[str, Any] = {"config": i, **{n: v[i] for n, v in self.hparams.items()}}
            if self.seeds is not None:
                row["seed"] = self.seeds[i]
            row["steps"] = self.steps_trained[i]
            row.update({n: float(v[i]) for n, v in finals.items()})
            rows.append(row)
        return rows

    def table(self, max_rows: int | None = None) -> str:
        """The rows of :meth:`to_rows` as an aligned text table, best first."""
        rows = self.to_rows()[:max_rows]
        cols = list(rows[0])
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        cells = [[fmt(r[c]) for c in cols] for r in rows]
        widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(cols)]
        line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
        head = f"{self.k} configurations, ranked by {self.metric} ({self.mode}), {self.seconds:.2f} s, step_mode={self.step_mode}"
        return "\n".join([head, line(cols), line(["-" * w for w in widths]), *map(line, cells)])

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | None = None, metric: str | None = None) -> Any:
        """Plots ``metric`` against each hyperparameter (one panel each, log x where the values
        are positive and span a factor of 10 or more); saves to ``path`` if given.

        Returns the ``matplotlib.figure.Figure``. Needs matplotlib.
        """
        from matplotlib.figure import Figure

        name = metric or self.metric
        y = self.final(name).numpy()
        names = list(self.hparams) or ["config"]
        fig = Figure(figsize=(4.0 * len(names), 3.4), dpi=100, layout="constrained")
        axes = fig.subplots(1, len(names), squeeze=False)[0]
        best = self.ranking(metric)[0]
        for ax, hp in zip(axes, names):
            x = self.hparams[hp] if hp in self.hparams else list(range(self.k))
            others = [n for n in self.hparams if n != hp]
            colour = self.hparams[others[0]] if others else None
            sc = ax.scatter(x, y, c=colour, cmap="viridis", s=28, alpha=0.85,
                            norm=_colour_norm(colour) if colour else None)
            ax.scatter([x[best]], [y[best]], s=120, facecolors="none", edgecolors="red", label="best")
            if others:
                fig.colorbar(sc, ax=ax, label=others[0])
            scale = _axis_scale(x)
            if scale == "log":
                ax.set_xscale("log")
            elif scale:
                ax.set_xscale("symlog", linthresh=scale)
            ax.set_xlabel(hp)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=8)
        if path is not None:
            fig.savefig(path)
        return fig


def _axis_scale(values: Sequence[float]) -> str | float | None:
    """"log" for positive values spanning a factor >= 10; for such values plus zeros, the
    smallest positive value (the linear threshold of a symlog axis); else None (linear)."""
    positive = [v for v in values if v > 0]
    if not positive or max(positive) / min(positive) < 10 or any(v < 0 for v in values):
        return None
    return "log" if len(positive) == len(values) else min(positive)


def _colour_norm(values: Sequence[float]) -> Any:
    from matplotlib.colors import LogNorm, SymLogNorm

    scale = _axis_scale(values)
    if scale == "log":
        return LogNorm(min(values), max(values))
    if scale:
        return SymLogNorm(linthresh=scale, vmin=0.0, vmax=max(values))
    return None


def _rank_positions(run: _Run, plan: _Plan) -> list[int]:
    scores = run.losses[:, -1] if plan.metric == "loss" else run.evals[plan.metric][:, -1]
    sign = -1.0 if plan.mode == "max" else 1.0
    vals = [math.inf if math.isnan(v) else sign * v for v in scores.double().tolist()]
    return sorted(range(len(vals)), key=lambda i: vals[i])


class _History:
    """Collects per-configuration losses and evaluations from runs of subsets."""

    def __init__(self, k: int, steps: int):
        self.loss = torch.full((k, steps), float("nan"), dtype=torch.float64)
        self.evals: dict[str, dict[int, torch.Tensor]] = {}
        self.trained = [0] * k

    def record(self, run: _Run, start: int, stop: int) -> None:
        self.loss[run.indices, start:stop] = run.losses.double()
        for i in run.indices:
            self.trained[i] = stop
        for name, v in run.evals.items():
            cols = self.evals.setdefault(name, {})
            for j, st in enumerate(run.eval_steps):
                col = cols.setdefault(st, torch.full((self.loss.shape[0],), float("nan"), dtype=torch.float64))
                col[run.indices] = v[:, j].double()

    def result(self, plan: _Plan, run: _Run, seconds: float) -> SweepResult:
        steps = sorted({st for cols in self.evals.values() for st in cols})
        evals = {
            n: torch.stack([cols.get(st, torch.full((plan.k,), float("nan"), dtype=torch.float64)) for st in steps], dim=1)
            for n, cols in self.evals.items()
        }
        return SweepResult(
            dict(plan.values), self.loss, evals, steps, list(self.trained), run.params, run.state,
            list(run.indices), plan.tx, plan.metric, plan.mode, plan.step_mode, plan.step_reason,
            seconds, plan.seeds,
        )
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
