"""The learning-rate range test ("LR finder") and its vmapped sweep variant.

:func:`lr_find` trains a *copy* of the parameters for up to ``num_steps`` steps while the
learning rate climbs a ladder from ``min_lr`` to ``max_lr``, recording the loss at every step
(the test of Smith 2017, as in fast.ai's and PyTorch Lightning's ``lr_find``).
:func:`lr_sweep` instead trains K copies at K fixed learning rates of the same ladder, all in
parallel under ``torch.func.vmap``, and records the loss each reaches after ``steps`` steps.

Both are pure functions of their inputs: the caller's params and optimizer state are never
modified, nothing is written to disk (no temporary checkpoint to restore or to leave behind
after a crash), and a failure leaves nothing to clean up. Both return an
:class:`LRFinderResult`, which holds the curve, the suggestion rules (``steepest``,
``valley``, ``minimum``, ``best``), a matplotlib plot and ``to_dict()`` for logging.

References: L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017,
arXiv 1506.01186.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable
from collections.abc import Iterable, Iterator, Sequence

import optree
import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree, apply_updates
from funcopt.inject import InjectHyperparamsState, inject_hyperparams

__all__ = ["LRFinderResult", "SUGGESTION_METHODS", "lr_ladder", "lr_find", "lr_sweep"]

SUGGESTION_METHODS = ("steepest", "valley", "minimum", "best")
"""The rules :meth:`LRFinderResult.suggestion` knows."""

_MIN_POINTS = {"steepest": 2, "valley": 2, "minimum": 1, "best": 1}
_MODES = ("exponential", "linear")


# ---------------------------------------------------------------------------------------------
# Argument checks (Python values only; the loops below never branch on tensor values)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise FuncoptError(f"{name} must be an integer >= {low}, got {value!r}.")


def lr_ladder(min_lr: float, max_lr: float, num: int, mode: str = "exponential") -> list[float]:
    """The ``num`` learning rates of a range test, like ``numpy.geomspace`` (or ``linspace``).

    ``mode='exponential'`` spaces them evenly in log space, ``'linear'`` evenly in linear
    space. Both endpoints are hit exactly: the first rung is ``min_lr``, the last ``max_lr``.

    Args:
        min_lr: the first learning rate, > 0.
        max_lr: the last learning rate, > ``min_lr``.
        num: the number of rungs, >= 2.
        mode: ``'exponential'`` (default) or ``'linear'``.

    Returns:
        A list of ``num`` increasing Python floats.
    """
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if not _is_real(value) or not math.isfinite(value) or value <= 0:
            raise FuncoptError(f"{name} must be a finite number > 0, got {value!r}.")
    if not max_lr > min_lr:
        raise FuncoptError(f"max_lr ({max_lr!r}) must be greater than min_lr ({min_lr!r}).")
    _check_int("the number of learning rates", num, 2)
    if mode not in _MODES:
        raise FuncoptError(f"mode must be 'exponential' or 'linear', got {mode!r}.")
    last = num - 1
    if mode == "exponential":
        lo, hi = math.log(min_lr), math.log(max_lr)
        out = [math.exp(lo + (hi - lo) * i / last) for i in range(num)]
    else:
        out = [min_lr + (max_lr - min_lr) * i / last for i in range(num)]
    out[0], out[-1] = float(min_lr), float(max_lr)
    return out


# ---------------------------------------------------------------------------------------------
# Suggestion rules over plain Python lists


def _window(
    lrs: Sequence[float], losses: Sequence[float], skip_begin: int, skip_end: int
) -> tuple[list[int], list[float], list[float]]:
    """The points between the skips whose loss is finite: (indices, log lrs, losses)."""
    keep = [i for i in range(skip_begin, len(lrs) - skip_end) if math.isfinite(losses[i])]
    return keep, [math.log(lrs[i]) for i in keep], [losses[i] for i in keep]


def _slopes(x: list[float], y: list[float]) -> list[float]:
    """dy/dx at every point, with ``numpy.gradient``'s rule for uneven spacing.

    Interior points use the second-order central difference, the two ends one-sided first
    differences. Uneven spacing arises when non-finite points were dropped.
    """
    n = len(x)
    out = [(y[1] - y[0]) / (x[1] - x[0])]
    for i in range(1, n - 1):
        hd, hs = x[i] - x[i - 1], x[i + 1] - x[i]
        out.append((hd * hd * y[i + 1] - hs * hs * y[i - 1] + (hs * hs - hd * hd) * y[i]) / (hs * hd * (hd + hs)))
    out.append((y[-1] - y[-2]) / (x[-1] - x[-2]))
    return out


def _argmin(values: list[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)


def _longest_descent(y: list[float]) -> tuple[int, int]:
    """(start, length in steps) of the first longest strictly decreasing run of ``y``."""
    best_start, best_len, run_start = 0, 0, 0
    for i in range(1, len(y)):
        if y[i] < y[i - 1]:
            if i - run_start > best_len:
                best_start, best_len = run_start, i - run_start
        else:
            run_start = i
    return best_start, best_len


def _suggest(lrs: Sequence[float], losses: Sequence[float], method: str, skip_begin: int, skip_end: int) -> float:
    if method not in SUGGESTION_METHODS:
        raise FuncoptError(f"Unknown suggestion method {method!r}; choose one of {list(SUGGESTION_METHODS)}.")
    _check_int("skip_begin", skip_begin, 0)
    _check_int("skip_end", skip_end, 0)
    keep, x, y = _window(lrs, losses, skip_begin, skip_end)
    need = _MIN_POINTS[method]
    if len(x) < need:
        raise FuncoptError(
            f"The {method!r} suggestion needs at least {need} finite loss value(s) after skipping the "
            f"first {skip_begin} and last {skip_end} of the {len(lrs)} recorded points, but found "
            f"{len(x)}. Record more points (a larger num_steps, a wider lr range, a larger "
            "diverge_threshold) or pass smaller skip_begin/skip_end."
        )
    if method == "steepest":
        index = _argmin(_slopes(x, y))
    elif method == "valley":
        start, length = _longest_descent(y)
        index = start + length // 3 + length // 6
    else:
        index = _argmin(y)
    lr = lrs[keep[index]]
    return lr / 10.0 if method == "minimum" else lr


# ---------------------------------------------------------------------------------------------
# The result


def _floats(values: Iterable[Any]) -> tuple[float, ...]:
    return tuple(float("nan") if v is None else float(v) for v in values)


@dataclasses.dataclass(frozen=True, repr=False)
class LRFinderResult:
    """The curve of a range test (:func:`lr_find`) or sweep (:func:`lr_sweep`) and its rules.

    Like the object returned by Lightning's ``Tuner.lr_find`` or fastai's ``Learner.lr_find``,
    but a frozen value: it can be built by hand (e.g. from logged numbers), compared and logged.

    Attributes:
        lrs: the learning rates of the recorded points, strictly increasing and > 0.
        losses: the curve the rules read. For ``lr_find`` the bias-corrected exponential moving
            average of ``raw_losses``; for ``lr_sweep`` the loss after ``steps`` steps.
        raw_losses: the unsmoothed losses (defaults to ``losses``).
        stopped_early: ``lr_find`` stopped before the last rung (divergence or a NaN/Inf loss).
        kind: ``'lr_find'`` or ``'lr_sweep'``.
        skip_begin: points skipped at the start by the rules unless a call says otherwise.
        skip_end: points skipped at the end likewise.
        default_method: the rule :meth:`suggestion` uses when given no method.
        train_losses: for ``lr_sweep``, the training loss of each learning rate at each step
            (``len(lrs)`` rows of ``steps`` values); ``None`` for ``lr_find``.
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    raw_losses: tuple[float, ...] | None = None
    stopped_early: bool = False
    kind: str = "lr_find"
    skip_begin: int = 10
    skip_end: int = 1
    default_method: str = "steepest"
    train_losses: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        lrs, losses = _floats(self.lrs), _floats(self.losses)
        raw = losses if self.raw_losses is None else _floats(self.raw_losses)
        if not (len(lrs) == len(losses) == len(raw)):
            raise FuncoptError(
                f"LRFinderResult needs as many lrs as losses and raw_losses, got {len(lrs)}, "
                f"{len(losses)} and {len(raw)}."
            )
        for i, lr in enumerate(lrs):
            if not (math.isfinite(lr) and lr > 0) or (i and lr <= lrs[i - 1]):
                raise FuncoptError(
                    f"LRFinderResult.lrs must be finite, > 0 and strictly increasing; lrs[{i}] = {lr!r}"
                    + (f" follows {lrs[i - 1]!r}." if i else ".")
                )
        if self.kind not in ("lr_find", "lr_sweep"):
            raise FuncoptError(f"kind must be 'lr_find' or 'lr_sweep', got {self.kind!r}.")
        if self.default_method not in SUGGESTION_METHODS:
            raise FuncoptError(f"default_method must be one of {list(SUGGESTION_METHODS)}, got {self.default_method!r}.")
        _check_int("skip_begin", self.skip_begin, 0)
        _check_int("skip_end", self.skip_end, 0)
        object.__setattr__(self, "lrs", lrs)
        object.__setattr__(self, "losses", losses)
        object.__setattr__(self, "raw_losses", raw)
        object.__setattr__(self, "stopped_early", bool(self.stopped_early))
        if self.train_losses is not None:
            object.__setattr__(self, "train_losses", tuple(_floats(row) for row in self.train_losses))

    def suggestion(self, method: str | None = None, *, skip_begin: int | None = None, skip_end: int | None = None) -> float:
        """The suggested learning rate by one rule (like Lightning's ``lr_finder.suggestion()``).

        Every rule first keeps the points between the first ``skip_begin`` and the last
        ``skip_end`` and drops those whose loss is NaN or infinite, then reads ``losses``:

        * ``'steepest'``: the lr where the loss falls fastest against log lr: the most negative
          slope, with ``numpy.gradient``'s central differences over log lr (which stay correct
          when dropped points leave uneven spacing). Lightning uses the slope against lr in
          linear units, which favours tiny lrs on an exponential ladder.
        * ``'valley'``: fast.ai's rule: the first longest strictly decreasing run of the loss,
          starting at point ``s`` and ``L`` steps long, gives point ``s + L // 3 + L // 6``.
        * ``'minimum'``: the lr of the lowest loss, divided by 10 (fast.ai's ``minimum``).
        * ``'best'``: the lr of the lowest loss itself; the default for :func:`lr_sweep`, whose
          curve is the loss each lr reaches after the same training.

        Args:
            method: one of ``SUGGESTION_METHODS``; defaults to ``self.default_method``.
            skip_begin: points skipped at the start (default ``self.skip_begin``: 10 for
                ``lr_find``, 0 for ``lr_sweep``).
            skip_end: points skipped at the end (default ``self.skip_end``: 1 or 0).

        Returns:
            The learning rate as a Python float.

        Raises:
            FuncoptError: for an unknown method, or too few finite points left for the rule.
        """
        return _suggest(
            self.lrs,
            self.losses,
            method or self.default_method,
            self.skip_begin if skip_begin is None else skip_begin,
            self.skip_end if skip_end is None else skip_end,
        )

    def suggestions(self) -> dict[str, float | None]:
        """Every rule's suggestion with the default skips; ``None`` where a rule lacks points."""
        out: dict[str, float | None] = {}
        for method in SUGGESTION_METHODS:
            try:
                out[method] = self.suggestion(method)
            except FuncoptError:
                out[method] = None
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite losses become ``None``); :meth:`from_dict` inverts it."""

        def clean(values: Iterable[float]) -> list[float | None]:
            return [v if math.isfinite(v) else None for v in values]

        return {
            "kind": self.kind,
            "lrs": list(self.lrs),
            "losses": clean(self.losses),
            "raw_losses": clean(self.raw_losses or ()),
            "stopped_early": self.stopped_early,
            "skip_begin": self.skip_begin,
            "skip_end": self.skip_end,
            "default_method": self.default_method,
            "suggestions": self.suggestions(),
            "train_losses": None if self.train_losses is None else [clean(r) for r in self.train_losses],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LRFinderResult:
        """Rebuilds a result from :meth:`to_dict`'s output (``None`` losses become NaN)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def __repr__(self) -> str:
        n = len(self.lrs)
        span = f"{self.lrs[0]:.3g}..{self.lrs[-1]:.3g}" if n else "empty"
        try:
            tip = f", {self.default_method}={self.suggestion():.3g}"
        except FuncoptError:
            tip = ""
        return f"LRFinderResult(kind={self.kind!r}, points={n}, lr {span}, stopped_early={self.stopped_early}{tip})"

    def plot(
        self,
        path: str | None = None,
        ax: Any = None,
        suggestions: str | Sequence[str] | None = None,
        *,
        show_raw: bool = True,
        title: str | None = None,
    ) -> Any:
        """Draws the loss against the learning rate on a log axis, suggestions marked.

        Like Lightning's ``lr_finder.plot(suggest=True)``; needs matplotlib (the ``plot`` extra),
        imported only here.

        Args:
            path: if given, the figure is saved there (format from the suffix) and, when this
                call created it, closed.
            ax: a matplotlib ``Axes`` to draw into; a new figure is made by default.
            suggestions: a rule name, a sequence of them, ``'all'``, or ``None`` for
                ``self.default_method``. A rule without enough points is left out.
            show_raw: also draw the unsmoothed losses of ``lr_find`` faintly.
            title: the axes title (default names the kind of test).

        Returns:
            The matplotlib ``Axes``.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("LRFinderResult.plot needs matplotlib: pip install 'funcopt[plot]'.") from e
        if suggestions is None:
            methods: Sequence[str] = (self.default_method,)
        elif suggestions == "all":
            methods = SUGGESTION_METHODS
        elif isinstance(suggestions, str):
            methods = (suggestions,)
        else:
            methods = tuple(suggestions)
        for m in methods:
            if m not in SUGGESTION_METHODS:
                raise FuncoptError(f"Unknown suggestion method {m!r}; choose from {list(SUGGESTION_METHODS)} or 'all'.")
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        finite = [(lr, v) for lr, v in zip(self.lrs, self.losses) if math.isfinite(v)]
        sweep = self.kind == "lr_sweep"
        raw = show_raw and not sweep and self.raw_losses != self.losses
        if raw:
            ax.plot(self.lrs, self.raw_losses, color="tab:blue", alpha=0.25, lw=1, label="raw loss")
        ax.plot(
            [p[0] for p in finite],
            [p[1] for p in finite],
            color="tab:blue",
            marker="o" if sweep else None,
            ms=4,
            lw=1.8,
            label=f"loss after {len(self.train_losses[0]) if self.train_losses else '?'} steps" if sweep else "smoothed loss",
        )
        if finite:
            lows = [v for _, v in finite]
            first, low, high = lows[0], min(lows), max(lows)
            if raw:
                low = min([low] + [v for v in self.raw_losses or () if math.isfinite(v)])
            top = min(high, first + 1.5 * (first - low)) if first > low else high
            margin = 0.05 * (top - low) or 0.05 * abs(top) or 0.05
            ax.set_ylim(low - margin, top + margin)
            bad = [lr for lr, v in zip(self.lrs, self.losses) if not math.isfinite(v) or v > top + margin]
            if bad:
                ax.plot(bad, [top + margin * 0.5] * len(bad), "x", color="tab:gray", label="off scale / NaN")
        markers = {"steepest": ("tab:red", "o"), "valley": ("tab:green", "s"), "minimum": ("tab:purple", "D"), "best": ("tab:orange", "*")}
        log_lrs = [math.log(p[0]) for p in finite]
        for m in methods:
            try:
                lr = self.suggestion(m)
            except FuncoptError:
                continue
            color, marker = markers[m]
            y = _interp(math.log(lr), log_lrs, [p[1] for p in finite])
            ax.axvline(lr, color=color, ls=":", lw=1)
            ax.plot([lr], [y], marker=marker, color=color, ms=8, ls="none", label=f"{m}: {lr:.2e}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final loss" if sweep else "loss")
        ax.set_title(title or ("LR sweep (vmap)" if sweep else "LR range test"))
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        if path is not None:
            ax.figure.savefig(path, bbox_inches="tight")
            if own:
                plt.close(ax.figure)
        return ax


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Linear interpolation of ``ys`` at ``x`` (clamped at the ends), like ``numpy.interp``."""
    if not xs:
        return float("nan")
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


