"""What a sweep returns: :class:`SweepResult` (histories, stacked final params and states,
ranking, table, plot) and :class:`BestConfig`, plus the private history collector that builds
a result from runs of subsets of the configurations. matplotlib is imported only in ``plot``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from funcopt.base import FuncoptError, GradientTransformation, PyTree, stable_name
from funcopt.sweep._engine import _Plan, _Run
from funcopt.sweep._stacked import select

__all__ = ["SweepResult", "BestConfig"]


# ---------------------------------------------------------------------------------------------
# Results


@stable_name("funcopt.BestConfig")
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
