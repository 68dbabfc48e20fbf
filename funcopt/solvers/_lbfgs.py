"""L-BFGS as a transformation: the two-loop recursion with its history held in the state.

Like ``optax.scale_by_lbfgs`` / ``optax.lbfgs``. Where ``torch.optim.LBFGS`` keeps its history in
Python lists inside the optimizer object and needs a closure, here the history is an ordinary
state of fixed-size tensors, so it is checkpointed, moved across devices and resumed like any
other optimizer state::

    tx = funcopt.lbfgs()
    state = tx.init(params)
    vg = funcopt.value_and_grad_from_state(loss_fn)
    for _ in range(100):
        value, grad = vg(params, state)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)
        params = funcopt.apply_updates(params, updates)

or simply ``funcopt.minimize(loss_fn, params)``.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch

from funcopt import tree as _tree
from funcopt.base import (
    stable_name,
    FuncoptError,
    GradientTransformation,
    ScalarOrSchedule,
    chain,
    check_state,
    require_params,
)
from funcopt.solvers._backtracking import scale_by_backtracking_linesearch
from funcopt.solvers._zoom import scale_by_zoom_linesearch
from funcopt.transforms import check_learning_rate, init_count, scale, scale_by_learning_rate

__all__ = ["ScaleByLbfgsState", "scale_by_lbfgs", "lbfgs"]


@stable_name("funcopt.ScaleByLbfgsState")
class ScaleByLbfgsState(NamedTuple):
    """State of :func:`scale_by_lbfgs`: the curvature history in fixed-size ring buffers.

    With ``n`` the total number of parameter elements and ``m`` the memory size:

    Attributes:
        count: 0-dim int64, number of updates so far.
        params: ``(n,)`` raveled params seen at the last update.
        updates: ``(n,)`` raveled incoming updates (gradients) at the last update.
        diff_params_memory: ``(m, n)`` stored ``s_i = x_{i+1} - x_i``.
        diff_updates_memory: ``(m, n)`` stored ``y_i = g_{i+1} - g_i``.
        weights_memory: ``(m,)`` stored ``rho_i = 1 / <y_i, s_i>``.
        head: 0-dim int64, slot the next accepted pair is written to.
        num_pairs: 0-dim int64, number of valid pairs in the buffers (at most ``m``).
    """

    count: torch.Tensor
    params: torch.Tensor
    updates: torch.Tensor
    diff_params_memory: torch.Tensor
    diff_updates_memory: torch.Tensor
    weights_memory: torch.Tensor
    head: torch.Tensor
    num_pairs: torch.Tensor


def scale_by_lbfgs(
    memory_size: int = 10,
    scale_init_precond: bool = True,
    curvature_eps: float | None = None,
) -> GradientTransformation:
    """Turns gradients into L-BFGS directions ``H g`` (unsigned), like ``optax.scale_by_lbfgs``.

    At each update, the pair ``s = x - x_prev``, ``y = g - g_prev`` is stored in ring buffers of
    ``memory_size`` slots if it satisfies the curvature condition ``<y, s> > curvature_eps *
    |y| |s|`` (otherwise it is skipped, which keeps the implicit inverse Hessian ``H`` positive
    definite); then the two-loop recursion (Nocedal & Wright, Alg. 7.4) applies ``H`` to the
    gradient, with the initial matrix ``gamma * I``, ``gamma = <s, y> / <y, y>`` of the newest
    pair. Without any stored pair (the first step) the gradient is scaled by
    ``min(1, 1 / |g|_1)`` as torch.optim.LBFGS does (by 1 if ``scale_init_precond=False``,
    which also fixes ``gamma = 1``).

    The params and gradients are raveled into one vector (``funcopt.tree.ravel``, common dtype
    of the leaves); the state holds ``2 * memory_size + 2`` vectors of that size. The update is
    pure tensor code (no Python branching on values), so it runs under ``torch.func.vmap``.
    The sign is not flipped: chain with ``funcopt.scale(-1.0)`` or a learning rate, then a
    line search (:func:`lbfgs` does this).

    Args:
        memory_size: number of ``(s, y)`` pairs kept, >= 1.
        scale_init_precond: use ``gamma = <s, y> / <y, y>`` (and the first-step scaling).
        curvature_eps: relative threshold of the curvature test; ``None`` uses the machine
            epsilon of the params' dtype.

    References: Nocedal, "Updating quasi-Newton matrices with limited storage", Math. Comp.,
    1980; Liu & Nocedal, "On the limited memory BFGS method for large scale optimization",
    Math. Prog., 1989; Nocedal & Wright, "Numerical Optimization", 2nd ed., 2006, Sec. 7.2.
    """
    if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
        raise FuncoptError(f"memory_size must be a positive int, got {memory_size!r}.")
    if curvature_eps is not None and not (isinstance(curvature_eps, (int, float)) and curvature_eps >= 0):
        raise FuncoptError(f"curvature_eps must be a number >= 0 or None, got {curvature_eps!r}.")
    m = memory_size
    name = "scale_by_lbfgs"

    def init(params):
        flat, _ = _tree.ravel(params)
        count = init_count(params)
        n = flat.shape[0]
        zeros = torch.zeros((m, n), dtype=flat.dtype, device=flat.device)
        return ScaleByLbfgsState(
            count=count,
            params=torch.zeros_like(flat),
            updates=torch.zeros_like(flat),
            diff_params_memory=zeros,
            diff_updates_memory=zeros.clone(),
            weights_memory=torch.zeros((m,), dtype=flat.dtype, device=flat.device),
            head=torch.zeros_like(count),
            num_pairs=torch.zeros_like(count),
        )

    def update(updates, state, params=None, **extra_args):
        del extra_args
        check_state(state, ScaleByLbfgsState, name)
        require_params(params, name)
        g, unravel = _tree.ravel(updates)
        x, _ = _tree.ravel(params)
        if g.shape != state.updates.shape[-1:] or x.shape != g.shape:
            raise FuncoptError(
                f"{name}: the state was built for {state.updates.shape[-1]} parameter elements, "
                f"but got updates with {g.shape[0]} and params with {x.shape[0]}. Re-run "
                "tx.init(params) when the parameters change."
            )
        g = g.to(state.updates.dtype)
        x = x.to(state.params.dtype)
        eps = curvature_eps if curvature_eps is not None else torch.finfo(g.dtype).eps

        # 1. Store the newest pair when it has positive curvature (a skipped pair leaves H as is).
        s = x - state.params
        y = g - state.updates
        ys = torch.dot(y, s)
        yy = torch.dot(y, y)
        ss = torch.dot(s, s)
        accept = (state.count > 0) & (ys > eps * torch.sqrt(ss * yy)) & torch.isfinite(ys)
        slots = torch.arange(m, device=g.device)
        slot = (slots == state.head) & accept
        rho = torch.where(accept, 1.0 / torch.where(accept, ys, torch.ones_like(ys)), torch.zeros_like(ys))
        S = torch.where(slot[:, None], s, state.diff_params_memory)
        Y = torch.where(slot[:, None], y, state.diff_updates_memory)
        R = torch.where(slot, rho, state.weights_memory)
        head = torch.where(accept, (state.head + 1) % m, state.head)
        num_pairs = torch.where(accept, torch.clamp(state.num_pairs + 1, max=m), state.num_pairs)

        # 2. Two-loop recursion over the valid pairs, newest first (Nocedal & Wright, Alg. 7.4).
        # The ring is read in age order through one gather; weights of empty slots are zeroed,
        # which makes their terms vanish without branching.
        order = (head - 1 - slots) % m
        s_hist, y_hist = S.index_select(0, order), Y.index_select(0, order)
        valid = slots < num_pairs
        r_hist = torch.where(valid, R.index_select(0, order), torch.zeros_like(R))
        s_rows, y_rows, rho_rows = s_hist.unbind(0), y_hist.unbind(0), r_hist.unbind(0)
        q = g
        alphas = []
        for k in range(m):
            alpha = rho_rows[k] * torch.dot(s_rows[k], q)
            q = torch.addcmul(q, alpha, y_rows[k], value=-1)
            alphas.append(alpha)
        if scale_init_precond:
            s_new, y_new = s_rows[0], y_rows[0]
            gamma_pairs = torch.dot(s_new, y_new) / torch.clamp(torch.dot(y_new, y_new), min=torch.finfo(g.dtype).tiny)
            gamma_first = torch.clamp(1.0 / torch.sum(torch.abs(g)), max=1.0)
            gamma = torch.where(num_pairs > 0, gamma_pairs, gamma_first)
        else:
            gamma = torch.ones_like(ys)
        r = gamma * q
        for k in reversed(range(m)):
            beta = rho_rows[k] * torch.dot(y_rows[k], r)
            r = torch.addcmul(r, alphas[k] - beta, s_rows[k])

        new_state = ScaleByLbfgsState(
            count=state.count + 1,
            params=x,
            updates=g,
            diff_params_memory=S,
            diff_updates_memory=Y,
            weights_memory=R,
            head=head,
            num_pairs=num_pairs,
        )
        return unravel(r), new_state

    return GradientTransformation(init, update)


def lbfgs(
    learning_rate: ScalarOrSchedule | None = None,
    memory_size: int = 10,
    scale_init_precond: bool = True,
    linesearch: Union[str, GradientTransformation, None] = "zoom",
) -> GradientTransformation:
    """L-BFGS with a line search, like ``optax.lbfgs`` (and torch.optim.LBFGS with
    ``line_search_fn='strong_wolfe'``).

    ``chain(scale_by_lbfgs(memory_size, scale_init_precond), scale(-learning_rate),
    linesearch)``: the direction ``-lr * H g`` is then scaled by the line search's step.

    Args:
        learning_rate: multiplies the direction before the line search; ``None`` means 1 (the
            natural quasi-Newton step, which the line search tries first). Required when
            ``linesearch=None``.
        memory_size: number of curvature pairs kept.
        scale_init_precond: see :func:`scale_by_lbfgs`.
        linesearch: ``"zoom"`` (strong Wolfe, :func:`scale_by_zoom_linesearch`),
            ``"backtracking"`` (Armijo, :func:`scale_by_backtracking_linesearch`), a line-search
            ``GradientTransformation`` built with custom settings, or ``None`` for fixed steps.

    ``update`` needs ``params`` and, with a line search, ``value_fn=`` (and preferably
    ``value=``/``grad=`` at ``params``); see :func:`funcopt.minimize` for a ready-made loop.

    Example:
        >>> tx = funcopt.lbfgs()
        >>> result = funcopt.minimize(loss_fn, params, tx=tx, max_steps=100, tol=1e-6)

    References: Liu & Nocedal, "On the limited memory BFGS method for large scale
    optimization", Math. Prog., 1989; Nocedal & Wright, "Numerical Optimization", 2006, ch. 7.
    """
    if isinstance(linesearch, str):
        if linesearch == "zoom":
            ls = scale_by_zoom_linesearch()
        elif linesearch == "backtracking":
            ls = scale_by_backtracking_linesearch()
        else:
            raise FuncoptError(
                f"linesearch must be 'zoom', 'backtracking', a GradientTransformation or None, "
                f"got {linesearch!r}."
            )
    elif linesearch is None or isinstance(linesearch, GradientTransformation):
        ls = linesearch
    else:
        raise FuncoptError(
            f"linesearch must be 'zoom', 'backtracking', a GradientTransformation or None, got "
            f"a {type(linesearch).__name__}."
        )
    if learning_rate is None:
        if ls is None:
            raise FuncoptError(
                "lbfgs without a line search needs a learning_rate (e.g. lbfgs(0.1, "
                "linesearch=None)); unit steps along an L-BFGS direction can diverge."
            )
        step = scale(-1.0)
    else:
        check_learning_rate(learning_rate)
        step = scale_by_learning_rate(learning_rate)
    parts = [scale_by_lbfgs(memory_size, scale_init_precond), step]
    if ls is not None:
        parts.append(ls)
    return chain(*parts)
