"""funcopt and torch.optim side by side: state_dict conversion and a ``torch.optim.Optimizer`` adapter.

- :func:`from_torch` / :func:`to_torch` convert a ``torch.optim`` ``state_dict`` into a funcopt
  optimizer state and back (:data:`SUPPORTED` lists the classes);
- :func:`as_torch_optimizer` wraps a funcopt optimizer as a ``torch.optim.Optimizer``
  (:class:`FuncoptOptimizer`), a drop-in for torch.optim in existing code: param groups with
  per-group hyperparameters in torch's names, every ``torch.optim.lr_scheduler``, torch's
  skipping of ``None`` gradients, ``load_state_dict`` of a torch.optim ``state_dict`` to
  continue a run and ``torch_state_dict()`` to go back, and its own ``state_dict()`` / ``opt.state``
  in torch.optim's layout, which DCP's ``get_state_dict``/``set_state_dict`` save and restore
  (see ``docs/migrating.md``);
- :func:`state_to_plain` / :func:`state_from_plain` turn a state into plain containers (for
  ``state_dict``) and back.
"""

from funcopt.interop._mapping import SUPPORTED, param_paths
from funcopt.interop._optimizer import FuncoptOptimizer, as_torch_optimizer
from funcopt.interop._plain import state_from_plain, state_to_plain
from funcopt.interop._state_dict import from_torch, to_torch

__all__ = [
    "from_torch",
    "to_torch",
    "param_paths",
    "SUPPORTED",
    "FuncoptOptimizer",
    "as_torch_optimizer",
    "state_to_plain",
    "state_from_plain",
]
