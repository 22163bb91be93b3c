"""Stages: the artifacts that later notebooks build on, each from one function with canonical
parameters recorded beside it (``results/<model>/<stage>-<key>.json``).

A notebook that needs an earlier notebook's artifact asks its stage for it: the stage loads it when it
was computed before with the same parameters, data and weights, and computes (and saves) it otherwise,
so every notebook also runs on its own from an empty ``results/``. No notebook repeats another's
defaults: the defaults live here.

=====================  ======================================  ====================================
stage                  artifact                                made by / used by
=====================  ======================================  ====================================
``refusal_direction``  difference-of-means direction, its      notebook 02 / 03, 04, 05, ...
                       layer and position, candidate scores
=====================  ======================================  ====================================

The head classes, the gate and its amplifiers, and the cipher key join this table as their notebooks
land; :data:`STAGES` lists what is here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

from .data import data_hash, load_instructions
from .direction import DirectionChoice, candidate_directions, select_direction
from .models import ChatModel
from .results import ResultsStore


@dataclass(frozen=True)
class DirectionParams:
    """Canonical parameters of the refusal direction (Arditi et al.'s selection, ``docs/methods.md``).

    Candidates come from the first ``n_train`` harmful and harmless *train* prompts (difference of
    means of ``resid_pre`` at every layer and post-instruction position); each candidate at every
    ``layer_stride``-th layer below ``max_layer_frac * L`` is scored on ``n_val`` *val* prompts of each
    kind, and the filters ``KL <= kl_max``, ``induce > 0`` pick the lowest bypass."""

    n_train: int = 64
    n_val: int = 8
    layer_stride: int = 3
    kl_max: float = 0.1
    max_layer_frac: float = 0.8

    def __post_init__(self):
        for name in ("n_train", "n_val", "layer_stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DirectionParams.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 < self.max_layer_frac <= 1:
            raise ValueError(f"DirectionParams.max_layer_frac must be in (0, 1], got {self.max_layer_frac}.")


def refusal_direction(model: ChatModel, store: ResultsStore | None = None,
                      params: DirectionParams | None = None, progress: bool = True, **overrides
                      ) -> DirectionChoice:
    """The model's refusal direction: loaded from ``store`` if this stage ran before with the same
    parameters (and data and weights), computed and saved otherwise.

    Called with no parameters it is *the* direction every notebook shares; ``params`` or keyword
    overrides (``n_train=128``) give another, saved under its own key. The parameters, the data hash
    and the choice are in the artifact's manifest and in :attr:`DirectionChoice.params`. The candidate
    scoring is a resumable sweep: an interrupted run continues where it stopped."""
    store = store or ResultsStore.for_model(model)
    p = replace(params or DirectionParams(), **overrides)
    harm_tr = load_instructions("harmful", "train", n=p.n_train)
    safe_tr = load_instructions("harmless", "train", n=p.n_train)
    harm_va = load_instructions("harmful", "val", n=p.n_val)
    safe_va = load_instructions("harmless", "val", n=p.n_val)
    key = {**asdict(p), "data": data_hash(harm_tr, safe_tr, harm_va, safe_va)}
    saved = store.load_tensor("refusal_direction", key)
    scores = store.load("direction_scores", key)
    if saved is not None and scores is not None:
        vec, meta = saved
        return DirectionChoice(vec, meta["layer"], meta["position"], scores, meta["baseline_harmful"],
                               meta["baseline_harmless"], params=key)
    cands, positions = candidate_directions(model, harm_tr.instruction.tolist(), safe_tr.instruction.tolist(),
                                            progress=progress)
    layers = [l for l in range(0, model.n_layers, p.layer_stride) if l < p.max_layer_frac * model.n_layers]
    choice = select_direction(model, cands, positions, harm_va.instruction.tolist(), safe_va.instruction.tolist(),
                              layers=layers, kl_max=p.kl_max, max_layer_frac=p.max_layer_frac,
                              progress=progress, checkpoint=store.checkpoint("direction_candidates", key))
    choice.params = key
    store.save("direction_scores", key, choice.scores)
    chosen = choice.scores.set_index(["layer", "position"]).loc[(choice.layer, choice.position)]
    store.save_tensor("refusal_direction", key, choice.direction, layer=choice.layer, position=choice.position,
                      model=model.name, baseline_harmful=choice.baseline_harmful,
                      baseline_harmless=choice.baseline_harmless, norm=float(choice.direction.norm()),
                      **{k: float(chosen[k]) for k in ("bypass", "induce", "kl")})
    return choice


#: every stage by name: ``STAGES["refusal_direction"](model)``
STAGES: dict[str, Callable[..., object]] = {"refusal_direction": refusal_direction}
