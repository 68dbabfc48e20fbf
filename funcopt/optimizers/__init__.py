"""User-facing optimizers: chains of building blocks with torch.optim's defaults and numerics.

Each function returns a ``GradientTransformation``. ``learning_rate`` may be a float, a 0-dim
tensor, or a schedule ``count -> value`` everywhere. Where torch.optim has the algorithm, the
parameters after any number of steps equal torch's to float tolerance (see
``tests/test_parity.py``). An optimizer with a fast route declares it next to its reference
chain (:func:`funcopt.fast.declare`); :data:`FAST_PATH_OPTIMIZERS` lists them.
"""

from funcopt.optimizers._adafactor import adafactor
from funcopt.optimizers._adam import adam, adamax, adamw, lamb, nadam, radam
from funcopt.optimizers._adaptive import adagrad, lion, rmsprop
from funcopt.optimizers._classic import adadelta, asgd, rprop
from funcopt.optimizers._muon import muon, muon_with_adamw
from funcopt.optimizers._sgd import sgd
from funcopt.optimizers._sparse_adam import sparse_adam
# catalog C: SAM, Sophia, DP-SGD
from funcopt.optimizers._dpsgd import dpsgd
from funcopt.optimizers._sam import SAMState
from funcopt.optimizers._sam import sam
from funcopt.optimizers._sophia import sophia
# catalog B: optax.contrib
from funcopt.optimizers._contrib_adaptive import ademamix, adopt, madgrad
from funcopt.optimizers._contrib_free import (
    cocob,
    dadapt_adamw,
    dog,
    dowg,
    momo,
    prodigy,
    schedule_free_adamw,
    schedule_free_sgd,
)
# catalog A: optax's aliases
from funcopt.optimizers._adan import adan
from funcopt.optimizers._layerwise import fromage, lars, novograd
from funcopt.optimizers._noisy_sgd import noisy_sgd
from funcopt.optimizers._optax_adam import adabelief, adamaxw, amsgrad, nadamw, yogi
from funcopt.optimizers._optimistic import optimistic_adam_v2, optimistic_gradient_descent
from funcopt.optimizers._polyak import polyak_sgd
from funcopt.optimizers._sign import sign_sgd, signum
from funcopt.optimizers._sm3 import sm3

__all__ = ["sgd", "adam", "adamw", "adamax", "nadam", "radam", "rmsprop", "adagrad", "lion", "lamb", "adafactor", "sparse_adam", "muon", "muon_with_adamw", "adadelta", "rprop", "asgd", "adabelief", "adan", "amsgrad", "adamaxw", "nadamw", "yogi", "novograd", "sm3", "fromage", "lars", "sign_sgd", "signum", "optimistic_gradient_descent", "optimistic_adam_v2", "noisy_sgd", "polyak_sgd", "schedule_free_adamw", "schedule_free_sgd", "adopt", "ademamix", "prodigy", "dadapt_adamw", "madgrad", "cocob", "dog", "dowg", "momo", "sam", "sophia", "dpsgd", "SAMState", "FAST_PATH_OPTIMIZERS"]

FAST_PATH_OPTIMIZERS = tuple(name for name in __all__[:-1] if hasattr(globals()[name], "fast_route"))
"""Names of the optimizers with a declared fast route."""

# Last, after every factory is imported: torch.optim's argument names (lr=, betas=) get an error
# naming funcopt's (learning_rate=, b1=, b2=) instead of a bare TypeError.
import inspect as _inspect  # noqa: E402

from funcopt.optimizers._common import with_torch_name_hints as _with_torch_name_hints  # noqa: E402

for _name in __all__:
    if _inspect.isfunction(globals()[_name]):  # factories only, never a class such as a state type
        globals()[_name] = _with_torch_name_hints(globals()[_name])
del _name
