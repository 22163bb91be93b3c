"""Stages: one function per shared artifact, canonical parameters recorded with it, load-or-compute."""
import pytest
import torch

from refusal_circuits import stages
from refusal_circuits.results import ResultsStore

SMALL = dict(n_train=4, n_val=2, layer_stride=1)


def test_direction_stage_computes_once_then_loads(tiny_llama, tmp_path, monkeypatch):
    store = ResultsStore("m", root=tmp_path)
    first = stages.refusal_direction(tiny_llama, store, progress=False, **SMALL)
    assert first.params["n_train"] == 4 and first.params["layer_stride"] == 1 and "data" in first.params

    def boom(*a, **k):
        raise AssertionError("recomputed although saved")

    monkeypatch.setattr(stages, "candidate_directions", boom)
    again = stages.refusal_direction(tiny_llama, store, params=stages.DirectionParams(**SMALL), progress=False)
    assert torch.equal(again.direction, first.direction) and (again.layer, again.position) == (first.layer, first.position)
    assert again.params == first.params
    assert again.scores.equals(first.scores)
    # the parameters and the choice are in the manifest beside the artifact
    manifest = store.manifest("refusal_direction", first.params)
    assert manifest["params"] == first.params and manifest["layer"] == first.layer
    # other parameters are another artifact
    with pytest.raises(AssertionError, match="recomputed"):
        stages.refusal_direction(tiny_llama, store, progress=False, **{**SMALL, "n_val": 3})


def test_canonical_parameters_are_the_defaults():
    p = stages.DirectionParams()
    assert (p.n_train, p.n_val, p.layer_stride, p.kl_max, p.max_layer_frac) == (64, 8, 3, 0.1, 0.8)
    with pytest.raises(ValueError, match="n_train"):
        stages.DirectionParams(n_train=0)
    assert "refusal_direction" in stages.STAGES