# ---------------------------------------------------------------------------------------------
# Shared machinery: optimizer preparation, data cycling, gradients, progress bar


def _map_injected(state: Any, fn: Callable[[InjectHyperparamsState], InjectHyperparamsState]) -> Any:
    """Rebuilds ``state`` with ``fn`` applied to every ``InjectHyperparamsState`` in it.

    Walks dicts, lists, tuples and NamedTuples; an injected state is visited before the states
    nested in it, so every walk meets them in the same order.
    """
    if isinstance(state, InjectHyperparamsState):
        node = fn(state)
        return node._replace(inner_state=_map_injected(node.inner_state, fn))
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_map_injected(c, fn) for c in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_map_injected(c, fn) for c in state)
    if isinstance(state, dict):
        return {k: _map_injected(c, fn) for k, c in state.items()}
    return state


def _injected_with_lr(state: Any) -> list[InjectHyperparamsState]:
    found: list[InjectHyperparamsState] = []

    def collect(node: InjectHyperparamsState) -> InjectHyperparamsState:
        if "learning_rate" in node.hyperparams:
            found.append(node)
        return node

    _map_injected(state, collect)
    return found


class _LrSetter:
    """Sets the learning rate of every ``inject_hyperparams`` state found in a state tree.

    The first state found is the reference: it gets the ladder value; every other one keeps
    its initial ratio to the reference (param groups with their own injected optimizers).
    """

    def __init__(self, state: Any) -> None:
        nodes = _injected_with_lr(state)
        if not nodes:
            raise FuncoptError(
                "The optimizer's state holds no injected 'learning_rate'. Pass a factory taking "
                "learning_rate (e.g. funcopt.adam, or lambda learning_rate: funcopt.sgd(learning_rate, "
                "momentum=0.9)) or funcopt.inject_hyperparams(factory)(learning_rate=...)."
            )
        values = [float(n.hyperparams["learning_rate"]) for n in nodes]
        if len(values) > 1 and values[0] == 0:
            raise FuncoptError(
                "The first injected learning_rate is 0, so the ratios of the other param groups to it "
                "are undefined; build the optimizer with non-zero learning rates."
            )
        self.ratios = [1.0] + [v / values[0] for v in values[1:]]

    def __call__(self, state: Any, lr: float) -> Any:
        ratios = iter(self.ratios)

        def set_lr(node: InjectHyperparamsState) -> InjectHyperparamsState:
            if "learning_rate" not in node.hyperparams:
                return node
            old = node.hyperparams["learning_rate"]
            new = torch.as_tensor(lr, dtype=old.dtype, device=old.device) * next(ratios)
            return node._replace(hyperparams=dict(node.hyperparams, learning_rate=new))

        return _map_injected(state, set_lr)

    def check(self, state: Any, lr: float | list[float]) -> None:
        """Raises if the reference learning rate after an update is not the one set (a schedule)."""
        now = _injected_with_lr(state)[0].hyperparams["learning_rate"]
        if not torch.equal(now, torch.as_tensor(lr, dtype=now.dtype, device=now.device)):
            raise FuncoptError(
                "The optimizer's injected learning_rate is a schedule, which overrides the value the "
                "range test sets each step. Build it with a constant learning_rate, or pass the factory."
            )


