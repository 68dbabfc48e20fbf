"""The learning-rate range test ("LR finder") and its vmapped sweep variant.

:func:`lr_find` trains a *copy* of the parameters for up to ``num_steps`` steps while the
learning rate climbs a ladder from ``min_lr`` to ``max_lr``, recording the loss at every step
(the test of Smith 2017, as in fast.ai's and PyTorch Lightning's ``lr_find``).
:func:`lr_sweep` instead trains K copies at K fixed learning rates of the same ladder, all in
parallel under ``torch.func.vmap``, and records the loss each reaches after ``steps`` steps.

Both are pure functions of their inputs: the caller's params and optimizer state are never
modified, nothing is written to disk (no temporary checkpoint to restore or to leave behind
after a crash), and a failure leaves nothing to clean up. Both return an
:class:`LRFinderResult`, which holds the curve, the suggestion rules (``steepest``,
``valley``, ``minimum``, ``best``), a matplotlib plot and ``to_dict()`` for logging.

References: L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017,
arXiv 1506.01186.

The package is split by concept: :func:`lr_find` (``_finder``), :func:`lr_sweep`
(``_sweep``), :class:`LRFinderResult` and its plot (``_result``), the suggestion rules
(``_rules``), :func:`lr_ladder` (``_ladder``) and the machinery both tests share (``_common``).
"""

from funcopt.lr_finder._finder import lr_find
from funcopt.lr_finder._ladder import lr_ladder
from funcopt.lr_finder._result import LRFinderResult
from funcopt.lr_finder._rules import SUGGESTION_METHODS
from funcopt.lr_finder._sweep import lr_sweep

__all__ = ["LRFinderResult", "SUGGESTION_METHODS", "lr_ladder", "lr_find", "lr_sweep"]
