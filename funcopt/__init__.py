"""funcopt: functional, pure optimizers over pytrees for PyTorch (optax-style).

An optimizer is a ``GradientTransformation(init, update)`` of pure functions over pytrees::

    tx = funcopt.adam(1e-3)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = funcopt.apply_updates(params, updates)
"""

from funcopt import checkpoint as checkpoint
from funcopt import distributed as distributed
from funcopt import fast as fast
from funcopt import implicit as implicit
from funcopt import interop as interop
from funcopt import linalg as linalg
from funcopt import lr_finder as lr_finder
from funcopt import nn as nn
from funcopt import schedules as schedules
from funcopt import sweep as sweep
from funcopt import tree as tree
from funcopt import optimizers as optimizers
from funcopt import solvers as solvers
from funcopt import transforms as transforms
from funcopt.base import apply_updates as apply_updates
from funcopt.base import chain as chain
from funcopt.base import EmptyState as EmptyState
from funcopt.base import FuncoptError as FuncoptError
from funcopt.base import GradientTransformation as GradientTransformation
from funcopt.base import identity as identity
from funcopt.base import OptState as OptState
from funcopt.base import PyTree as PyTree
from funcopt.base import ScalarOrSchedule as ScalarOrSchedule
from funcopt.base import Schedule as Schedule
from funcopt.checkpoint import CheckpointError as CheckpointError
from funcopt.checkpoint import CheckpointManager as CheckpointManager
from funcopt.implicit import custom_root as custom_root
from funcopt.implicit import hypergradient as hypergradient
from funcopt.implicit import unrolled_hypergradient as unrolled_hypergradient
from funcopt.transforms import get_hyperparams as get_hyperparams
from funcopt.transforms import inject_hyperparams as inject_hyperparams
from funcopt.transforms import InjectHyperparamsState as InjectHyperparamsState
from funcopt.transforms import set_hyperparams as set_hyperparams
from funcopt.solvers import lbfgs as lbfgs
from funcopt.solvers import scale_by_lbfgs as scale_by_lbfgs
from funcopt.solvers import ScaleByLbfgsState as ScaleByLbfgsState
from funcopt.solvers import LINESEARCH_STATUS as LINESEARCH_STATUS
from funcopt.solvers import scale_by_backtracking_linesearch as scale_by_backtracking_linesearch
from funcopt.solvers import scale_by_zoom_linesearch as scale_by_zoom_linesearch
from funcopt.solvers import ScaleByBacktrackingLinesearchState as ScaleByBacktrackingLinesearchState
from funcopt.solvers import ScaleByZoomLinesearchState as ScaleByZoomLinesearchState
from funcopt.solvers import value_and_grad_from_state as value_and_grad_from_state
from funcopt.lr_finder import lr_find as lr_find
from funcopt.lr_finder import lr_sweep as lr_sweep
from funcopt.lr_finder import LRFinderResult as LRFinderResult
from funcopt.solvers import minimize as minimize
from funcopt.solvers import MinimizeResult as MinimizeResult
from funcopt.optimizers import adafactor as adafactor
from funcopt.optimizers import adadelta as adadelta
from funcopt.optimizers import asgd as asgd
from funcopt.optimizers import rprop as rprop
from funcopt.transforms import asgd_averaged_params as asgd_averaged_params
from funcopt.transforms import scale_by_adadelta as scale_by_adadelta
from funcopt.transforms import scale_by_asgd as scale_by_asgd
from funcopt.transforms import scale_by_rprop as scale_by_rprop
from funcopt.transforms import ScaleByAdadeltaState as ScaleByAdadeltaState
from funcopt.transforms import ScaleByAsgdState as ScaleByAsgdState
from funcopt.transforms import ScaleByRpropState as ScaleByRpropState
from funcopt.optimizers import adagrad as adagrad
from funcopt.optimizers import adam as adam
from funcopt.optimizers import adamax as adamax
from funcopt.optimizers import adamw as adamw
from funcopt.optimizers import lamb as lamb
from funcopt.optimizers import lion as lion
from funcopt.optimizers import nadam as nadam
from funcopt.optimizers import radam as radam
from funcopt.optimizers import rmsprop as rmsprop
from funcopt.optimizers import sgd as sgd
from funcopt.optimizers import muon as muon
from funcopt.optimizers import muon_with_adamw as muon_with_adamw
from funcopt.transforms import scale_by_muon as scale_by_muon
from funcopt.transforms import scale_by_muon_learning_rate as scale_by_muon_learning_rate
from funcopt.transforms import ScaleByMuonState as ScaleByMuonState
from funcopt.optimizers import sparse_adam as sparse_adam
from funcopt.transforms import reduce_on_plateau as reduce_on_plateau
from funcopt.transforms import ReduceOnPlateauState as ReduceOnPlateauState
from funcopt.sweep import SweepResult as SweepResult
from funcopt.interop import as_torch_optimizer as as_torch_optimizer
from funcopt.interop import FuncoptOptimizer as FuncoptOptimizer
from funcopt.fast import apply_gradients as apply_gradients
from funcopt.fast import DonatedValueError as DonatedValueError
from funcopt.fast import make_step as make_step
from funcopt.fast import grad_and_value as grad_and_value
from funcopt.transforms import add_decayed_weights as add_decayed_weights
from funcopt.transforms import clip as clip
from funcopt.transforms import clip_by_global_norm as clip_by_global_norm
from funcopt.transforms import scale as scale
from funcopt.transforms import scale_by_adam as scale_by_adam
from funcopt.transforms import scale_by_adamax as scale_by_adamax
from funcopt.transforms import scale_by_learning_rate as scale_by_learning_rate
from funcopt.transforms import scale_by_lion as scale_by_lion
from funcopt.transforms import scale_by_nadam as scale_by_nadam
from funcopt.transforms import scale_by_radam as scale_by_radam
from funcopt.transforms import scale_by_rms as scale_by_rms
from funcopt.transforms import scale_by_rss as scale_by_rss
from funcopt.transforms import scale_by_factored_rms as scale_by_factored_rms
from funcopt.transforms import scale_by_relative_step_size as scale_by_relative_step_size
from funcopt.transforms import scale_by_schedule as scale_by_schedule
from funcopt.transforms import scale_by_trust_ratio as scale_by_trust_ratio
from funcopt.transforms import ScaleByAdamaxState as ScaleByAdamaxState
from funcopt.transforms import ScaleByAdafactorState as ScaleByAdafactorState
from funcopt.transforms import ScaleByAdamState as ScaleByAdamState
from funcopt.transforms import ScaleByLionState as ScaleByLionState
from funcopt.transforms import ScaleByNadamState as ScaleByNadamState
from funcopt.transforms import ScaleByRmsState as ScaleByRmsState
from funcopt.transforms import ScaleByRssState as ScaleByRssState
from funcopt.transforms import ScaleByScheduleState as ScaleByScheduleState
from funcopt.transforms import trace as trace
from funcopt.transforms import TraceState as TraceState
from funcopt.transforms import accumulate as accumulate
from funcopt.transforms import AccumulateState as AccumulateState
from funcopt.transforms import apply_if_finite as apply_if_finite
from funcopt.transforms import ApplyIfFiniteState as ApplyIfFiniteState
from funcopt.transforms import freeze as freeze
from funcopt.transforms import masked as masked
from funcopt.transforms import MaskedState as MaskedState
from funcopt.transforms import multi_transform as multi_transform
from funcopt.transforms import MultiTransformState as MultiTransformState
from funcopt.transforms import set_to_zero as set_to_zero
from funcopt.transforms import add_noise as add_noise
from funcopt.transforms import AddNoiseState as AddNoiseState
from funcopt.transforms import adaptive_grad_clip as adaptive_grad_clip
from funcopt.transforms import centralize as centralize
from funcopt.transforms import clip_by_block_rms as clip_by_block_rms
from funcopt.transforms import normalize as normalize
from funcopt.transforms import normalize_by_update_norm as normalize_by_update_norm
from funcopt.transforms import per_example_global_norm_clip as per_example_global_norm_clip
from funcopt.transforms import unitwise_norm as unitwise_norm
from funcopt.transforms import EmaParamsState as EmaParamsState
from funcopt.transforms import ema_params as ema_params
from funcopt.transforms import ema_params_of as ema_params_of
from funcopt.transforms import LookaheadParams as LookaheadParams
from funcopt.transforms import LookaheadState as LookaheadState
from funcopt.transforms import lookahead as lookahead
from funcopt.transforms import lookahead_slow_params as lookahead_slow_params
from funcopt.transforms import SkipUpdatesState as SkipUpdatesState
from funcopt.transforms import ZeroNansState as ZeroNansState
from funcopt.transforms import keep_params_nonnegative as keep_params_nonnegative
from funcopt.transforms import skip_large_updates as skip_large_updates
from funcopt.transforms import skip_not_finite as skip_not_finite
from funcopt.transforms import skip_updates_if as skip_updates_if
from funcopt.transforms import zero_nans as zero_nans
from funcopt.transforms import DifferentiallyPrivateAggregateState as DifferentiallyPrivateAggregateState
from funcopt.transforms import differentially_private_aggregate as differentially_private_aggregate
from funcopt.transforms import HutchinsonState as HutchinsonState
from funcopt.transforms import SophiaState as SophiaState
from funcopt.transforms import gnb_estimator_diag_hessian as gnb_estimator_diag_hessian
from funcopt.transforms import hutchinson_estimator_diag_hessian as hutchinson_estimator_diag_hessian
from funcopt.transforms import scale_by_sophia as scale_by_sophia
from funcopt.optimizers import dpsgd as dpsgd
from funcopt.optimizers import sam as sam
from funcopt.optimizers import SAMState as SAMState
from funcopt.optimizers import sophia as sophia

# catalog A: optax's aliases and their blocks
from funcopt.optimizers import adabelief as adabelief
from funcopt.optimizers import adan as adan
from funcopt.optimizers import amsgrad as amsgrad
from funcopt.optimizers import adamaxw as adamaxw
from funcopt.optimizers import nadamw as nadamw
from funcopt.optimizers import yogi as yogi
from funcopt.optimizers import novograd as novograd
from funcopt.optimizers import sm3 as sm3
from funcopt.optimizers import fromage as fromage
from funcopt.optimizers import lars as lars
from funcopt.optimizers import sign_sgd as sign_sgd
from funcopt.optimizers import signum as signum
from funcopt.optimizers import optimistic_gradient_descent as optimistic_gradient_descent
from funcopt.optimizers import optimistic_adam_v2 as optimistic_adam_v2
from funcopt.optimizers import noisy_sgd as noisy_sgd
from funcopt.optimizers import polyak_sgd as polyak_sgd
from funcopt.transforms import ScaleByAdanState as ScaleByAdanState
from funcopt.transforms import ScaleByAmsgradState as ScaleByAmsgradState
from funcopt.transforms import ScaleByBeliefState as ScaleByBeliefState
from funcopt.transforms import ScaleByNovogradState as ScaleByNovogradState
from funcopt.transforms import ScaleByOptimisticGradientState as ScaleByOptimisticGradientState
from funcopt.transforms import ScaleBySM3State as ScaleBySM3State
from funcopt.transforms import ScaleByYogiState as ScaleByYogiState
from funcopt.transforms import EmaState as EmaState
from funcopt.transforms import ema as ema
from funcopt.transforms import scale_by_adan as scale_by_adan
from funcopt.transforms import scale_by_amsgrad as scale_by_amsgrad
from funcopt.transforms import scale_by_belief as scale_by_belief
from funcopt.transforms import scale_by_nesterov_adam as scale_by_nesterov_adam
from funcopt.transforms import scale_by_novograd as scale_by_novograd
from funcopt.transforms import scale_by_optimistic_gradient as scale_by_optimistic_gradient
from funcopt.transforms import scale_by_polyak as scale_by_polyak
from funcopt.transforms import scale_by_sign as scale_by_sign
from funcopt.transforms import scale_by_sm3 as scale_by_sm3
from funcopt.transforms import scale_by_yogi as scale_by_yogi

