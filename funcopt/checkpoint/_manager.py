"""``CheckpointManager``: numbered checkpoints in a directory, pruned safely; like orbax's manager.

Each checkpoint is one :func:`funcopt.checkpoint.save` file named ``<prefix>_<step>.safetensors``
(10-digit zero-padded step). A file gets its final name only by an atomic rename after it was
completely written and fsynced, so :meth:`CheckpointManager.latest_step` never returns a
half-written checkpoint; old checkpoints are deleted only after the new one is complete.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Union

import torch

from funcopt.base import PyTree
from funcopt.checkpoint._files import DirectoryLock, drop_cached_pages, remove_stale_temporaries
from funcopt.checkpoint._format import CheckpointError
from funcopt.checkpoint._io import DeviceSpec, inspect, load, save

__all__ = ["CheckpointManager"]

BestFn = Union[str, Callable[[Mapping[str, Any]], float], None]


class CheckpointManager:
    """Keeps the last (or best) checkpoints of a training run in ``directory``, like ``orbax.checkpoint.CheckpointManager``.

    Args:
        directory: where checkpoints live (created if missing).
        max_to_keep: how many checkpoints to keep; ``None`` keeps all.
        keep_best: ``None`` keeps the ``max_to_keep`` newest. A metric name (a key of the
            ``metrics`` given to :meth:`save`) or a function ``metrics -> float`` keeps the
            ``max_to_keep`` best instead (smallest with ``best_mode="min"``), plus always the
            newest, so training can resume. Checkpoints without the metric rank last.
        best_mode: ``"min"`` or ``"max"``.
        prefix: file name prefix.

    Example:
        >>> mgr = funcopt.checkpoint.CheckpointManager("ckpts", max_to_keep=3)
        >>> mgr.save(step, {"params": params, "opt_state": state}, metrics={"loss": loss})
        >>> tree = mgr.restore(like={"params": params0, "opt_state": tx.init(params0)})

    Temporary files left by a killed save (funcopt's own, whose process is gone) are removed when
    a manager is created and by every save. One writer per directory and prefix: the first
    :meth:`save` takes the lock file ``.<prefix>.lock`` (an advisory ``flock`` holding the owner's
    pid, released when the process exits or on :meth:`close`), and a manager of another process
    saving into the same directory raises :class:`CheckpointError` naming the owner; within one
    process a newer manager takes the lock over and the older one may no longer save. Readers
    (``restore``, ``latest_step``...) take no lock.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_to_keep: int | None = 3,
        keep_best: BestFn = None,
        *,
        best_mode: str = "min",
        prefix: str = "ckpt",
    ) -> None:
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                        or max_to_keep < 1):
            raise CheckpointError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}.")
        if best_mode not in ("min", "max"):
            raise CheckpointError(f"best_mode must be 'min' or 'max', got {best_mode!r}.")
        if keep_best is not None and not isinstance(keep_best, str) and not callable(keep_best):
            raise CheckpointError(f"keep_best must be a metric name, a function metrics -> float, or None; got {keep_best!r}.")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
            raise CheckpointError(f"prefix must be letters, digits, '_', '.' or '-', got {prefix!r}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep = max_to_keep
        self.keep_best = keep_best
        self.best_mode = best_mode
        self.prefix = prefix
        self._pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)\.safetensors$")
        self._metrics: dict[int, dict[str, Any]] = {}
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create the checkpoint directory {self.directory}: {e.strerror or e}.",
                                  self.directory) from None
        if not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory} is not a directory.", self.directory)
        self._lock = DirectoryLock(os.path.join(self.directory, f".{prefix}.lock"))
        remove_stale_temporaries(self.directory)

    def close(self) -> None:
        """Releases the writer lock (if this manager saved); the manager can still read, and save again."""
        self._lock.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def path(self, step: int) -> str:
        """The file of checkpoint ``step`` (whether or not it exists)."""
        return os.path.join(self.directory, f"{self.prefix}_{step:010d}.safetensors")

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints in the directory, ascending."""
        steps = []
        for name in os.listdir(self.directory):
            m = self._pattern.match(name)
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None`` when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def metrics(self, step: int) -> dict[str, Any]:
        """The ``metrics`` saved with checkpoint ``step`` (read from its header only)."""
        if step not in self._metrics:
            meta = inspect(self.path(step)).metadata
            self._metrics[step] = dict(meta.get("metrics") or {})
        return self._metrics[step]

    def _score(self, step: int) -> float:
        try:
            metrics = self.metrics(step)
            value = metrics[self.keep_best] if isinstance(self.keep_best, str) else self.keep_best(metrics)
            value = float(value)
        except (KeyError, TypeError, ValueError, CheckpointError):
            return math.inf
        if math.isnan(value):
            return math.inf
        return value if self.best_mode == "min" else -value

    def best_step(self) -> int | None:
        """The step with the best metric (needs ``keep_best``); ties go to the newer step."""
        if self.keep_best is None:
            raise CheckpointError("best_step needs keep_best= (a metric name or function) on the manager.")
        steps = self.all_steps()
        if not steps:
            return None
        return min(reversed(steps), key=self._score)

    def _to_keep(self, steps: Sequence[int]) -> set[int]:
        if self.max_to_keep is None:
            return set(steps)
        if self.keep_best is None:
            return set(steps[-self.max_to_keep:])
        ranked = sorted(steps, key=lambda s: (self._score(s), -s))
        return set(ranked[: self.max_to_keep]) | {steps[-1]}

    def save(
        self,
        step: int,
        tree: PyTree,
        *,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Writes checkpoint ``step`` atomically, then prunes old ones; returns its path.

        ``metrics`` (JSON numbers, e.g. ``{"loss": 0.31}``) rank checkpoints for ``keep_best``;
        0-dim tensors are converted to floats. Saving an existing step replaces it.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"step must be a non-negative int, got {step!r}.")
        clean: dict[str, Any] = {}
        for k, v in dict(metrics or {}).items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise CheckpointError(f"metric {k!r} must be a number or a one-element tensor, got shape {tuple(v.shape)}.")
                v = v.detach().to("cpu").reshape(()).tolist()
            clean[str(k)] = v
        meta = dict(metadata or {})
        if "metrics" in meta:
            raise CheckpointError("metadata may not use the key 'metrics'; pass metrics= instead.")
        meta["metrics"] = clean
        meta.setdefault("step", step)
        self._lock.acquire(f"CheckpointManager({self.directory!r}, prefix={self.prefix!r}).save")
        previous = self._metrics.get(step)
        self._metrics[step] = clean
        existing = self.all_steps()
        keep = self._to_keep(sorted({*existing, step}))
        for old in existing:  # the files this save will prune: free their page cache for the new file
            if old not in keep:
                drop_cached_pages(self.path(old))
        try:
            path = save(self.path(step), tree, metadata=meta, step=step)
        except BaseException:
            self._metrics.pop(step, None)
            if previous is not None:
                self._metrics[step] = previous
            raise
        steps = self.all_steps()
        keep = self._to_keep(steps)
        for old in steps:
            if old not in keep:
                try:
                    os.remove(self.path(old))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise CheckpointError(f"checkpoint {path} was saved, but removing the old {self.path(old)} "
                                          f"failed: {e.strerror or e}.", self.path(old)) from None
                self._metrics.pop(old, None)
        return path

    def restore(
        self,
        step: int | None = None,
        *,
        like: PyTree = None,
        device: DeviceSpec = None,
        dtype: Any = None,
        paths: str | Sequence[str] | None = None,
    ) -> PyTree:
        """Loads checkpoint ``step`` (default: the latest) with :func:`funcopt.checkpoint.load`.

        Raises:
            CheckpointError: when the directory holds no checkpoint, or ``step`` is not among
                :meth:`all_steps`, or the file is damaged.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(
                    f"no checkpoints in {self.directory} (looked for {self.prefix}_<step>.safetensors). "
                    "Start from scratch, or point the manager at the right directory/prefix.")
        elif step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}.")
        return load(self.path(step), like=like, device=device, dtype=dtype, paths=paths)

    def __repr__(self) -> str:
        return (f"CheckpointManager({self.directory!r}, max_to_keep={self.max_to_keep}, "
                f"keep_best={self.keep_best!r}, steps={self.all_steps()})")
