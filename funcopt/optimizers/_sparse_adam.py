"""Lazy Adam for sparse gradients, like ``torch.optim.SparseAdam``."""

from __future__ import annotations

from funcopt.base import GradientTransformation, ScalarOrSchedule
from funcopt.optimizers._common import build, sign
from funcopt.transforms import check_learning_rate, scale_by_learning_rate, scale_by_sparse_adam

__all__ = ["sparse_adam"]


def sparse_adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    maximize: bool = False,
) -> GradientTransformation:
    """Adam that moves only the rows present in sparse gradients, like ``torch.optim.SparseAdam``.

    For parameters whose gradients are sparse COO tensors (``nn.Embedding(sparse=True)``): the
    moments and the params change only at the gradient's entries; the updates are sparse
    tensors that :func:`funcopt.apply_updates` adds into the dense params. See
    :func:`funcopt.transforms.scale_by_sparse_adam` for what purity costs here (fresh dense
    moments each step) and what it does not support (``vmap``/``grad``).

    Example:
        >>> emb = torch.nn.Embedding(1000, 16, sparse=True)
        >>> tx = funcopt.sparse_adam(1e-2)
        >>> state = tx.init({"weight": emb.weight.detach()})
        >>> emb(ids).sum().backward()
        >>> updates, state = tx.update({"weight": emb.weight.grad}, state)
        >>> params = funcopt.apply_updates({"weight": emb.weight.detach()}, updates)

    References: Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015, arXiv 1412.6980.
    """
    check_learning_rate(learning_rate)
    return build(sign(maximize), scale_by_sparse_adam(b1, b2, eps), scale_by_learning_rate(learning_rate))
