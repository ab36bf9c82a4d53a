"""Edit metrics (DESIGN.md §3): tensors in, numbers out; no metric ever runs a model."""

from more_lightning.metrics.accuracy import (
    ModalGenerality,
    Reliability,
    TextGenerality,
    TokenAccuracy,
    exact_match,
    token_accuracy,
)
from more_lightning.metrics.locality import (
    EDIT_SCORE_KEYS,
    LocalityAgreement,
    LocalityScore,
    ModalLocality,
    TextLocality,
    argmax_agreement,
    average_score,
    locality_kl,
    locality_score,
)
from more_lightning.metrics.mme import MMEAccuracy, mme_scores, yes_no_correct

__all__ = [
    "EDIT_SCORE_KEYS",
    "LocalityAgreement",
    "LocalityScore",
    "MMEAccuracy",
    "ModalGenerality",
    "ModalLocality",
    "Reliability",
    "TextGenerality",
    "TextLocality",
    "TokenAccuracy",
    "argmax_agreement",
    "average_score",
    "exact_match",
    "locality_kl",
    "locality_score",
    "mme_scores",
    "token_accuracy",
    "yes_no_correct",
]