# catalog B: optax.contrib and their blocks
from funcopt.optimizers import schedule_free_adamw as schedule_free_adamw
from funcopt.optimizers import schedule_free_sgd as schedule_free_sgd
from funcopt.optimizers import adopt as adopt
from funcopt.optimizers import ademamix as ademamix
from funcopt.optimizers import prodigy as prodigy
from funcopt.optimizers import dadapt_adamw as dadapt_adamw
from funcopt.optimizers import madgrad as madgrad
from funcopt.optimizers import cocob as cocob
from funcopt.optimizers import dog as dog
from funcopt.optimizers import dowg as dowg
from funcopt.optimizers import momo as momo
from funcopt.transforms import schedule_free as schedule_free
from funcopt.transforms import schedule_free_eval_params as schedule_free_eval_params
from funcopt.transforms import scale_by_bias_corrected_rms as scale_by_bias_corrected_rms
from funcopt.transforms import scale_by_adopt as scale_by_adopt
from funcopt.transforms import scale_by_ademamix as scale_by_ademamix
from funcopt.transforms import scale_by_madgrad as scale_by_madgrad
from funcopt.transforms import scale_by_cocob as scale_by_cocob
from funcopt.transforms import scale_by_prodigy as scale_by_prodigy
from funcopt.transforms import scale_by_dadapt_adam as scale_by_dadapt_adam
from funcopt.transforms import scale_by_dog as scale_by_dog
from funcopt.transforms import scale_by_dowg as scale_by_dowg
from funcopt.transforms import scale_by_momo as scale_by_momo
from funcopt.transforms import ScheduleFreeState as ScheduleFreeState
from funcopt.transforms import ScaleByBiasCorrectedRmsState as ScaleByBiasCorrectedRmsState
from funcopt.transforms import ScaleByAdoptState as ScaleByAdoptState
from funcopt.transforms import ScaleByAdemamixState as ScaleByAdemamixState
from funcopt.transforms import ScaleByMadgradState as ScaleByMadgradState
from funcopt.transforms import ScaleByCocobState as ScaleByCocobState
from funcopt.transforms import ScaleByProdigyState as ScaleByProdigyState
from funcopt.transforms import ScaleByDadaptAdamState as ScaleByDadaptAdamState
from funcopt.transforms import ScaleByDogState as ScaleByDogState
from funcopt.transforms import ScaleByDowgState as ScaleByDowgState
from funcopt.transforms import ScaleByMomoState as ScaleByMomoState

if hasattr(fast, "native"):  # the optional native backend
    native = fast.native

# Deprecated module aliases kept from 0.1.0 (the modules moved into packages in 0.2.0).
fused = fast
train_step = fast
wrappers = transforms
plateau = transforms
stacked = sweep

__version__ = "0.3.1"

# Every name re-exported above (the submodules are reached as attributes, not listed).
__all__ = sorted(
    name for name, value in list(globals().items())
    if not name.startswith("_") and not isinstance(value, type(checkpoint))
)
