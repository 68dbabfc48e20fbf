"""Run any funcopt transformation as a ``torch.optim.Optimizer``: :func:`as_torch_optimizer`.

A drop-in for ``torch.optim.AdamW(param_groups, lr=..., betas=...)`` in existing training code
(an ordinary ``loss.backward(); opt.step()`` loop, PyTorch Lightning's ``configure_optimizers``,
every ``torch.optim.lr_scheduler``)::

    opt = funcopt.as_torch_optimizer(funcopt.adamw, [
        {"params": decay, "weight_decay": 0.1},
        {"params": no_decay, "weight_decay": 0.0},
    ], lr=3e-4, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-4, total_steps=1000)

Each param group is a partition of the parameters with its own hyperparameters (its own
transformation built from them) and its own funcopt state; :attr:`FuncoptOptimizer.funcopt_state`
holds them as one pytree, updated by ``tx.update`` exactly as the functional loop does.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable
from collections.abc import Mapping

import optree
import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree
from funcopt.fast import fast_path_of
from funcopt.interop._groups import (
    SWITCHES,
    BuiltSource,
    FactorySource,
    check_switches,
    group_tree,
    is_group_list,
    once,
    provenance,
    translate,
)
from funcopt.interop._lbfgs_loop import LbfgsLoop
from funcopt.interop._plain import state_from_plain, state_to_plain
from funcopt.interop._step import evaluator, gather_grads, groups_transformation, keep_skipped, unalias
from funcopt.interop import _layout as layout
from funcopt.interop._layout import StateView
from funcopt.interop._torch_load import load_torch_state_dict, torch_state_dict

__all__ = ["FuncoptOptimizer", "as_torch_optimizer", "state_to_plain", "state_from_plain"]

_FORMAT_V1 = "funcopt.FuncoptOptimizer/1"  # funcopt 0.2.0's state_dict


class _Group:
    """One param group's params layout, transformation source and funcopt state."""

    def __init__(self, tree: PyTree, where: str, source: FactorySource | BuiltSource):
        self.spec = _tree.structure(tree)
        self.paths = _tree.paths(tree)
        self.where = where
        self.source = source
        self.state: Any = None
        self.written: dict[str, Any] = {}
        self.devices: tuple = ()

    def view(self, leaves: list[torch.Tensor]) -> PyTree:
        return optree.tree_unflatten(self.spec, [p.detach() for p in leaves])


class FuncoptOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a funcopt transformation; see :func:`as_torch_optimizer`.

    ``step()`` gathers each group's ``.grad`` into its params pytree, runs the group's
    ``tx.update`` and writes the new values into the parameters in place (for optimizers with
    a fast route, with torch's multi-tensor kernels updating params and state in place, like
    ``torch.optim.AdamW(fused=True)``). As with torch.optim, ``funcopt_state`` and the tensors
    in ``state_dict()`` are references to the live buffers: clone them before the next step
    if you need a snapshot.
    """

    def __init__(self, tx: Any, params: Any, **kwargs: Any):
        if isinstance(tx, torch.optim.Optimizer) or (isinstance(tx, type) and issubclass(tx, torch.optim.Optimizer)):
            raise TypeError(
                "as_torch_optimizer wraps a funcopt GradientTransformation (funcopt.adam(1e-3)) or a "
                "funcopt factory (funcopt.adam), not a torch.optim optimizer, which can be used directly."
            )
        if not isinstance(tx, GradientTransformation) and (not callable(tx) or isinstance(tx, (str, type))):
            raise TypeError(
                f"as_torch_optimizer expects a GradientTransformation (e.g. funcopt.adam(1e-3)) or an "
                f"optimizer factory (funcopt.adam), got {type(tx).__name__}."
            )
        switches = {k: kwargs.pop(k) for k in SWITCHES if k in kwargs}
        check_switches(switches, "as_torch_optimizer")
        self._loop = LbfgsLoop.take(tx, kwargs)  # torch.optim.LBFGS's max_iter loop, if asked for
        self._factory: Callable[..., GradientTransformation] | None = None
        self._base: dict[str, Any] = {}
        self._built: BuiltSource | None = None
        if isinstance(tx, GradientTransformation):
            if kwargs:
                raise FuncoptError(
                    f"as_torch_optimizer got hyperparameters {sorted(kwargs)} with an already built "
                    "transformation; pass them to its factory instead (funcopt.adam(1e-3)), or pass the "
                    "factory itself: as_torch_optimizer(funcopt.adam, model, lr=1e-3)."
                )
            found = provenance(tx)
            if found is not None:  # built by a funcopt factory: rebuilt from it, hyperparameters injected
                self._factory, self._base = found
            else:
                self._built = BuiltSource(tx)
        else:
            self._factory = tx
            self._base = translate(kwargs, inspect.signature(tx).parameters, f"as_torch_optimizer({tx.__name__})")
        params = once(params)  # a generator (model.parameters()) is read here, once
        self._single = not is_group_list(params)
        groups = [{"params": params}] if self._single else [dict(g) for g in params]
        for i, g in enumerate(groups):
            if "params" not in g:
                raise FuncoptError(f"param_groups[{i}] has no 'params' entry; torch.optim's groups are dicts with 'params'.")
            g["params"] = once(g["params"])
        self._groups: list[_Group] = []
        if self._factory is not None:
            defaults = FactorySource(self._factory, self._base, "").keys()
        else:
            first = group_tree(groups[0]["params"], "" if self._single else "param_groups[0]")
            defaults = self._built.keys(self._built.tx.init(_tree.map(lambda p: p.detach(), first)))  # type: ignore[union-attr]
        defaults.update({k: switches.get(k, None if k != "differentiable" else False) for k in SWITCHES})
        super().__init__(groups, defaults)
        if self._loop is not None:  # shown and read back at each step, as in torch.optim.LBFGS's group
            for group in self.param_groups:
                for k, v in self._loop.group_keys().items():
                    group.setdefault(k, v)

    # -- groups ---------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group, like ``torch.optim.Optimizer.add_param_group``: ``params`` plus any
        hyperparameter of the optimizer (torch's names ``lr``, ``betas``... or funcopt's);
        missing ones take the optimizer's defaults. The group gets its own funcopt state."""
        if not isinstance(param_group, Mapping) or "params" not in param_group:
            raise FuncoptError("add_param_group takes a dict with 'params' (and per-group hyperparameters).")
        i = len(self.param_groups)
        where = "" if self._single else f"param_groups[{i}]"
        tree = group_tree(param_group["params"], where)
        given = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        check_switches({k: v for k, v in given.items() if k in SWITCHES}, where or "param_groups[0]")
        group = dict(param_group)
        group["params"] = _tree.leaves(tree)
        super().add_param_group(group)
        group = self.param_groups[-1]
        leaves = list(group["params"])
        views = [p.detach() for p in leaves]
        label = where or "param_groups[0]"
        if self._factory is not None:
            accepted = inspect.signature(self._factory).parameters
            overrides = {k: v for k, v in translate(given, accepted, label).items() if k in accepted}
            g = _Group(tree, where, FactorySource(self._factory, {**self._base, **overrides}, f" {label}"))
            values = g.source.hyper  # type: ignore[union-attr]
            tx = g.source.build(values)  # type: ignore[union-attr]
            g.state = tx.init(optree.tree_unflatten(g.spec, views))
            keys = g.source.keys(values)  # type: ignore[union-attr]
        else:
            src = self._built
            g = _Group(tree, where, src)  # type: ignore[arg-type]
            g.state = src.tx.init(optree.tree_unflatten(g.spec, views))  # type: ignore[union-attr]
            g.state = src.overrides(g.state, {k: v for k, v in given.items() if k not in SWITCHES}, label)  # type: ignore[union-attr]
            keys = src.keys(g.state)  # type: ignore[union-attr]
        g.state = unalias(g.state, views)
        g.devices = tuple(p.device for p in leaves)
        group.update(keys)
        g.written = dict(keys)
        self._groups.append(g)

    def _transformation(self, i: int) -> GradientTransformation:
        g, group = self._groups[i], self.param_groups[i]
        if isinstance(g.source, FactorySource):
            return g.source.build(g.source.read(group, g.written, g.where or "param_groups[0]"))
        return g.source.tx

    # -- the functional view ------------------------------------------------------------------

    @property
    def transformation(self) -> GradientTransformation:
        """The transformation the next step runs: with one group, over its params pytree; with
        several, over the tuple of the groups' params trees (``funcopt_state``'s layout)."""
        if self._single and len(self._groups) == 1:
            return self._transformation(0)
        return groups_transformation([self._transformation(i) for i in range(len(self._groups))])

    @property
    def funcopt_state(self) -> Any:
        """The funcopt state: the group's ``tx.init``/``tx.update`` state, or a tuple of them,
        one per group, when the optimizer was given param groups."""
        if self._single and len(self._groups) == 1:
            return self._groups[0].state
        return tuple(g.state for g in self._groups)

    @funcopt_state.setter
    def funcopt_state(self, state: Any) -> None:
        current = self.funcopt_state
        if _tree.structure(state) != _tree.structure(current):
            _tree.check_same_structure(state, current, ("new state", "current state"))
        states = [state] if self._single and len(self._groups) == 1 else list(state)
        for i, (g, s) in enumerate(zip(self._groups, states)):
            g.state = s
            if isinstance(g.source, BuiltSource):
                self._publish(i, g.source.keys(s))

    @property
    def params(self) -> PyTree:
        """The parameters as pytrees of detached views (a tuple of them with param groups)."""
        views = [g.view(list(group["params"])) for g, group in zip(self._groups, self.param_groups)]
        return views[0] if self._single and len(views) == 1 else tuple(views)

    def _publish(self, i: int, keys: dict[str, Any]) -> None:
        self.param_groups[i].update(keys)
        self._groups[i].written = dict(keys)

    # -- step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Runs one update of every param group on the current gradients, in place.

        A parameter whose ``.grad`` is ``None`` is skipped as torch.optim skips it: its value
        and its state entries stay as they are (a group where no parameter has a gradient does
        not step at all). With ``closure`` (re-evaluates the model, calls ``backward()`` and
        returns the loss, as for ``torch.optim.LBFGS``) the closure runs first, a ``None``
        gradient counts as zero (as in torch's LBFGS), and the transformation also gets
        ``value=``, ``grad=`` and ``value_and_grad_fn=``, which line searches use.

        Returns:
            The closure's loss, or ``None`` without a closure.
        """
        if closure is not None and self._loop is not None:
            if len(self._groups) != 1:
                raise FuncoptError("max_iter/max_eval/tolerance_* (torch.optim.LBFGS's loop) take one param group, "
                                   "as torch.optim.LBFGS does.")
            return self._loop.run(self.param_groups[0], closure, lambda counted, loss: self._step_group(0, counted, loss))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i in range(len(self._groups)):
            self._step_group(i, closure, loss)
        return loss

    def _step_group(self, i: int, closure: Callable[[], Any] | None, loss: Any) -> None:
        g, group = self._groups[i], self.param_groups[i]
        label = g.where or "param_groups[0]"
        leaves = list(group["params"])
        if len(leaves) != len(g.paths):
            raise FuncoptError(
                f"{label}['params'] now holds {len(leaves)} tensors, {len(g.paths)} when it was added; "
                "add new parameters with add_param_group instead."
            )
        check_switches({k: group.get(k) for k in SWITCHES}, label)
        self._sync_devices(g, leaves)
        if isinstance(g.source, FactorySource):
            values = g.source.read(group, g.written, label)
            revived = g.source.revived(values)
            if revived:
                meta = g.view([torch.empty_like(p, device="meta") for p in leaves])
                if _tree.structure(g.source.build(values).init(meta)) != _tree.structure(g.state):
                    raise FuncoptError(
                        f"{label} set {revived} to {[values[k] for k in revived]}, but the group was built with 0 "
                        f"there, so {g.source.name}'s chain was built without that block (no momentum buffer, no "
                        "decay step). Give the group a non-zero value when building the optimizer (or do not let "
                        "a scheduler cycle it: OneCycleLR(cycle_momentum=False))."
                    )
            if values != g.source.current:
                self._publish(i, g.source.commit(values))
        else:
            g.state = g.source.apply(g.state, group, g.written, label)
        grads, have = gather_grads(g.paths, leaves, g.where, zeros=closure is not None)
        if not any(have):
            return
        skipped = [not h for h in have]
        views = [p.detach() for p in leaves]
        if not any(skipped) and group.get("foreach") is not False:
            fast = g.source.fast(values) if isinstance(g.source, FactorySource) else g.source.tx
            if self._fused_step(g, fast, leaves, views, grads):
                return
        tx = g.source.build(values) if isinstance(g.source, FactorySource) else g.source.tx
        grads = [x if x is not None else torch.zeros_like(p) for x, p in zip(grads, leaves)]
        if closure is None:
            params = optree.tree_unflatten(g.spec, views)
            grad_tree = optree.tree_unflatten(g.spec, grads)
            extra: dict[str, Any] = {}
        else:
            params = optree.tree_unflatten(g.spec, [v.clone() for v in views])
            grad_tree = optree.tree_unflatten(g.spec, [x.clone() for x in grads])
            value = loss.detach() if isinstance(loss, torch.Tensor) else loss
            extra = {"value": value, "grad": grad_tree,
                     "value_and_grad_fn": evaluator(closure, leaves, g.spec, g.paths, g.where)}
        try:
            updates, new_state = tx.update(grad_tree, g.state, params, **extra)
        except FuncoptError as e:
            if closure is None and "value_fn" in str(e):
                raise FuncoptError(
                    f"{e} With as_torch_optimizer, pass a closure that zeroes the gradients, "
                    "computes the loss, calls backward() and returns the loss: "
                    "opt.step(closure), as for torch.optim.LBFGS."
                ) from None
            raise
        if _tree.structure(updates) != g.spec:
            _tree.check_same_structure(updates, params, ("updates", "params"))
        # Unalias before writing: the new state may hold the params/grads passed in as views.
        new_state = unalias(new_state, views + grads)
        if any(skipped):
            new_state = keep_skipped(g.state, new_state, g.spec, skipped)
        for p, x, u, s in zip(leaves, _tree.leaves(params), _tree.leaves(updates), skipped):
            if s:
                continue
            if closure is None and u.dtype == p.dtype and u.shape == p.shape:
                p.add_(u)
            else:
                p.copy_(x + u)
        g.state = new_state
        if isinstance(g.source, BuiltSource):
            self._publish(i, g.source.keys(g.state))

    def _fused_step(self, g: _Group, tx: GradientTransformation, leaves: list[torch.Tensor],
                    views: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
        """The in-place fast route of optimizers that declare one (``funcopt.fast``).

        The optimizer owns its state and writes its parameters in place anyway, so it can give
        both to the multi-tensor kernels, as a donating ``funcopt.apply_gradients`` does.
        Returns False (having written nothing) where the fast route does not apply.
        """
        fast = fast_path_of(tx)  # (sparse gradients were refused when gathered)
        if fast is None:
            return False
        if any(type(v) is not torch.Tensor for v in views):  # a tensor subclass (DTensor): no storage to plan over
            return False
        grad_tree = optree.tree_unflatten(g.spec, grads)
        result = fast.donated_update(grad_tree, g.state, optree.tree_unflatten(g.spec, views))
        if result is None:
            return False
        new_params, new_state = result
        for p, v, x in zip(leaves, views, _tree.leaves(new_params)):
            if x is not v:
                p.copy_(x)
        # A donated step writes into the state's own buffers and hands its containers on, so the
        # new state holds no param or gradient (no unalias needed).
        g.state = new_state
        return True

    def _sync_devices(self, g: _Group, leaves: list[torch.Tensor]) -> None:
        """Moves a group's state after its parameters when they changed device (``module.to``)."""
        devices = tuple(p.device for p in leaves)
        if devices == g.devices:
            return
        i = self._groups.index(g)
        template = self._transformation(i).init(g.view(leaves))
        g.state = _tree.map(lambda x, t: x.to(t.device) if isinstance(x, torch.Tensor) else x, g.state, template)
        g.devices = devices

    # -- state_dict ---------------------------------------------------------------------------

    @property
    def state(self) -> StateView:
        """torch.optim's ``opt.state``: ``{param: {"step", "exp_avg", "exp_avg_sq", ...}}``, read
        from :attr:`funcopt_state` (the tensors are the live buffers). Every parameter has an
        entry from the start; see :meth:`state_dict` for the names."""
        return self._state_view

    @state.setter
    def state(self, value: Mapping[Any, Any]) -> None:
        if "_state_view" not in self.__dict__:
            self._state_view = StateView(self)
        for p, entry in value.items():  # torch.optim.Optimizer.__init__ sets an empty one
            self._state_view[p] = entry

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy: the groups' funcopt states too
        return dict(self.__dict__)

    def _all_paths(self) -> list[str]:
        if self._single and len(self._groups) == 1:
            return list(self._groups[0].paths)
        return [f"param_groups[{i}]{p}" for i, g in enumerate(self._groups) for p in g.paths]

    def state_dict(self) -> dict[str, Any]:
        """The state in torch.optim's layout, ``{"state": ..., "param_groups": ...}``.

        ``state[i]`` holds parameter ``i``'s ``step`` (its group's step count) and its tensors
        of the funcopt state, under torch.optim's names where torch has the field (Adam's
        ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; SGD's ``momentum_buffer``...) and the
        funcopt field names otherwise. Each param group holds its settings and, under
        ``"funcopt"``, the rest of its funcopt state (step counts, injected hyperparameters...).
        So ``torch.distributed.checkpoint``'s ``get_state_dict``/``set_state_dict`` (which keep
        only ``state`` and ``param_groups``) save and restore all of it, and ``torch.save`` /
        ``torch.load(weights_only=True)`` round-trip it. The tensors are the live buffers (as
        in torch.optim). For a ``torch.optim`` optimizer, use :meth:`torch_state_dict`.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = layout.state_dict(self)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def torch_state_dict(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """A ``state_dict`` for the ``torch.optim`` optimizer this one replaces, to go back to
        torch.optim: ``torch.optim.AdamW(same_groups).load_state_dict(opt.torch_state_dict())``
        continues on the trajectory this optimizer would have taken.

        Args:
            optimizer: the torch optimizer to load it into (its param groups give the keys).
                Needed only for a transformation not built by a funcopt factory that torch.optim
                has (``funcopt.adamw``, ``funcopt.sgd``...); its hyperparameters are replaced by
                this optimizer's current ones.

        Raises:
            FuncoptError: where torch.optim has no such optimizer or state field.
        """
        return torch_state_dict(self, optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` (also one written by funcopt 0.2.0, or passed through
        DCP's ``set_state_dict``), or a ``torch.optim`` optimizer's ``state_dict`` (the
        optimizer this one replaces, with the same param groups): the run continues on the
        trajectory torch.optim would have taken. State tensors move to their parameter's device.

        Raises:
            FuncoptError: if the state dict comes from another kind of optimizer, other
                parameters or another transformation (naming the first differing path).
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if isinstance(groups, (list, tuple)) and groups and all(
                isinstance(g, Mapping) and layout.GROUP_KEY in g for g in groups):
            layout.load_own(self, state_dict)
        elif isinstance(state_dict, Mapping) and "format" not in state_dict and {"state", "param_groups"} <= set(state_dict):
            load_torch_state_dict(self, state_dict)
        else:
            layout.load_v1(self, state_dict, _FORMAT_V1)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

def as_torch_optimizer(
    tx: GradientTransformation | Callable[..., GradientTransformation],
    params_or_module: Any,
    **hyperparams: Any,
) -> FuncoptOptimizer:
    """Wraps a funcopt transformation as a ``torch.optim.Optimizer``: a drop-in for
    ``torch.optim.AdamW(params, lr=..., betas=...)`` that runs funcopt's numerics.

    Args:
        tx: an optimizer factory such as ``funcopt.adamw`` (its float arguments become
            per-group hyperparameters in ``param_groups``), a transformation built by one
            (``funcopt.adamw(1e-3)``: rebuilt from its factory the same way), or any other
            ``GradientTransformation`` (chains, ``funcopt.lbfgs()`` driven by ``step(closure)``;
            its ``inject_hyperparams`` values, if any, show in ``param_groups``).
        params_or_module: what ``torch.optim`` takes: an iterable of parameters,
            ``model.named_parameters()``, or a list of param groups (dicts with ``params`` and
            per-group hyperparameters in torch's names ``lr``, ``betas``, ``weight_decay``,
            ``momentum``, ``eps``... or funcopt's); also an ``nn.Module`` (its trainable
            parameters by name) or any pytree of parameters (a dict), which the transformation
            then sees as its params tree (masks given as trees address it).
        **hyperparams: the factory's arguments, in funcopt's names or torch's (``lr`` for
            ``learning_rate``, ``betas`` for ``b1, b2``, ``history_size`` for ``memory_size``),
            and torch.optim's switches: ``foreach``/``fused`` (None or True: the optimizer's
            multi-tensor fast route runs where it applies, as it does by default; ``foreach=False``
            runs the reference chain leaf by leaf), ``capturable`` (accepted, no effect: funcopt
            keeps its step counts as tensors on the params' device already; step() is not made
            for CUDA-graph capture) and ``differentiable`` (only False: see the error for True).
            With ``funcopt.lbfgs``, torch.optim.LBFGS's ``max_iter``, ``max_eval``,
            ``tolerance_grad``, ``tolerance_change`` and ``line_search_fn`` make ``step(closure)``
            run torch's loop of up to ``max_iter`` iterations (torch's defaults for the rest).

    Returns:
        A :class:`FuncoptOptimizer`.

    ``param_groups[i]`` holds each group's hyperparameters as floats (``learning_rate`` as
    ``'lr'``, ``b1``/``b2`` also as ``'betas'``); writing one (any ``torch.optim.lr_scheduler``:
    ``LambdaLR`` per group, ``OneCycleLR`` cycling ``betas``/``momentum``, ``ReduceLROnPlateau``,
    or by hand) changes the value used from the next step on. A transformation that keeps its
    hyperparameters inside its closures (a hand-built chain without ``inject_hyperparams``)
    shows ``'lr': None``, and a scheduler on it raises ``FuncoptError`` at the next step saying
    what to write instead.

    A parameter whose ``.grad`` is ``None`` at ``step()`` is skipped as torch.optim skips it (no
    state change, no weight decay). The step count is kept per group, not per parameter: a
    parameter that resumes after being skipped uses its group's count (for Adam's bias
    correction), where torch keeps one per parameter; give such parameters their own group.
    For the zero-gradient behaviour, give them a zero gradient: ``p.grad = torch.zeros_like(p)``
    (``zero_grad(set_to_none=False)`` keeps existing gradients as zeros).

    Example:
        >>> opt = funcopt.as_torch_optimizer(funcopt.sgd, model.parameters(), lr=0.1, momentum=0.9)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    """
    return FuncoptOptimizer(tx, params_or_module, **hyperparams)
