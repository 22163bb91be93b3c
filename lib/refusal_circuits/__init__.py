"""refusal_circuits: a thin library behind the notebooks that reproduce two studies of how chat models
refuse ("Analysing the Refusal Circuit in Gemma 2b IT" and "How Alignment Routes", arXiv 2604.04385).

Layers, lowest first (each imports only those below it; ``docs/methods.md`` describes the experiments):

* ``paths``, ``hooks``, ``metrics`` -- where files live, hook names, the refusal metrics as pure functions;
* ``models`` -- loading chat models as TransformerLens 4 bridges (the organism's adapter included);
* ``data``, ``batching``, ``results``, ``reference``, ``plotting``, ``stats`` -- datasets and pair alignment,
  batches / progress / the activation loop, the resumable results store, the reference numbers, figures,
  bootstrap intervals and permutation tests;
* ``scoring``, ``generation`` -- logit metrics and greedy generations of a model's prompts;
* ``direction``, ``patching``, ``engine``, ``heads``, ``dla``, ``gate``, ``routing`` -- the analyses (``engine``:
  the per-head edit loop and the position modes of every per-head experiment; ``routing``: the
  gate's downstream: ablation, knockout cascade, dose-response), ``cipher`` (the in-context cipher);
  ``stages`` -- the artifacts
  later notebooks build on; ``screen`` -- one model's gate screen written as a folder (the panel's unit);
  ``session`` -- the notebooks' first cell (seed, model, results store).

Above the core, never imported by it: ``organism`` (training the refusal organism), ``cli``, ``runner``.
"""

from . import (batching, cipher, data, direction, dla, engine, gate, generation, heads, hooks, metrics,  # noqa: F401
               models, patching, paths, plotting, reference, results, routing, scoring, screen, session, stages, stats)
from .data import (AlignedPairs, PairAlignmentError, align_pairs, load_instructions, load_safety_pairs,
                   load_toy_pairs)
from .generation import generate, refusal_rate, refusal_scores
from .metrics import (REFUSAL_SUBSTRINGS, is_refusal, log_odds_refusal_score, logit_refusal_metric,
                      pullback_direction)
from .models import CONTROL_MODEL, DEFAULT_MODEL, ChatModel, ModelLoadError, check_model, load_model
from .results import ResultsStore
from .scoring import refusal_metrics
from .session import open_notebook

__all__ = [
    "AlignedPairs", "ChatModel", "CONTROL_MODEL", "DEFAULT_MODEL", "ModelLoadError", "PairAlignmentError",
    "REFUSAL_SUBSTRINGS", "ResultsStore", "align_pairs", "check_model", "generate", "is_refusal",
    "load_instructions", "load_model", "load_safety_pairs", "load_toy_pairs", "log_odds_refusal_score",
    "logit_refusal_metric", "open_notebook", "pullback_direction", "refusal_metrics", "refusal_rate", "refusal_scores",
]
__version__ = "0.1.0"
