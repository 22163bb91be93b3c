"""refusal_circuits: a thin library behind the notebooks that reproduce two studies of how chat models
refuse ("Analysing the Refusal Circuit in Gemma 2b IT" and "How Alignment Routes", arXiv 2604.04385)."""

from . import data, direction, metrics, models, patching, plotting, results  # noqa: F401
from .data import (AlignedPairs, PairAlignmentError, align_pairs, load_instructions, load_safety_pairs,
                   load_toy_pairs)
from .metrics import (REFUSAL_SUBSTRINGS, is_refusal, log_odds_refusal_score, logit_refusal_metric,
                      pullback_direction, refusal_metrics, refusal_scores)
from .models import CONTROL_MODEL, DEFAULT_MODEL, ChatModel, ModelLoadError, load_model
from .results import ResultsStore

__all__ = [
    "AlignedPairs", "ChatModel", "CONTROL_MODEL", "DEFAULT_MODEL", "ModelLoadError", "PairAlignmentError",
    "REFUSAL_SUBSTRINGS", "ResultsStore", "align_pairs", "is_refusal", "load_instructions", "load_model",
    "load_safety_pairs", "load_toy_pairs", "log_odds_refusal_score", "logit_refusal_metric",
    "pullback_direction", "refusal_metrics", "refusal_scores",
]
__version__ = "0.1.0"