def _prepare(optimizer: Any, params: PyTree, opt_state: Any, first_lr: float) -> tuple[GradientTransformation, Any, _LrSetter]:
    if isinstance(optimizer, GradientTransformation):
        tx = optimizer
        state = tx.init(params) if opt_state is None else opt_state
    elif callable(optimizer):
        if opt_state is not None:
            raise FuncoptError(
                "opt_state is accepted only with an inject_hyperparams transformation (whose state it "
                "is); with a factory the state is built from params."
            )
        try:
            names = inspect.signature(optimizer).parameters
        except (TypeError, ValueError):
            names = None
        if names is not None and "learning_rate" not in names and not any(p.kind is p.VAR_KEYWORD for p in names.values()):
            raise FuncoptError(
                f"The optimizer factory {getattr(optimizer, '__name__', optimizer)!r} has no "
                f"learning_rate argument (it takes {list(names)}). Wrap it: "
                "lambda learning_rate: my_factory(lr=learning_rate)."
            )
        tx = inject_hyperparams(optimizer)(learning_rate=float(first_lr))
        state = tx.init(params)
    else:
        raise TypeError(
            f"optimizer must be an optimizer factory taking learning_rate (e.g. funcopt.adam) or an "
            f"inject_hyperparams transformation, got {type(optimizer).__name__}."
        )
    return tx, state, _LrSetter(state)


