"""The core types: ``GradientTransformation``, ``chain``, ``identity`` and ``apply_updates``."""

from __future__ import annotations

import operator
import threading
import weakref
from typing import Any, Callable, NamedTuple, Protocol, Union

import optree
import torch

from funcopt import tree as _tree

__all__ = [
    "PyTree", "OptState", "Schedule", "ScalarOrSchedule", "GradientTransformation", "TransformInitFn",
    "TransformUpdateFn", "EmptyState", "FuncoptError", "chain", "identity", "apply_updates",
    "register_tree_adder", "check_update_inputs", "batched_updates", "takes_batched_updates", "float_leaves",
    "stable_name", "stable_name_of", "type_of_stable_name",
]

PyTree = Any
"""A pytree: tensors, numbers and ``None`` in dicts, lists, tuples and NamedTuples (optree's nodes)."""
OptState = Any
"""An optimizer state: a pytree of tensors (NamedTuples, tuples, dicts), as ``init`` builds it."""
Schedule = Callable[[torch.Tensor], Union[float, torch.Tensor]]
"""A schedule maps the 0-dim integer step count to a value (``optax.Schedule``)."""
ScalarOrSchedule = Union[float, torch.Tensor, Schedule]
"""A hyperparameter: a Python number, a 0-dim tensor, or a :data:`Schedule` of the step count."""


class FuncoptError(ValueError):
    """Raised for invalid input to a funcopt function; the message says what and how to fix."""


class TransformInitFn(Protocol):
    """``init(params) -> state``: builds the optimizer state for ``params`` (pure)."""

    def __call__(self, params: PyTree) -> OptState: ...


