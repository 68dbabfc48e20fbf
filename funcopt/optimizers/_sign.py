"""signSGD and signum (``optax.sign_sgd``, ``optax.signum``), with their fast routes."""

from __future__ import annotations

import torch

from funcopt.base import GradientTransformation, ScalarOrSchedule
from funcopt.fast import FastRoute, KernelCall, declare
from funcopt.optimizers._common import build, finish, lerp_buffer
from funcopt.transforms import ema, scale_by_learning_rate, scale_by_sign

__all__ = ["sign_sgd", "signum"]


def _sign_sgd_kernel(call: KernelCall) -> list[torch.Tensor]:
    return finish(call, torch._foreach_sign(call.g), owned=True)


@declare(FastRoute(_sign_sgd_kernel, hyperparams=()))
def sign_sgd(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """signSGD, as ``optax.sign_sgd``: ``p -= learning_rate * sign(g)``.

    References: Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems",
    ICML 2018, arXiv 1802.04434.
    """
    return build(scale_by_sign(), scale_by_learning_rate(learning_rate))


def _signum_kernel(call: KernelCall) -> list[torch.Tensor]:
    direction = torch._foreach_sign(lerp_buffer(call, "ema", call.g, 1 - call.h["beta"]))
    return finish(call, direction, owned=True)


@declare(FastRoute(_signum_kernel, hyperparams=("beta",), buffers=("ema",)))
def signum(learning_rate: ScalarOrSchedule, beta: float = 0.9) -> GradientTransformation:
    """Signum, as ``optax.signum``: the sign of an EMA of the gradients (decay ``beta``, not
    debiased: the sign does not change), times ``-learning_rate``.

    References: Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems",
    ICML 2018, arXiv 1802.04434.
    """
    return build(ema(beta, debias=False), scale_by_sign(), scale_by_learning_rate(learning_rate))