def _check_params(params: PyTree, where: str) -> None:
    leaves = _tree.leaves(params)
    if not leaves:
        raise FuncoptError(f"{where}: params has no tensor leaves; pass the parameters to train.")
    for path, leaf in zip(_tree.paths(params), leaves):
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            what = f"dtype {leaf.dtype}" if isinstance(leaf, torch.Tensor) else f"type {type(leaf).__name__}"
            raise FuncoptError(
                f"{where}: params leaf {path} has {what}; every leaf is trained, so it must be a "
                "floating-point tensor (close over other values in loss_fn)."
            )


def _scalar_loss(loss_fn: Callable[..., Any]) -> Callable[[PyTree, Any], torch.Tensor]:
    def value(params: PyTree, batch: Any) -> torch.Tensor:
        out = loss_fn(params, batch)
        if isinstance(out, (tuple, list)) and out:
            out = out[0]  # (loss, aux): aux is not used
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"loss_fn must return a 0-dim tensor or a (loss, aux) tuple, got {type(out).__name__}.")
        if out.dim() != 0:
            raise FuncoptError(
                f"loss_fn must return a 0-dim loss, got shape {tuple(out.shape)}; reduce it (e.g. .mean())."
            )
        return out

    return value


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    """Yields batches forever: re-iterates ``data``, or replays a one-shot iterator's batches."""
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be an iterable of batches (a list, a DataLoader...), got {type(data).__name__}.")
    empty = FuncoptError("data yielded no batches; pass a non-empty iterable (e.g. [batch]).")
    if isinstance(data, Iterator):  # a generator or iterator can be read once: keep its batches
        seen = []
        for batch in data:
            seen.append(batch)
            yield batch
        if not seen:
            raise empty
        while True:
            yield from seen
    while True:
        count = 0
        for batch in data:
            count += 1
            yield batch
        if count == 0:
            raise empty