class TransformUpdateFn(Protocol):
    """``update(updates, state, params=None, **extra_args) -> (updates, state)`` (pure)."""

    def __call__(
        self, updates: PyTree, state: OptState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pair of pure functions, like ``optax.GradientTransformation``.

    ``init(params) -> state`` builds the state; ``update(updates, state, params=None,
    **extra_args) -> (updates, new_state)`` transforms gradients (or updates from a previous
    transformation). Neither function mutates its arguments. ``update`` accepts and ignores
    extra keyword arguments it does not use (line searches read ``value``, ``grad``,
    ``value_fn``; plateau reduction reads ``value``).
    """

    init: TransformInitFn
    update: TransformUpdateFn


_STABLE_NAMES: dict[str, type] = {}


def stable_name(name: str) -> Callable[[type], type]:
    """Class decorator: the name checkpoints record a funcopt NamedTuple type under.

    The name (``"funcopt.ScaleByAdamState"``) does not depend on the module the class lives in,
    so moving a class never breaks a saved file. Each name belongs to one class. Example:
    ``@stable_name("funcopt.ScaleByAdamState")`` above ``class ScaleByAdamState(NamedTuple)``.
    """
    if not isinstance(name, str) or not name.startswith("funcopt."):
        raise ValueError(f"stable_name: a funcopt stable name starts with 'funcopt.', got {name!r}")

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
            raise TypeError(f"stable_name: {cls!r} is not a NamedTuple class")
        other = _STABLE_NAMES.get(name)
        if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"stable_name: {name!r} is already the name of {other.__module__}.{other.__qualname__}")
        _STABLE_NAMES[name] = cls
        cls.__funcopt_name__ = name  # type: ignore[attr-defined]
        return cls

    return decorate


def stable_name_of(cls: type) -> str | None:
    """The stable name of a funcopt NamedTuple type (see :func:`stable_name`), else None."""
    name = cls.__dict__.get("__funcopt_name__")
    return name if name is not None and _STABLE_NAMES.get(name) is cls else None


def type_of_stable_name(name: str) -> type | None:
    """The funcopt NamedTuple type with the stable name ``name``, else None."""
    return _STABLE_NAMES.get(name)


@stable_name("funcopt.EmptyState")
class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def _init_empty(params: PyTree) -> EmptyState:
    return EmptyState()


def identity() -> GradientTransformation:
    """A transformation that returns the updates unchanged (``optax.identity``)."""

    def update(updates, state, params=None, **extra_args):
        return updates, state

    return GradientTransformation(_init_empty, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` in sequence, like ``optax.chain``.

    The state is a plain tuple holding one state per transformation. Extra keyword arguments
    given to ``update`` are passed to every member. The outermost chain checks its inputs
    (:func:`check_update_inputs`); given back the state its last update returned (it keeps a
    reference to it) with gradients and params like the last ones, it compares only those.
    Example: ``chain(clip_by_global_norm(1.0), scale_by_adam(), scale_by_learning_rate(1e-3))``.
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"chain argument {i} is a {type(t).__name__}, not a GradientTransformation. "
                "Pass transformations such as funcopt.scale_by_adam() (note the call)."
            )

    # The last member taking per-example updates (batched_updates): the input check runs
    # after it, on the params-shaped updates it returns.
    last_batched = max((i for i, t in enumerate(transforms) if takes_batched_updates(t)), default=-1)
    head, tail = transforms[: last_batched + 1], transforms[last_batched + 1 :]
    last: list[Any] = [None]  # (the state the last checked update returned, its inputs' signature)

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None, **extra_args):
        if not isinstance(state, tuple) or len(state) != len(transforms) or hasattr(state, "_fields"):
            raise FuncoptError(
                f"chain of {len(transforms)} transformation(s) got a state of type "
                f"{type(state).__name__}"
                + (f" with {len(state)} entries" if isinstance(state, tuple) else "")
                + ". Pass the state returned by this optimizer's init (was it built for a "
                "different optimizer?)."
            )
        if _OUTERMOST.depth or torch.compiler.is_compiling():
            return _run_chain(transforms, updates, state, params, extra_args)
        # The user's own call (not a chain nested in another): check the inputs once.
        _OUTERMOST.depth = 1
        try:
            if not head:  # the state this chain returned, with inputs like the last ones: checked
                memo = last[0]
                if memo is None or state is not memo[0] or not _fits(updates, params, memo):
                    signature = check_update_inputs(init, updates, state, params)
                    memo = None if signature is None else (None, *signature[:1], None, *signature[1:], ())
                out, new_state = _run_chain(transforms, updates, state, params, extra_args)
                functorch = torch._C._are_functorch_transforms_active()
                last[0] = None if memo is None or functorch else _memo(new_state, updates, memo)
                return out, new_state
            updates, first = _run_chain(head, updates, state[: len(head)], params, extra_args)
            check_update_inputs(init, updates, state, params, after=len(head))
            updates, rest = _run_chain(tail, updates, state[len(head) :], params, extra_args)
            return updates, first + rest
        except (ValueError, RuntimeError, TypeError) as e:
            if not isinstance(e, FuncoptError):
                _diagnose_structure(updates, state, e)
            raise
        finally:
            _OUTERMOST.depth = 0

    update._funcopt_batched_updates = bool(head)  # type: ignore[attr-defined]
    return GradientTransformation(init, update)


def batched_updates(tx: GradientTransformation) -> GradientTransformation:
    """``tx`` marked as taking per-example updates: every leaf ``(batch, *param_shape)``.

    ``chain`` checks that the updates it is given match the params in shape and dtype; for a
    chain containing a marked member it checks the updates that the last marked member returns
    instead (which must be params-shaped). A chain containing a marked member is marked itself,
    so nesting keeps working. ``differentially_private_aggregate`` (hence ``dpsgd``) is marked:
    ``chain(batched_updates(my_per_example_clip()), scale_by_adam())``.
    """
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"batched_updates expects a GradientTransformation, got {type(tx).__name__}")
    inner = tx.update

    def update(updates, state, params=None, **extra_args):
        return inner(updates, state, params, **extra_args)

    update._funcopt_batched_updates = True  # type: ignore[attr-defined]
    return GradientTransformation(tx.init, update)


def takes_batched_updates(tx: GradientTransformation) -> bool:
    """Whether ``tx`` (or a member of the chain it is) takes per-example updates (:func:`batched_updates`)."""
    return getattr(tx.update, "_funcopt_batched_updates", False) is True


def _run_chain(transforms, updates, state, params, extra_args):
    new_states = [None] * len(transforms)
    for i, (t, s) in enumerate(zip(transforms, state)):
        updates, new_states[i] = t.update(updates, s, params, **extra_args)
    return updates, tuple(new_states)


_OUTERMOST = type("_Nesting", (threading.local,), {"depth": 0})()  # the depth of chains in this thread
_FLOATING = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128))
# init -> {(state spec, grads spec, grad shapes): expected state shapes}; per init (L-BFGS's memory_size
# changes the shapes, not the types), weakly keyed so that the entry goes with the transformation.
_EXPECTED_STATE: weakref.WeakKeyDictionary[Callable[..., Any], dict[Any, Any]] = weakref.WeakKeyDictionary()
_VALID_STATES: set[tuple[Any, Any, tuple[Any, ...]]] = set()


def check_update_inputs(
    init: Callable[[PyTree], OptState], updates: PyTree, state: OptState, params: PyTree | None, after: int = 0
) -> tuple[Any, list[torch.Size], list[torch.dtype]] | None:
    """Raises ``FuncoptError`` naming the path and the fix unless the gradients are floating-point
    tensors matching ``params`` exactly in structure, shape and dtype (no broadcasting) and the
    state's leaves in shape (those ``init`` builds with at least one dimension for these params,
    e.g. Adam's ``mu``; found by running ``init`` on meta tensors once per structure and shapes).
    Metadata only (no device sync, no tensor data read). Every ``chain`` (so every optimizer)
    runs it at the outermost chain; fast routes run the same checks while planning. Returns the
    gradients' (treespec, shapes, dtypes) where all of it was checked (plain tensors, params
    given), else None; ``after``: the updates come from the chain's first ``after`` members.
    """
    g, g_spec = optree.tree_flatten(updates, none_is_leaf=False)
    if not set(map(type, g)) <= _PLAIN_TENSORS:  # numbers, masked placeholders, subclasses
        g = [x if isinstance(x, torch.Tensor) else None for x in g]
        if None in g:
            return
    dtypes = list(map(_DTYPE, g))
    if not set(dtypes) <= _FLOATING:
        i = next(j for j, d in enumerate(dtypes) if d not in _FLOATING)
        raise FuncoptError(f"update: the gradient at {_tree.paths(updates)[i]} has dtype {dtypes[i]}; gradients "
                           "must be floating-point tensors (the gradients of floating-point params).")
    shapes = list(map(_SHAPE, g))
    if params is not None:
        p, p_spec = optree.tree_flatten(params, none_is_leaf=False)
        if p_spec != g_spec:
            try:
                _tree.check_same_structure(params, updates, ("params", "grads"))
            except ValueError as e:
                raise FuncoptError(
                    f"update: {e} Pass one gradient per parameter (zeros for a frozen one), or keep "
                    "frozen params out of both trees (funcopt.freeze / funcopt.masked)."
                ) from None
            return
        if not set(map(type, p)) <= _PLAIN_TENSORS:
            p = [x if isinstance(x, torch.Tensor) else None for x in p]
            if None in p:
                return
        if list(map(_SHAPE, p)) != shapes or list(map(_DTYPE, p)) != dtypes:
            for i, (a, b) in enumerate(zip(p, g)):
                if a.shape != b.shape or a.dtype != b.dtype:
                    _raise_bad_gradient(params, i, a, b, after)
    s, s_spec = optree.tree_flatten(state, none_is_leaf=False)
    key = (s_spec, g_spec, tuple(shapes))
    try:
        known = _EXPECTED_STATE.setdefault(init, {})
    except TypeError:  # an init that cannot be weakly referenced: no memo
        known = {}
    expected, seen = known.get(key), None
    if expected is None:  # new init: state shapes that passed with the same code (inject_hyperparams' fresh chains)
        seen = (getattr(init, "__code__", None), key, tuple(x.shape if type(x) in _PLAIN_TENSORS else 0 for x in s))
        if seen in _VALID_STATES:
            return None if params is None else (g_spec, shapes, dtypes)
        expected = _expected_state_shapes(init, g, g_spec, s)
        known.update({key: expected} if len(known) < 64 else {})
    if expected and [s[i].shape for i in expected[0]] != expected[1]:
        for i, shape in zip(*expected):
            if s[i].shape != shape:
                raise FuncoptError(
                    f"update: the optimizer state's leaf {_tree.paths(state)[i]} has shape {tuple(s[i].shape)}, but "
                    f"init builds {tuple(shape)} for gradients of these shapes. funcopt never broadcasts: was this "
                    "state built by init for these params (same model)? Build it again with tx.init(params)."
                )
    _VALID_STATES.update([seen] if seen is not None and len(_VALID_STATES) < 1024 else [])
    return None if params is None else (g_spec, shapes, dtypes)


def _fits(updates: PyTree, params: PyTree | None, memo: tuple[Any, ...]) -> bool:
    """Whether ``updates``, ``params`` are like a checked step's and the state it returned holds the same buffers."""
    _, spec, getter, shapes, dtypes, held = memo
    try:
        if getter is not None and type(updates) is dict is type(params) and len(updates) == len(params) == len(shapes):
            g, p = getter(updates), getter(params)
        elif params is None or not (g := optree.tree_flatten(updates))[1] == spec == (p := optree.tree_flatten(params))[1]:
            return False
        else:
            g, p = g[0], p[0]
    except KeyError:
        return False
    return (
        set(map(type, g)) <= _PLAIN_TENSORS >= set(map(type, p))
        and list(map(_SHAPE, g)) == shapes == list(map(_SHAPE, p))
        and list(map(_DTYPE, g)) == dtypes == list(map(_DTYPE, p))
        and all([len(d) == len(v) and all(map(operator.is_, d.values(), v)) for d, v in held])
    )


