"""The public API of funcopt 0.1.0 stays importable.

The lists below are literal data, generated from the 0.1.0 code (commit
e6782ca59b6361a5a59898c175f3b057f7d35f53) before the package was split into subpackages:

1. every name that ``funcopt/__init__.py`` imports (``PUBLIC_API["funcopt"]``), modules such as
   ``funcopt.fused`` and ``funcopt.native`` included (kept as aliases of ``funcopt.fast`` and
   ``funcopt.fast.native``). The flat internal modules that were attributes of ``funcopt`` only
   because importing it imported them (``funcopt.fused_checks``, ``funcopt.linalg_cg``...) moved
   into packages in 0.2.0 and are not listed (CHANGELOG.md);
2. ``__all__`` of each documented submodule: ``funcopt.schedules``, ``tree``, ``checkpoint``,
   ``linalg``, ``implicit``, ``sweep``, ``distributed``, ``nn``, ``transforms``.

For each ``(module, name)`` the test imports ``module`` and checks ``hasattr(module, name)``.
Names tied to the optional native backend (``funcopt.native``) are skipped when
``importlib.util.find_spec("funcopt.fast.native")`` finds no such module.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest

# fmt: off
PUBLIC_API = {
    # every name in dir(funcopt) not starting with "_" that funcopt/__init__.py imports
    "funcopt": [
        'AccumulateState', 'ApplyIfFiniteState', 'CheckpointError', 'CheckpointManager',
        'DonatedValueError', 'EmptyState', 'FuncoptError', 'FuncoptOptimizer',
        'GradientTransformation', 'InjectHyperparamsState', 'LINESEARCH_STATUS',
        'LRFinderResult', 'MaskedState', 'MinimizeResult', 'MultiTransformState',
        'OptState', 'PyTree', 'ReduceOnPlateauState', 'ScalarOrSchedule',
        'ScaleByAdamState', 'ScaleByAdamaxState', 'ScaleByBacktrackingLinesearchState',
        'ScaleByLbfgsState', 'ScaleByLionState', 'ScaleByNadamState', 'ScaleByRmsState',
        'ScaleByRssState', 'ScaleByScheduleState', 'ScaleByZoomLinesearchState', 'Schedule',
        'SweepResult', 'TraceState', 'accumulate', 'adagrad', 'adam', 'adamax', 'adamw',
        'add_decayed_weights', 'apply_gradients', 'apply_if_finite', 'apply_updates',
        'as_torch_optimizer', 'chain', 'checkpoint', 'clip', 'clip_by_global_norm',
        'custom_root', 'distributed', 'freeze', 'fused', 'get_hyperparams', 'hypergradient',
        'identity', 'implicit', 'inject_hyperparams', 'interop', 'lamb', 'lbfgs', 'linalg',
        'lion', 'lr_find', 'lr_finder', 'lr_sweep', 'make_step', 'masked', 'minimize',
        'multi_transform', 'nadam', 'native', 'nn', 'plateau', 'radam', 'reduce_on_plateau',
        'rmsprop', 'scale', 'scale_by_adam', 'scale_by_adamax',
        'scale_by_backtracking_linesearch', 'scale_by_lbfgs', 'scale_by_learning_rate',
        'scale_by_lion', 'scale_by_nadam', 'scale_by_radam', 'scale_by_rms', 'scale_by_rss',
        'scale_by_schedule', 'scale_by_trust_ratio', 'scale_by_zoom_linesearch',
        'schedules', 'set_hyperparams', 'set_to_zero', 'sgd', 'stacked', 'sweep', 'trace',
        'train_step', 'tree', 'unrolled_hypergradient', 'value_and_grad_from_state',
        'wrappers',
    ],
    # funcopt.schedules.__all__
    "funcopt.schedules": [
        'constant', 'linear', 'polynomial', 'exponential_decay', 'cosine_decay',
        'warmup_cosine_decay', 'warmup_exponential_decay', 'piecewise_constant', 'join',
        'sgdr', 'cosine_restarts', 'one_cycle', 'one_cycle_momentum',
    ],
    # funcopt.tree.__all__
    "funcopt.tree": [
        'PyTree', 'leaves', 'structure', 'paths', 'path_str', 'map', 'map_with_path',
        'check_same_structure', 'add', 'sub', 'scale', 'add_scaled', 'vdot', 'sum_squares',
        'norm', 'zeros_like', 'ones_like', 'full_like', 'cast', 'where', 'stack', 'unstack',
        'ravel', 'num_elements',
    ],
    # funcopt.checkpoint.__all__
    "funcopt.checkpoint": [
        'CheckpointError', 'CheckpointManager', 'CheckpointInfo', 'LeafInfo', 'DeviceSpec',
        'save', 'load', 'inspect', 'device_put', 'register',
    ],
    # funcopt.linalg.__all__
    "funcopt.linalg": [
        'HVP_MODES', 'SolveInfo', 'HVPOperator', 'hvp', 'hvp_operator', 'mixed_vjp',
        'power_iteration', 'solve_neumann', 'solve_cg', 'solve_normal_cg', 'solve_dense',
    ],
    # funcopt.implicit.__all__
    "funcopt.implicit": [
        'hypergradient', 'custom_root', 'unrolled_hypergradient', 'minimize_inner',
    ],
    # funcopt.sweep.__all__
    "funcopt.sweep": [
        'grid', 'uniform', 'log_uniform', 'choice', 'random_search', 'stack_params',
        'init_stacked', 'stack_states', 'select', 'unstack', 'sweep', 'successive_halving',
        'SweepResult', 'BestConfig',
    ],
    # funcopt.distributed.__all__
    "funcopt.distributed": [
        'is_initialized', 'rank_and_world_size', 'all_reduce', 'average_gradients',
        'broadcast', 'check_same_structure_across_ranks', 'shard', 'save', 'load',
        'checkpoint_info', 'launch', 'sweep',
    ],
    # funcopt.nn.__all__
    "funcopt.nn": [
        'extract', 'apply', 'as_function', 'load',
    ],
    # funcopt.transforms.__all__
    "funcopt.transforms": [
        'ScaleByAdamState', 'ScaleByAdamaxState', 'ScaleByNadamState', 'ScaleByLionState',
        'ScaleByRmsState', 'ScaleByRssState', 'ScaleByScheduleState', 'TraceState', 'scale',
        'scale_by_learning_rate', 'scale_by_schedule', 'scale_by_adam', 'scale_by_adamax',
        'scale_by_nadam', 'scale_by_radam', 'scale_by_lion', 'scale_by_rms', 'scale_by_rss',
        'scale_by_trust_ratio', 'trace', 'add_decayed_weights', 'clip',
        'clip_by_global_norm',
    ],
}

# fmt: on

# Names that exist only with the optional native backend (funcopt.native).
NATIVE_NAMES = {("funcopt", "native")}

CASES = [(module, name) for module, names in PUBLIC_API.items() for name in names]


def _native_installed() -> bool:
    try:
        return importlib.util.find_spec("funcopt.fast.native") is not None
    except (ImportError, ValueError):
        return False


def test_lists_have_no_duplicates():
    assert len(CASES) == len(set(CASES))


@pytest.mark.parametrize(("module", "name"), CASES, ids=[f"{m}.{n}" for m, n in CASES])
def test_public_name_is_importable(module, name):
    if (module, name) in NATIVE_NAMES and not _native_installed():
        pytest.skip(f"{module}.{name} belongs to the optional native backend, and "
                    "importlib.util.find_spec('funcopt.fast.native') finds no funcopt.fast.native here")
    mod = importlib.import_module(module)
    assert hasattr(mod, name), f"{module}.{name} no longer exists (it was public in funcopt 0.1.0)"