def _accumulated(grad_fn: Callable[..., Any], params: Any, batches: Iterator[Any], k: int) -> tuple[Any, torch.Tensor]:
    """The mean gradient and mean loss over the next ``k`` batches."""
    grads, loss = grad_fn(params, next(batches))
    for _ in range(k - 1):
        g, value = grad_fn(params, next(batches))
        grads, loss = _tree.add(grads, g), loss + value
    if k > 1:
        grads, loss = _tree.scale(1.0 / k, grads), loss / k
    return grads, loss


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False)


# ---------------------------------------------------------------------------------------------
# lr_find


def lr_find(
    loss_fn: Callable[[PyTree, Any], Any],
    params: PyTree,
    optimizer: Callable[..., GradientTransformation] | GradientTransformation,
    data: Iterable[Any],
    *,
    min_lr: float = 1e-8,
    max_lr: float = 1.0,
    num_steps: int = 100,
    mode: str = "exponential",
    smoothing: float = 0.98,
    diverge_threshold: float | None = 4.0,
    accumulate: int = 1,
    progress: bool = True,
    opt_state: Any = None,
) -> LRFinderResult:
    """Runs the learning-rate range test on a copy of ``params``, like Lightning's ``lr_find``.

    Step ``i`` sets the learning rate to rung ``i`` of :func:`lr_ladder`, computes the loss
    and gradient at the current params (the mean over ``accumulate`` batches), records the
    loss, and takes one optimizer step. The recorded curve is smoothed by an exponential
    moving average with bias correction, ``s_i = ema_i / (1 - smoothing ** (i + 1))``, so the
    first smoothed value equals the first loss. The test stops early when a loss is NaN/Inf
    or the smoothed loss exceeds ``diverge_threshold`` times the best so far (for a best loss
    ``b <= 0``: exceeds ``b + (diverge_threshold - 1) * |b|``); that point is still recorded.

    Nothing outside the call changes: ``params`` and ``opt_state`` are only read, no file is
    written, so there is nothing to restore.

    Args:
        loss_fn: ``loss_fn(params, batch)`` returning a 0-dim loss, or ``(loss, aux)``.
        params: the pytree of floating-point tensors to train (a copy is trained).
        optimizer: a factory taking ``learning_rate`` (``funcopt.adam``,
            ``lambda learning_rate: funcopt.sgd(learning_rate, momentum=0.9)``, or one building a
            ``multi_transform`` of param groups from one ``learning_rate``), or an
            ``inject_hyperparams`` transformation. With several injected learning rates (one per
            param group) the first gets the ladder value and the others keep their ratio to it.
        data: an iterable of batches, cycled if it has fewer than ``num_steps * accumulate``.
            A one-shot iterator's batches are kept to be replayed.
        min_lr: the first learning rate (default 1e-8).
        max_lr: the last learning rate (default 1.0).
        num_steps: the number of rungs and steps (default 100).
        mode: ``'exponential'`` (default) or ``'linear'`` spacing of the ladder.
        smoothing: the EMA factor in [0, 1) (default 0.98; 0 turns smoothing off).
        diverge_threshold: the early-stop factor (> 1, default 4.0); ``None`` never stops on
            divergence (NaN/Inf still stop).
        accumulate: batches per step; gradients and the recorded loss are their means.
        progress: show a tqdm bar (ignored when tqdm is not installed).
        opt_state: the state of an ``inject_hyperparams`` transformation to start from (e.g.
            mid-training); by default ``optimizer.init(params)``. It is not modified.

    Returns:
        An :class:`LRFinderResult` with ``kind='lr_find'``; ``result.suggestion()`` gives the
        ``steepest`` rule's learning rate.

    Example:
        >>> result = funcopt.lr_find(loss_fn, params, funcopt.adam, batches, progress=False)
        >>> lr = result.suggestion()            # or result.suggestion("valley")
        >>> result.plot("lr_find.png")

    References: L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", 2017,
    arXiv 1506.01186.
    """
    lrs = lr_ladder(min_lr, max_lr, num_steps, mode)
    if not _is_real(smoothing) or not 0 <= smoothing < 1:
        raise FuncoptError(f"smoothing must be a number in [0, 1), got {smoothing!r}.")
    if diverge_threshold is not None and (not _is_real(diverge_threshold) or not diverge_threshold > 1):
        raise FuncoptError(f"diverge_threshold must be a number > 1 or None, got {diverge_threshold!r}.")
    _check_int("accumulate", accumulate, 1)
    _check_params(params, "lr_find")
    params = _tree.map(lambda p: p.detach(), params)
    tx, state, set_lr = _prepare(optimizer, params, opt_state, lrs[0])
    grad_fn = torch.func.grad_and_value(_scalar_loss(loss_fn))
    batches = _cycle(data)
    raw: list[float] = []
    smooth: list[float] = []
    s, best, stopped = 0.0, math.inf, False
    bar = _bar(progress, num_steps, "lr_find")
    try:
        for i, lr in enumerate(lrs):
            state = set_lr(state, lr)
            grads, loss = _accumulated(grad_fn, params, batches, accumulate)
            value = float(loss)
            raw.append(value)
            if math.isfinite(value):
                s = s + (1.0 - smoothing) / (1.0 - smoothing ** (i + 1)) * (value - s)
                best = min(best, s)
            else:
                s = value
            smooth.append(s)
            bar.update()
            bar.set_postfix_str(f"lr={lr:.2e} loss={s:.4g}")
            diverged = not math.isfinite(s) or (
                diverge_threshold is not None and s - best > (diverge_threshold - 1.0) * abs(best)
            )
            if diverged and i < num_steps - 1:
                stopped = True
                break
            if i == num_steps - 1:
                break
            with torch.no_grad():
                updates, new_state = tx.update(grads, state, params)
                params = apply_updates(params, updates)
            if i == 0:
                set_lr.check(new_state, lr)
            state = new_state
    finally:
        bar.close()
    n = len(raw)
    return LRFinderResult(lrs=lrs[:n], losses=smooth, raw_losses=raw, stopped_early=stopped, kind="lr_find")