def _memo(state: OptState, updates: PyTree, memo: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """``memo`` for the state a checked step returned, or None where the state holds containers
    other than flat dicts of tensors in its NamedTuples (those are checked in full each step)."""
    held = []
    for entry in state:
        for v in entry if hasattr(entry, "_fields") else (entry,):
            if type(v) is dict and set(map(type, v.values())) <= _PLAIN_TENSORS:
                held.append((v, list(v.values())))
            elif not (type(v) in _PLAIN_TENSORS or v is None or type(v) in (int, float, bool) or v == ()):
                return None
    flat = type(updates) is dict and memo[1].num_nodes == len(updates) + 1 > 2
    getter = memo[2] or (operator.itemgetter(*[k[0] for k in optree.tree_paths(updates)]) if flat else None)
    return (state, memo[1], getter, memo[3], memo[4], held)


def _expected_state_shapes(init: Callable[[PyTree], OptState], g: list[Any], g_spec: Any, s: list[Any]) -> tuple[list, list]:
    """Positions and shapes of the state leaves ``init`` builds with at least one dimension for params like ``g``
    (on meta tensors: no memory, no compute); empty where ``init`` fails there or builds another structure."""
    try:
        meta = optree.tree_unflatten(g_spec, [torch.empty(x.shape, dtype=x.dtype, device="meta") for x in g])
        built, spec = optree.tree_flatten(init(meta), none_is_leaf=False)
    except Exception:  # an init that needs real values: no state check for this optimizer
        return [], []
    if len(built) != len(s):
        return [], []
    where = [i for i, (x, y) in enumerate(zip(built, s)) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.ndim]
    return where, [built[i].shape for i in where]


def _raise_bad_gradient(params: PyTree, i: int, p: torch.Tensor, g: torch.Tensor, after: int = 0) -> None:
    path = _tree.paths(params)[i]
    if p.shape != g.shape:
        if after:
            raise FuncoptError(f"update: the update at {path} returned by the chain's first {after} member(s), which "
                               f"take per-example gradients, has shape {tuple(g.shape)} but the parameter has "
                               f"{tuple(p.shape)}: pass per-example gradients shaped (batch, *param_shape).")
        raise FuncoptError(
            f"update: the gradient at {path} has shape {tuple(g.shape)} but the parameter has {tuple(p.shape)}. funcopt "
            "never broadcasts a gradient: were the gradients computed for these params (same model, the batch "
            "dimension reduced by the loss)?"
        )
    if not (p.is_floating_point() or p.is_complex()):
        raise FuncoptError(
            f"update: the parameter at {path} has dtype {p.dtype}; only floating-point (or complex) tensors can be "
            "optimized. Cast it with .float(), or keep it out of the optimizer (a buffer, or funcopt.freeze)."
        )
    raise FuncoptError(
        f"update: the gradient at {path} has dtype {g.dtype} but the parameter has {p.dtype}. Cast the gradients "
        f"to the params' dtype (e.g. funcopt.tree.cast(grads, {p.dtype})), or keep the params in the gradients' dtype."
    )


def _diagnose_structure(updates: PyTree, state: OptState, error: Exception) -> None:
    """After a chain failed: raises ``FuncoptError`` naming the user's gradients where they do not
    have the structure of the state's params-shaped buffers (a missing or extra key)."""
    g_spec = optree.tree_structure(updates, none_is_leaf=False)
    for entry in state if isinstance(state, tuple) else ():
        for field, value in zip(getattr(entry, "_fields", ()), entry if hasattr(entry, "_fields") else ()):
            if type(value) is not type(updates) or optree.treespec_is_leaf(g_spec):
                continue
            if not all(isinstance(x, torch.Tensor) for x in optree.tree_leaves(value, none_is_leaf=False)):
                continue
            if optree.tree_structure(value, none_is_leaf=False) != g_spec:
                try:
                    _tree.check_same_structure(value, updates, (f"the optimizer state's {field}", "grads"))
                except ValueError as e:
                    raise FuncoptError(
                        f"update: {e} The state was built by init from the params, so the gradients must have "
                        "one entry per parameter: pass zeros for a frozen one, or build the state from the same params."
                    ) from error


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """Returns ``params + updates`` leaf-wise, like ``optax.apply_updates``.

    Each result keeps the dtype of its parameter. The two trees must have the same structure; a
    mismatch raises ``ValueError`` naming the first differing path. Plain tensors of equal dtype,
    shape and device, none requiring grad, are added with one ``torch._foreach_add`` (the same
    numbers) or by a registered adder (:func:`register_tree_adder`: the native backend's one-pass
    add of large CPU trees); elsewhere (``torch.func`` transforms, ``torch.compile``, mixed leaves)
    leaf by leaf.
    """
    if isinstance(params, torch.nn.Module):
        raise FuncoptError(
            f"apply_updates got a {type(params).__name__} module as params. funcopt works on pytrees of tensors: use "
            "`params, buffers = funcopt.nn.extract(model)` (and funcopt.nn.load to put them back), or "
            "funcopt.as_torch_optimizer for code built around module parameters."
        )
    p, spec = optree.tree_flatten(params, none_is_leaf=False)
    u, u_spec = optree.tree_flatten(updates, none_is_leaf=False)
    if u_spec != spec:
        _tree.check_same_structure(params, updates, ("params", "updates"))
    if _can_add_together(p, u):
        for adder in _TREE_ADDERS:
            added = adder(p, u)
            if added is not None:
                return optree.tree_unflatten(spec, added)
        if len(p) > 1:
            return optree.tree_unflatten(spec, torch._foreach_add(p, u))
    for i, (a, b) in enumerate(zip(p, u)):  # the checks the multi-tensor route implies
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape or not (a.is_floating_point() or a.is_complex()):
                _raise_bad_leaf(params, i, a, b)

    def _apply(p, u):
        out = p + u
        return out if out.dtype == p.dtype else out.to(p.dtype)

    return optree.tree_unflatten(spec, [_apply(a, b) for a, b in zip(p, u)])


def _raise_bad_leaf(params: PyTree, index: int, a: torch.Tensor, b: torch.Tensor) -> None:
    path = _tree.paths(params)[index]
    if a.shape != b.shape:
        raise FuncoptError(
            f"apply_updates: the update at {path} has shape {tuple(b.shape)} but the parameter has "
            f"{tuple(a.shape)}. funcopt never broadcasts an update: were the gradients computed "
            "for these params (same model, same batch dimension reduced)?"
        )
    raise FuncoptError(
        f"apply_updates: the parameter at {path} has dtype {a.dtype}; only floating-point (or "
        "complex) tensors can be optimized (adding a float update would silently truncate). Cast "
        "it with .float(), or keep it out of the optimizer (a buffer, or funcopt.freeze)."
    )


_PLAIN_TENSORS = frozenset((torch.Tensor, torch.nn.Parameter))
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_TREE_ADDERS: list[Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor] | None]] = []


