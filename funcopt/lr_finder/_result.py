"""The result of the LR finder: :class:`LRFinderResult`, a frozen value holding the curve,
the suggestion rules, ``to_dict``/``from_dict`` and the matplotlib plot (matplotlib is
imported only inside :meth:`LRFinderResult.plot`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from collections.abc import Iterable, Sequence

from funcopt.base import FuncoptError
from funcopt.lr_finder._ladder import _check_int
from funcopt.lr_finder._rules import SUGGESTION_METHODS, _suggest

__all__ = ["LRFinderResult"]


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
