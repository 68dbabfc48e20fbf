"""Building blocks and wrappers: each returns a ``GradientTransformation`` that does one thing.

The numerics follow ``torch.optim`` (where torch has the algorithm) so that the optimizers in
:mod:`funcopt.optimizers`, built as chains of these blocks, reproduce torch's trajectories. Every
block works with hyperparameters given as Python numbers or as 0-dim tensors (the latter is what
``inject_hyperparams`` passes, possibly batched under ``vmap``). Ranges are validated only for
Python numbers, at construction time.

The package is split by concept: adaptive scalings such as Adam (``_adaptive``); Adafactor's
factored second moments and relative step size (``_factored``); Adadelta, Rprop and ASGD
(``_torch_extra``); Muon's orthogonalized direction and step (``_orthogonal``); scaling,
learning rates, momentum, weight decay, trust ratio and clipping (``_scale``); wrappers around
other transformations that route leaves (``_masking``: ``masked``, ``freeze``,
``multi_transform``, with the mask and label resolution in ``_labels``) or decide when to update
(``_conditional``: ``apply_if_finite``, ``accumulate``); hyperparameters held in the state
(``_inject``); ``reduce_on_plateau`` (``_plateau``); and the validation helpers for writing your
own blocks (``_common``).
"""

from __future__ import annotations

from funcopt.transforms._adaptive import (
    ScaleByAdamaxState,
    ScaleByAdamState,
    ScaleByLionState,
    ScaleByNadamState,
    ScaleByRmsState,
    ScaleByRssState,
    scale_by_adam,
    scale_by_adamax,
    scale_by_lion,
    scale_by_nadam,
    scale_by_radam,
    scale_by_rms,
    scale_by_rss,
)
from funcopt.transforms._conditional import AccumulateState, ApplyIfFiniteState, accumulate, apply_if_finite
from funcopt.transforms._factored import ScaleByAdafactorState, scale_by_factored_rms, scale_by_relative_step_size
from funcopt.transforms._common import (
    check_beta,
    check_learning_rate,
    check_non_negative,
    first_device,
    init_count,
    is_python_zero,
)
from funcopt.transforms._inject import (
    InjectHyperparamsState,
    get_hyperparams,
    inject_hyperparams,
    injected_states,
    set_hyperparams,
)
from funcopt.transforms._masking import (
    MaskedState,
    MultiTransformState,
    freeze,
    masked,
    multi_transform,
    set_to_zero,
)
from funcopt.transforms._plateau import ReduceOnPlateauState, reduce_on_plateau
from funcopt.transforms._noise import AddNoiseState, add_noise
from funcopt.transforms._clipping_extra import (
    adaptive_grad_clip,
    centralize,
    clip_by_block_rms,
    normalize,
    normalize_by_update_norm,
    per_example_global_norm_clip,
    unitwise_norm,
)
from funcopt.transforms._ema_params import EmaParamsState, ema_params, ema_params_of
from funcopt.transforms._lookahead import LookaheadParams, LookaheadState, lookahead, lookahead_slow_params
from funcopt.transforms._privacy import DifferentiallyPrivateAggregateState, differentially_private_aggregate
from funcopt.transforms._sophia import (
    HutchinsonState,
    SophiaState,
    gnb_estimator_diag_hessian,
    hutchinson_estimator_diag_hessian,
    scale_by_sophia,
)
from funcopt.transforms._sanitize import (
    SkipUpdatesState,
    ZeroNansState,
    keep_params_nonnegative,
    skip_large_updates,
    skip_not_finite,
    skip_updates_if,
    zero_nans,
)
from funcopt.transforms._orthogonal import (
    MUON_NS_COEFFICIENTS,
    ScaleByMuonState,
    is_hidden_matrix,
    scale_by_muon,
    scale_by_muon_learning_rate,
)
from funcopt.transforms._torch_extra import (
    ScaleByAdadeltaState,
    ScaleByAsgdState,
    ScaleByRpropState,
    asgd_averaged_params,
    scale_by_adadelta,
    scale_by_asgd,
    scale_by_rprop,
)
from funcopt.transforms._sparse import scale_by_sparse_adam
# optax.contrib (catalog B)
from funcopt.transforms._ademamix import ScaleByAdemamixState, scale_by_ademamix
from funcopt.transforms._adopt import ScaleByAdoptState, scale_by_adopt
from funcopt.transforms._cocob import ScaleByCocobState, scale_by_cocob
from funcopt.transforms._dadapt import ScaleByDadaptAdamState, ScaleByProdigyState, scale_by_dadapt_adam, scale_by_prodigy
from funcopt.transforms._distance import ScaleByDogState, ScaleByDowgState, scale_by_dog, scale_by_dowg
from funcopt.transforms._madgrad import ScaleByMadgradState, scale_by_madgrad
from funcopt.transforms._momo import ScaleByMomoState, scale_by_momo
from funcopt.transforms._schedule_free import (
    ScaleByBiasCorrectedRmsState,
    ScheduleFreeState,
    scale_by_bias_corrected_rms,
    schedule_free,
    schedule_free_eval_params,
)
# catalog A: optax's aliases
from funcopt.transforms._adan import ScaleByAdanState, scale_by_adan
from funcopt.transforms._belief import ScaleByBeliefState, scale_by_belief
from funcopt.transforms._novograd import ScaleByNovogradState, scale_by_novograd
from funcopt.transforms._optax_adam import (
    ScaleByAmsgradState,
    ScaleByYogiState,
    scale_by_amsgrad,
    scale_by_nesterov_adam,
    scale_by_yogi,
)
from funcopt.transforms._optimistic import ScaleByOptimisticGradientState, scale_by_optimistic_gradient
from funcopt.transforms._polyak import scale_by_polyak
from funcopt.transforms._sign import EmaState, ema, scale_by_sign
from funcopt.transforms._sm3 import ScaleBySM3State, scale_by_sm3
from funcopt.transforms._scale import (
    ScaleByScheduleState,
    TraceState,
    add_decayed_weights,
    clip,
    clip_by_global_norm,
    scale,
    scale_by_learning_rate,
    scale_by_schedule,
    scale_by_trust_ratio,
    trace,
)