def register_tree_adder(adder: Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor] | None]) -> None:
    """Lets :func:`apply_updates` try ``adder(p, u)`` before ``torch._foreach_add``.

    ``p`` and ``u`` are aligned lists of plain float tensors of equal dtype, shape and device, none
    requiring grad, outside ``torch.func`` transforms and ``torch.compile``. The adder returns fresh
    tensors equal to ``[a + b for a, b in zip(p, u)]`` bitwise, or None to pass. A backend registers
    one on import (``funcopt.fast.native`` does); registering it twice has no effect.
    """
    if adder not in _TREE_ADDERS:
        _TREE_ADDERS.append(adder)


def _can_add_together(p: list[Any], u: list[Any]) -> bool:
    """Whether one multi-tensor add of ``p`` and ``u`` gives exactly ``[a + b for a, b in zip(p, u)]``."""
    if not p or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    try:
        return (
            set(map(type, p)) <= _PLAIN_TENSORS >= set(map(type, u))
            and list(map(_DTYPE, p)) == list(map(_DTYPE, u))
            and list(map(_SHAPE, p)) == list(map(_SHAPE, u))
            and list(map(torch.Tensor.get_device, p)) == list(map(torch.Tensor.get_device, u))
            and True not in map(_REQUIRES_GRAD, p) and True not in map(_REQUIRES_GRAD, u)
            and all(map(torch.Tensor.is_floating_point, p))
        )
    except (AttributeError, RuntimeError):
        return False


def float_leaves(tree: PyTree, name: str, where: str, hint: str = "") -> list[torch.Tensor]:
    """The leaves of ``tree``; raises unless there is at least one and all are floating-point
    tensors (the message names ``where``, the argument ``name`` and the leaf's path)."""
    leaves = _tree.leaves(tree)
    if not leaves:
        raise FuncoptError(f"{where}: `{name}` has no tensor leaves.")
    for path, x in zip(_tree.paths(tree), leaves):
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            raise TypeError(
                f"{where}: leaf {path} of `{name}` is "
                + (f"a tensor of dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__)
                + f"; it must be a floating-point tensor{hint}."
            )
    return leaves


def check_state(state: Any, expected: type, transform_name: str) -> None:
    """Raises ``FuncoptError`` if ``state`` is not an instance of ``expected``."""
    if not isinstance(state, expected):
        raise FuncoptError(
            f"{transform_name} expected its state to be a {expected.__name__}, got {type(state).__name__}. Pass the "
            "state returned by this optimizer's own init (a state from a different optimizer or chain position does not fit)."
        )


def require_params(params: Any, transform_name: str) -> None:
    """Raises ``FuncoptError`` when a transformation that needs ``params`` got ``None``."""
    if params is None:
        raise FuncoptError(f"{transform_name} needs the current parameters: call `tx.update(grads, state, params)` "
                           "instead of `tx.update(grads, state)`.")
