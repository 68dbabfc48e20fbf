"""Run any funcopt transformation as a ``torch.optim.Optimizer``: :func:`as_torch_optimizer`.

For training code that expects a torch optimizer (an ordinary ``loss.backward(); opt.step()``
loop, PyTorch Lightning's ``configure_optimizers``, ``torch.optim.lr_scheduler``)::

    tx = funcopt.inject_hyperparams(funcopt.adamw)(learning_rate=1e-3, weight_decay=1e-2)
    opt = funcopt.as_torch_optimizer(tx, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        sched.step()

The torch side is stateful by nature (it writes the parameters in place); the funcopt state
inside stays a pure pytree (:attr:`FuncoptOptimizer.funcopt_state`) updated by ``tx.update``,
so the trajectory equals the functional loop's. ``state_dict()`` holds only tensors and plain
Python containers (NamedTuples become tagged dicts, see :func:`state_to_plain`), so
``torch.save`` / ``torch.load(weights_only=True)`` round-trip it (the conversion lives in
``funcopt.torch_optimizer_state``).
"""

from __future__ import annotations

import math
from typing import Any, Callable
from collections.abc import Iterable

import optree
import torch

from funcopt.fast import fast_path_of
from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree
from funcopt.transforms import inject_hyperparams, injected_states, set_hyperparams
from funcopt.interop._plain import state_from_plain, state_to_plain

__all__ = ["FuncoptOptimizer", "as_torch_optimizer", "state_to_plain", "state_from_plain"]

_FORMAT = "funcopt.FuncoptOptimizer/1"
# torch.optim's name of a hyperparameter -> funcopt's (the rest keep their funcopt names).
_TORCH_NAMES = {"lr": "learning_rate"}


# ---------------------------------------------------------------------------------------------
# The optimizer


def _collect_params(params_or_module: Any) -> PyTree:
    if isinstance(params_or_module, torch.nn.Module):
        tree = {k: p for k, p in params_or_module.named_parameters() if p.requires_grad}
        if not tree:
            raise FuncoptError(
                f"as_torch_optimizer: the {type(params_or_module).__name__} has no parameters with "
                "requires_grad=True; there is nothing to optimize."
            )
        return tree
    if isinstance(params_or_module, torch.Tensor):
        raise TypeError(
            "as_torch_optimizer expects a module, a dict/list (pytree) of parameters or an iterable "
            "of them, got a single tensor. Wrap it: as_torch_optimizer(tx, [weight])."
        )
    tree = params_or_module
    if not isinstance(tree, (dict, list, tuple)) and isinstance(tree, Iterable):
        tree = list(tree)
    if isinstance(tree, (list, tuple)) and any(isinstance(g, dict) and "params" in g for g in tree):
        raise FuncoptError(
            "as_torch_optimizer takes one tree of parameters, not torch param groups (dicts with "
            "'params'). Express per-group settings inside the transformation instead, e.g. "
            "funcopt.chain(funcopt.add_decayed_weights(1e-2, mask=...), ...), and pass "
            "dict(model.named_parameters())."
        )
    leaves = _tree.leaves(tree)
    if not leaves:
        raise FuncoptError("as_torch_optimizer got an empty parameter list; pass model or model.parameters().")
    for path, p in zip(_tree.paths(tree), leaves):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"as_torch_optimizer: leaf {path} is a {type(p).__name__}, not a tensor parameter.")
        if not p.is_leaf or not p.requires_grad:
            raise FuncoptError(
                f"as_torch_optimizer: leaf {path} must be a leaf tensor with requires_grad=True "
                "(an nn.Parameter). Leave frozen parameters out ([p for p in model.parameters() "
                "if p.requires_grad], or pass the module, which does this), or keep them in the "
                "tree and freeze them in the transformation with a mask."
            )
    return tree


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.numel() else 0


class FuncoptOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a funcopt ``GradientTransformation``.

    Build it with :func:`as_torch_optimizer`. It has one param group. ``step()`` gathers each
    parameter's ``.grad`` into the params' pytree, runs ``tx.update`` and writes the new values
    into the parameters in place; ``funcopt_state`` holds the funcopt state pytree.

    The optimizer owns that state: for the optimizers with a fused fast path (``sgd``, ``adam``,
    ``adamw``, ``adagrad``, ``rmsprop``, ``lion``, see ``funcopt.fused``) ``step()`` updates
    the parameters and the state buffers in place with torch's multi-tensor kernels, like
    ``torch.optim.Adam(fused=True)``. As with torch.optim, ``funcopt_state`` and the tensors in
    ``state_dict()`` are references to the live buffers: ``torch.save`` them (or clone them)
    before the next step if you need a snapshot.
    """

    def __init__(self, tx: GradientTransformation, params_or_module: Any):
        if not isinstance(tx, GradientTransformation):
            raise TypeError(
                f"as_torch_optimizer expects a GradientTransformation (e.g. funcopt.adam(1e-3)), got "
                f"{type(tx).__name__}."
            )
        tree = _collect_params(params_or_module)
        self._tx = tx
        self._spec = _tree.structure(tree)
        self._paths = _tree.paths(tree)
        leaves = _tree.leaves(tree)
        self._ready = False
        self._fstate = tx.init(self._params_view(leaves))
        self._fstate = self._unalias(self._fstate, leaves)
        self._devices = tuple(p.device for p in leaves)
        self._hp_keys = self._hyperparam_keys()
        values = self._hyperparam_values()
        defaults = dict(values) if values else {"lr": None}
        super().__init__(leaves, defaults)
        self._written: dict[str, Any] = {}
        self._publish(values)
        self._ready = True

    # -- helpers ------------------------------------------------------------------------------

    @property
    def transformation(self) -> GradientTransformation:
        """The wrapped funcopt transformation."""
        return self._tx

    @property
    def funcopt_state(self) -> Any:
        """The current funcopt state (a pytree, as ``tx.init`` / ``tx.update`` return it)."""
        return self._fstate

    @funcopt_state.setter
    def funcopt_state(self, state: Any) -> None:
        if _tree.structure(state) != _tree.structure(self._fstate):
            _tree.check_same_structure(state, self._fstate, ("new state", "current state"))
        self._fstate = state
        self._publish(self._hyperparam_values())

    def _leaves(self) -> list[torch.Tensor]:
        return list(self.param_groups[0]["params"]) if self._ready else []

    def _params_view(self, leaves: list[torch.Tensor]) -> PyTree:
        return optree.tree_unflatten(self._spec, [p.detach() for p in leaves])

    @property
    def params(self) -> PyTree:
        """The parameters as a pytree of detached views (like ``funcopt.nn.extract(copy=False)``)."""
        return self._params_view(self._leaves())

    def _unalias(self, state: Any, leaves: list[torch.Tensor]) -> Any:
        """Clones state tensors that share storage with a parameter or a ``.grad``.

        The parameters are written in place after each step and ``.grad`` is zeroed or
        accumulated into; a state leaf kept by reference would silently change with them.
        """
        ptrs = {_storage_ptr(p) for p in leaves}
        ptrs |= {_storage_ptr(p.grad) for p in leaves if p.grad is not None}
        ptrs.discard(0)
        return _tree.map(
            lambda x: x.clone() if isinstance(x, torch.Tensor) and _storage_ptr(x) in ptrs else x, state
        )

    def _hyperparam_keys(self) -> dict[str, str]:
        """Maps param-group keys to injected hyperparameter names."""
        found = injected_states(self._fstate)
        names: set[str] = set().union(*(s.hyperparams for s in found)) if found else set()
        keys = {}
        reverse = {v: k for k, v in _TORCH_NAMES.items()}
        for name in sorted(names):
            keys[reverse.get(name, name)] = name
        return keys

    def _hyperparam_values(self) -> dict[str, Any]:
        found = injected_states(self._fstate)
        if not found:
            return {}
        hp: dict[str, torch.Tensor] = {}
        for s in reversed(found):  # the outermost state wins, as in get_hyperparams
            hp.update(s.hyperparams)
        values = {}
        for key, name in self._hp_keys.items():
            v = hp[name]
            values[key] = float(v) if v.dim() == 0 else v.detach().clone()
        if "b1" in self._hp_keys and "b2" in self._hp_keys:
            values["betas"] = (values["b1"], values["b2"])
        return values

    def _publish(self, values: dict[str, Any]) -> None:
        group = self.param_groups[0]
        if not values:
            group.setdefault("lr", None)
            self._written = {"lr": group["lr"]}
            return
        group.update(values)
        self._written = dict(values)

    def _read_changes(self) -> dict[str, Any]:
        """Hyperparameters the user (or an LR scheduler) wrote into the param group."""
        group = self.param_groups[0]
        if not self._hp_keys:
            if group.get("lr") is not None:
                raise FuncoptError(
                    f"param_groups[0]['lr'] was set to {group['lr']!r} (by an LR scheduler or by "
                    "hand), but this transformation keeps its learning rate fixed inside its "
                    "closures, so the change would be ignored. Build it with "
                    "funcopt.inject_hyperparams, e.g. inject_hyperparams(funcopt.adam)(learning_rate=1e-3), "
                    "to let torch.optim.lr_scheduler drive the learning rate."
                )
            return {}
        changes: dict[str, Any] = {}
        for key, name in self._hp_keys.items():
            if key in group and not _same(group[key], self._written.get(key)):
                changes[name] = group[key]
        if "betas" in group and not _same(group["betas"], self._written.get("betas")):
            b1, b2 = group["betas"]
            changes.setdefault("b1", b1)
            changes.setdefault("b2", b2)
        return changes

    def _sync_devices(self) -> None:
        """Moves the funcopt state after the parameters when they changed device (``module.to``)."""
        leaves = self._leaves()
        devices = tuple(p.device for p in leaves)
        if devices == self._devices:
            return
        template = self._tx.init(self._params_view(leaves))
        self._fstate = _tree.map(
            lambda x, t: x.to(t.device) if isinstance(x, torch.Tensor) else x, self._fstate, template
        )
        self._devices = devices

    def _grads(self, leaves: list[torch.Tensor], clone: bool) -> PyTree:
        grads = []
        for path, p in zip(self._paths, leaves):
            g = p.grad
            if g is None:
                g = torch.zeros_like(p)
            elif g.is_sparse:
                raise TypeError(f"FuncoptOptimizer: the gradient of {path} is sparse; funcopt needs dense gradients.")
            else:
                g = g.detach().clone() if clone else g.detach()
            grads.append(g)
        return optree.tree_unflatten(self._spec, grads)

    def _evaluator(self, closure: Callable[[], Any], leaves: list[torch.Tensor]) -> Callable[[PyTree], tuple]:
        def value_and_grad(trial: PyTree) -> tuple[torch.Tensor, PyTree]:
            with torch.no_grad():
                for p, t in zip(leaves, _tree.leaves(trial)):
                    p.copy_(t)
            with torch.enable_grad():
                loss = closure()
            if not isinstance(loss, torch.Tensor):
                raise FuncoptError(
                    f"the closure passed to step() must return the loss tensor, got {type(loss).__name__}."
                )
            return loss.detach(), self._grads(leaves, clone=True)

        return value_and_grad

    # -- torch.optim.Optimizer API -------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Runs one ``tx.update`` on the current gradients and writes the params in place.

        With ``closure`` (re-evaluates the model and returns the loss after ``backward()``, as for
        ``torch.optim.LBFGS``) the closure is called first, and the transformation also gets
        ``value=``, ``grad=`` and ``value_and_grad_fn=`` (the closure at trial params), which
        line searches such as ``funcopt.lbfgs()`` use.

        Returns:
            The closure's loss, or ``None`` without a closure.
        """
        self._sync_devices()
        changes = self._read_changes()
        if changes:
            # Python floats go through float64 so that no precision is lost on the way in.
            changes = {
                k: torch.tensor(v, dtype=torch.float64) if isinstance(v, (int, float)) else v
                for k, v in changes.items()
            }
            self._fstate = set_hyperparams(self._fstate, **changes)
        leaves = self._leaves()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._fused_step(leaves):
            return loss
        if closure is None:
            params = self._params_view(leaves)
            grads = self._grads(leaves, clone=False)
            extra: dict[str, Any] = {}
        else:
            params = optree.tree_unflatten(self._spec, [p.detach().clone() for p in leaves])
            grads = self._grads(leaves, clone=True)
            value = loss.detach() if isinstance(loss, torch.Tensor) else loss
            extra = {"value": value, "grad": grads, "value_and_grad_fn": self._evaluator(closure, leaves)}
        try:
            updates, new_state = self._tx.update(grads, self._fstate, params, **extra)
        except FuncoptError as e:
            if closure is None and "value_fn" in str(e):
                raise FuncoptError(
                    f"{e} With as_torch_optimizer, pass a closure that zeroes the gradients, "
                    "computes the loss, calls backward() and returns the loss: "
                    "opt.step(closure), as for torch.optim.LBFGS."
                ) from None
            raise
        if _tree.structure(updates) != self._spec:
            _tree.check_same_structure(updates, params, ("updates", "params"))
        # Unalias before writing: the new state may hold the params/grads passed in as views.
        self._fstate = self._unalias(new_state, leaves)
        for p, x, u in zip(leaves, _tree.leaves(params), _tree.leaves(updates)):
            if closure is None and u.dtype == p.dtype and u.shape == p.shape:
                p.add_(u)
            else:
                p.copy_(x + u)
        self._publish(self._hyperparam_values())
        return loss

    def _fused_step(self, leaves: list[torch.Tensor]) -> bool:
        """The in-place fast path of ``sgd``/``adam``/``adamw``/``adagrad``/``rmsprop``/``lion``.

        The optimizer owns its state and writes its parameters in place anyway, so it can give
        both to torch's fused multi-tensor kernels (``funcopt.fast``), as a donating
        ``funcopt.apply_gradients`` does. Returns False (having written nothing) where the fast
        path does not apply; the reference ``tx.update`` then runs.
        """
        fast = fast_path_of(self._tx)
        if fast is None or any(p.grad is None or p.grad.is_sparse for p in leaves):
            return False
        grads = optree.tree_unflatten(self._spec, [p.grad.detach() for p in leaves])
        result = fast.donated_update(grads, self._fstate, self._params_view(leaves))
        if result is None:
            return False
        new_params, new_state = result
        for p, x in zip(leaves, _tree.leaves(new_params)):
            if x.data_ptr() != p.data_ptr():
                p.copy_(x)
        self._fstate = self._unalias(new_state, leaves)
        self._publish(self._hyperparam_values())
        return True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only used once, by the constructor: a funcopt optimizer has exactly one group."""
        if getattr(self, "_ready", False):
            raise FuncoptError(
                "FuncoptOptimizer has a single parameter group; build a new optimizer over all "
                "parameters, with per-group settings expressed by masks in the transformation."
            )
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The funcopt state as tensors in plain containers, plus the param group's settings.

        Saved with ``torch.save`` and loaded with ``torch.load(weights_only=True)``.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self._paths)))
        state_dict = {
            "format": _FORMAT,
            "state": {},
            "param_groups": [group],
            "param_paths": list(self._paths),
            "funcopt_state": state_to_plain(self._fstate),
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict`, moving each state tensor to its parameter's device.

        Raises:
            FuncoptError: if the state dict comes from another kind of optimizer, other
                parameters or another transformation (naming the first differing path).
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict) or state_dict.get("format") != _FORMAT:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise FuncoptError(
                f"FuncoptOptimizer.load_state_dict expects a dict from FuncoptOptimizer.state_dict() "
                f"(format {_FORMAT!r}), got {keys}. A torch.optim state_dict cannot be loaded here."
            )
        saved_paths = list(state_dict["param_paths"])
        if saved_paths != self._paths:
            diff = next(
                (f"#{i}: saved {a}, here {b}" for i, (a, b) in enumerate(zip(saved_paths, self._paths)) if a != b),
                f"saved {len(saved_paths)} parameters, here {len(self._paths)}",
            )
            raise FuncoptError(
                f"FuncoptOptimizer.load_state_dict: the parameters differ from the saved ones ({diff}). "
                "Build the optimizer over the same model/parameter tree that was saved."
            )
        self._sync_devices()
        self._fstate = state_from_plain(state_dict["funcopt_state"], like=self._fstate)
        # The state holds the values the last step used; the saved group may hold newer ones an
        # LR scheduler wrote after that step. Restore both, so the next step picks those up.
        self._publish(self._hyperparam_values())
        group = self.param_groups[0]
        for k, v in state_dict["param_groups"][0].items():
            if k != "params":
                group[k] = v
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def as_torch_optimizer(
    tx: GradientTransformation | Callable[..., GradientTransformation],
    params_or_module: Any,
    **hyperparams: Any,
) -> FuncoptOptimizer:
    """Wraps a funcopt transformation as a ``torch.optim.Optimizer``, like
    ``torch.optim.Adam(model.parameters())`` but with any funcopt ``tx``.

    Use it where code expects a torch optimizer: a ``loss.backward(); opt.step()`` loop,
    Lightning's ``configure_optimizers``, ``torch.optim.lr_scheduler``. The parameters' values
    follow exactly the functional loop ``updates, state = tx.update(grads, state, params);
    params = funcopt.apply_updates(params, updates)``.

    Args:
        tx: any ``GradientTransformation`` (chains, schedules, masks, ``funcopt.lbfgs()`` driven
            by ``step(closure)``), or an optimizer factory such as ``funcopt.adamw``: then
            ``inject_hyperparams(tx)(**hyperparams)`` is used, so that every float
            hyperparameter shows in ``param_groups`` (``as_torch_optimizer(funcopt.adamw,
            model, learning_rate=1e-3, weight_decay=1e-2)``, like ``torch.optim.AdamW(
            model.parameters(), lr=1e-3, weight_decay=1e-2)``).
        params_or_module: an ``nn.Module`` (its trainable parameters, as a dict keyed by their
            names, form the params pytree the transformation sees), a dict or other pytree of
            parameters, or an iterable of them (a list).
        **hyperparams: the factory's arguments (only with a factory).

    Returns:
        A :class:`FuncoptOptimizer` with one param group. Parameters whose ``.grad`` is ``None``
        at ``step()`` get a zero gradient (torch.optim skips them instead; with a stateful
        transformation such as Adam the moments of such a parameter still decay).

    Hyperparameters in ``param_groups[0]``:
        When ``tx`` comes from ``funcopt.inject_hyperparams``, each injected hyperparameter is
        mirrored as a float in the group: ``learning_rate`` as ``'lr'``, ``b1``/``b2`` also as
        ``'betas'``, the others under their own names (``'momentum'``, ``'weight_decay'``).
        Writing one (``StepLR``, ``OneCycleLR``, by hand) changes the state's value used from
        the next step on (``funcopt.set_hyperparams``). A hyperparameter that is itself a schedule
        is recomputed by its schedule at each step, so writing it has no lasting effect. Without
        ``inject_hyperparams`` the learning rate is baked into the transformation: ``'lr'`` is
        ``None`` and setting it raises ``FuncoptError`` at the next step instead of being
        silently ignored.

    Example:
        >>> tx = funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=0.1, momentum=0.9)
        >>> opt = funcopt.as_torch_optimizer(tx, model)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    """
    if isinstance(tx, torch.optim.Optimizer) or (isinstance(tx, type) and issubclass(tx, torch.optim.Optimizer)):
        raise TypeError(
            "as_torch_optimizer wraps a funcopt GradientTransformation (funcopt.adam(1e-3)) or a "
            "funcopt factory (funcopt.adam), not a torch.optim optimizer, which can be used directly."
        )
    if not isinstance(tx, GradientTransformation) and callable(tx):
        tx = inject_hyperparams(tx)(**hyperparams)
    elif hyperparams:
        raise FuncoptError(
            f"as_torch_optimizer got hyperparameters {sorted(hyperparams)} with an already built "
            "transformation; pass them to its factory instead (funcopt.adam(1e-3)), or pass the "
            "factory itself: as_torch_optimizer(funcopt.adam, model, learning_rate=1e-3)."
        )
    return FuncoptOptimizer(tx, params_or_module)