# ---------------------------------------------------------------------------------------------
# lr_sweep


def lr_sweep(
    loss_fn: Callable[[PyTree, Any], Any],
    params: PyTree,
    optimizer: Callable[..., GradientTransformation] | GradientTransformation,
    data: Iterable[Any],
    *,
    min_lr: float = 1e-5,
    max_lr: float = 1.0,
    num_lrs: int = 16,
    steps: int = 100,
    mode: str = "exponential",
    eval_batch: Any = None,
    accumulate: int = 1,
    progress: bool = True,
    opt_state: Any = None,
) -> LRFinderResult:
    """Trains ``num_lrs`` copies of ``params`` at the lrs of a ladder in parallel under ``vmap``.

    The vmapped counterpart of :func:`lr_find`: copy ``k`` is trained for ``steps`` steps at
    the fixed learning rate ``lr_ladder(min_lr, max_lr, num_lrs, mode)[k]`` on the same
    batches as every other copy. Params and optimizer states are stacked along a new leading
    axis (``funcopt.tree.stack``) with the learning rate batched in the ``inject_hyperparams``
    state, and every step runs the gradient and the optimizer update under
    ``torch.func.vmap``, so the result equals ``num_lrs`` separate runs (to rounding) at
    about the cost of one run on a ``num_lrs``-times larger batch. The curve is each copy's
    loss on ``eval_batch`` after training; a copy that diverges gives NaN/Inf, which the rules
    ignore. Memory grows ``num_lrs``-fold (params, gradients and optimizer state).

    Args:
        loss_fn: ``loss_fn(params, batch)`` returning a 0-dim loss, or ``(loss, aux)``; it must
            work under ``torch.func.vmap`` (``funcopt.nn.apply`` does).
        params: the pytree of floating-point tensors; only read.
        optimizer: as for :func:`lr_find`.
        data: an iterable of batches, cycled as needed.
        min_lr: the smallest learning rate (default 1e-5).
        max_lr: the largest learning rate (default 1.0).
        num_lrs: K, the number of learning rates (default 16).
        steps: training steps per copy (default 100).
        mode: ``'exponential'`` (default) or ``'linear'`` spacing.
        eval_batch: the batch the final loss is measured on (default: the first batch of data).
        accumulate: batches per step, gradients averaged.
        progress: show a tqdm bar (ignored when tqdm is not installed).
        opt_state: as for :func:`lr_find`; not modified.

    Returns:
        An :class:`LRFinderResult` with ``kind='lr_sweep'``, ``losses == raw_losses`` the final
        losses, ``train_losses`` the per-step training losses, no skips, and ``'best'`` (the lr
        of the lowest final loss) as the default suggestion.

    Example:
        >>> sweep = funcopt.lr_sweep(loss_fn, params, funcopt.adam, batches, num_lrs=16, steps=50)
        >>> lr = sweep.suggestion()  # the lr with the lowest loss after 50 steps
    """
    lrs = lr_ladder(min_lr, max_lr, num_lrs, mode)
    _check_int("steps", steps, 1)
    _check_int("accumulate", accumulate, 1)
    _check_params(params, "lr_sweep")
    params = _tree.map(lambda p: p.detach(), params)
    tx, state0, set_lr = _prepare(optimizer, params, opt_state, lrs[0])
    k = len(lrs)

    # Stack K copies; keep only tensor leaves of the state batched (Python values stay static).
    p_spec = _tree.structure(params)
    p_leaves = _tree.leaves(_tree.stack([params] * k))
    states = [set_lr(state0, lr) for lr in lrs]
    s_flat, s_spec = optree.tree_flatten(states[0], none_is_leaf=False)
    is_tensor = [isinstance(x, torch.Tensor) for x in s_flat]
    static = [None if t else x for x, t in zip(s_flat, is_tensor)]
    flats = [optree.tree_leaves(st, none_is_leaf=False) for st in states]
    s_leaves = [torch.stack([f[j] for f in flats]) for j, t in enumerate(is_tensor) if t]

    def unflatten_state(tensors: list[torch.Tensor]) -> Any:
        it = iter(tensors)
        return optree.tree_unflatten(s_spec, [next(it) if t else v for t, v in zip(is_tensor, static)])

    value_fn = _scalar_loss(loss_fn)
    lane_grad = torch.func.grad_and_value(value_fn)

    def grad_lane(leaves: list[torch.Tensor], batch: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        grads, loss = lane_grad(optree.tree_unflatten(p_spec, leaves), batch)
        return _tree.leaves(grads), loss

    def update_lane(grads: list[torch.Tensor], s_tensors: list[torch.Tensor], leaves: list[torch.Tensor]):
        p = optree.tree_unflatten(p_spec, leaves)
        updates, new_state = tx.update(optree.tree_unflatten(p_spec, grads), unflatten_state(s_tensors), p)
        new_flat, new_spec = optree.tree_flatten(new_state, none_is_leaf=False)
        if new_spec != s_spec or any(not t and v != x for t, v, x in zip(is_tensor, static, new_flat)):
            raise FuncoptError(
                "lr_sweep: the optimizer's update changed the structure or a Python (non-tensor) value of "
                "its state; only tensor state can be batched under vmap."
            )
        return _tree.leaves(apply_updates(p, updates)), [x for x, t in zip(new_flat, is_tensor) if t]

    vgrad = torch.func.vmap(grad_lane, in_dims=(0, None))
    vupdate = torch.func.vmap(update_lane, in_dims=(0, 0, 0))
    vloss = torch.func.vmap(lambda leaves, batch: value_fn(optree.tree_unflatten(p_spec, leaves), batch), in_dims=(0, None))

    batches = _cycle(data)
    first = next(batches)
    batches_from_start = _chain_first(first, batches)
    history: list[torch.Tensor] = []
    bar = _bar(progress, steps, f"lr_sweep (K={k})")
    try:
        for step in range(steps):
            grads, loss = _accumulated(vgrad, p_leaves, batches_from_start, accumulate)
            history.append(loss.detach())
            with torch.no_grad():
                p_leaves, s_leaves = vupdate(grads, s_leaves, p_leaves)
            if step == 0:
                set_lr.check(unflatten_state(s_leaves), lrs)
            bar.update()
        final = vloss(p_leaves, first if eval_batch is None else eval_batch)
    finally:
        bar.close()
    losses = final.detach().double().cpu().tolist()
    train = torch.stack(history, dim=1).double().cpu().tolist()  # (K, steps), one read-back
    return LRFinderResult(
        lrs=lrs,
        losses=losses,
        raw_losses=losses,
        kind="lr_sweep",
        skip_begin=0,
        skip_end=0,
        default_method="best",
        train_losses=train,
    )


def _chain_first(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest
