"""optax oracles for registry rows whose optax counterpart takes optax objects as arguments
(catalog C: lookahead, sam, sophia). Each builds the optax transformation on demand, so that
importing tests/registry.py never imports jax; tests/test_optax_parity.py calls them through
``Row.optax_factory``."""

from __future__ import annotations


def lookahead_adam(learning_rate, sync_period, slow_step_size, reset_state=False):
    """``optax.lookahead(optax.adam(lr), ...)`` over plain params: the slow weights ride in the
    state, and each update adds optax's slow updates to them (optax's own math; only where the
    slow half lives changes, as in funcopt's default layout)."""
    import optax

    inner = optax.lookahead(optax.adam(learning_rate), sync_period, slow_step_size, reset_state=reset_state)

    def init(params):
        return inner.init(optax.LookaheadParams.init_synced(params)), params

    def update(grads, state, params=None, **extra):
        inner_state, slow = state
        updates, inner_state = inner.update(grads, inner_state, optax.LookaheadParams(fast=params, slow=slow))
        return updates.fast, (inner_state, optax.apply_updates(slow, updates.slow))

    return optax.GradientTransformation(init, update)


def sam_sgd(learning_rate, rho, momentum=None, adv_momentum=None, sync_period=2, reset_state=True):
    """``optax.contrib.sam(optax.sgd(lr, momentum), chain(contrib.normalize(), sgd(rho, adv_momentum)))``."""
    import optax

    adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho, momentum=adv_momentum))
    return optax.contrib.sam(optax.sgd(learning_rate, momentum=momentum), adv, sync_period=sync_period, reset_state=reset_state)


def squared_grads():
    """A deterministic Hessian-diagonal stand-in for Sophia, ``g * g`` of the incoming
    gradients (the same estimator as tests/registry.py's ``squared_grads``)."""
    import jax
    import optax

    def update(updates, state, params=None, **extra):
        return jax.tree.map(lambda g: g * g, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def sophia(**kwargs):
    """``optax.contrib.sophia(**kwargs)`` with the ``squared_grads`` estimator."""
    import optax

    return optax.contrib.sophia(hessian_diagonal_fn=squared_grads(), **kwargs)
