"""The fits that turn a trained grader's logits into the served answer (`train.calibrate` runs them).

One module per fit: `scaling` (temperature, class biases), `choice` (which calibration, fitted on
what), `decision` (argmax or cut-points, the uncertain flag), `answer` (all of them, and mirror
averaging), `features` (the knees' features, cached); the knee gate's fit is `train.knee_gate`.
docs/TRAINING.md (`train.calibrate`) explains each.
"""

from train.calibration.answer import choose_answer
from train.calibration.choice import (
    FIT_SETS,
    choose_calibration,
    choose_fit_set,
    cross_fitted_val_ece,
    cross_validate_calibration,
    fit_set_data,
    patient_folds,
)
from train.calibration.decision import decision_score, fit_cutpoints, uncertain_threshold
from train.calibration.features import FeatureCache, head_logits, pooled_features
from train.calibration.scaling import (
    CALIBRATIONS,
    fit_calibration,
    fit_temperature,
    fit_temperature_and_bias,
    mean_nll,
    view_probabilities,
)

__all__ = [
    "CALIBRATIONS",
    "FIT_SETS",
    "FeatureCache",
    "choose_answer",
    "choose_calibration",
    "choose_fit_set",
    "cross_fitted_val_ece",
    "cross_validate_calibration",
    "decision_score",
    "fit_calibration",
    "fit_cutpoints",
    "fit_set_data",
    "fit_temperature",
    "fit_temperature_and_bias",
    "head_logits",
    "mean_nll",
    "patient_folds",
    "pooled_features",
    "uncertain_threshold",
    "view_probabilities",
]