__all__ = [
    "ScaleByAdamState",
    "ScaleByAdamaxState",
    "ScaleByNadamState",
    "ScaleByLionState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleByAdafactorState",
    "ScaleByScheduleState",
    "TraceState",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_nadam",
    "scale_by_radam",
    "scale_by_lion",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_factored_rms",
    "scale_by_relative_step_size",
    "scale_by_trust_ratio",
    "scale_by_sparse_adam",
    "trace",
    "add_decayed_weights",
    "clip",
    "clip_by_global_norm",
    # wrappers
    "MaskedState",
    "MultiTransformState",
    "ApplyIfFiniteState",
    "AccumulateState",
    "set_to_zero",
    "masked",
    "freeze",
    "multi_transform",
    "apply_if_finite",
    "accumulate",
    "InjectHyperparamsState",
    "inject_hyperparams",
    "get_hyperparams",
    "set_hyperparams",
    "injected_states",
    "ReduceOnPlateauState",
    "reduce_on_plateau",
    # Muon (orthogonalized updates)
    "ScaleByMuonState",
    "scale_by_muon",
    "scale_by_muon_learning_rate",
    "is_hidden_matrix",
    "MUON_NS_COEFFICIENTS",
    # Adadelta, Rprop, ASGD (torch.optim's)
    "ScaleByAdadeltaState",
    "ScaleByRpropState",
    "ScaleByAsgdState",
    "scale_by_adadelta",
    "scale_by_rprop",
    "scale_by_asgd",
    "asgd_averaged_params",
    # catalog C: wrappers and blocks optax users expect
    "AddNoiseState",
    "add_noise",
    "adaptive_grad_clip",
    "centralize",
    "clip_by_block_rms",
    "normalize",
    "normalize_by_update_norm",
    "per_example_global_norm_clip",
    "unitwise_norm",
    "EmaParamsState",
    "ema_params",
    "ema_params_of",
    "LookaheadParams",
    "LookaheadState",
    "lookahead",
    "lookahead_slow_params",
    "SkipUpdatesState",
    "ZeroNansState",
    "keep_params_nonnegative",
    "skip_large_updates",
    "skip_not_finite",
    "skip_updates_if",
    "zero_nans",
    "DifferentiallyPrivateAggregateState",
    "differentially_private_aggregate",
    "HutchinsonState",
    "SophiaState",
    "gnb_estimator_diag_hessian",
    "hutchinson_estimator_diag_hessian",
    "scale_by_sophia",
    # catalog A: optax's aliases
    "ScaleByAdanState",
    "ScaleByAmsgradState",
    "ScaleByBeliefState",
    "ScaleByNovogradState",
    "ScaleByOptimisticGradientState",
    "ScaleBySM3State",
    "ScaleByYogiState",
    "EmaState",
    "ema",
    "scale_by_adan",
    "scale_by_amsgrad",
    "scale_by_belief",
    "scale_by_nesterov_adam",
    "scale_by_novograd",
    "scale_by_optimistic_gradient",
    "scale_by_polyak",
    "scale_by_sign",
    "scale_by_sm3",
    "scale_by_yogi",
    # optax.contrib: schedule-free, ADOPT, AdEMAMix, MADGRAD, COCOB, D-Adaptation, Prodigy, DoG, DoWG, MoMo
    "ScheduleFreeState",
    "ScaleByBiasCorrectedRmsState",
    "ScaleByAdoptState",
    "ScaleByAdemamixState",
    "ScaleByMadgradState",
    "ScaleByCocobState",
    "ScaleByProdigyState",
    "ScaleByDadaptAdamState",
    "ScaleByDogState",
    "ScaleByDowgState",
    "ScaleByMomoState",
    "schedule_free",
    "schedule_free_eval_params",
    "scale_by_bias_corrected_rms",
    "scale_by_adopt",
    "scale_by_ademamix",
    "scale_by_madgrad",
    "scale_by_cocob",
    "scale_by_prodigy",
    "scale_by_dadapt_adam",
    "scale_by_dog",
    "scale_by_dowg",
    "scale_by_momo",
    # helpers for writing transformations
    "check_beta",
    "check_learning_rate",
    "check_non_negative",
    "first_device",
    "init_count",
    "is_python_zero",
]
