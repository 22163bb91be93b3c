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


def test_baseline_stage_tests_whether_the_model_refuses(tiny_llama, tmp_path, monkeypatch):
    store = ResultsStore("m", root=tmp_path)
    base = stages.baseline(tiny_llama, store, progress=False, n_prompts=3, max_new_tokens=2)
    assert list(base.table.kind) == ["harmful"] * 3 + ["harmless"] * 3
    assert base.harmful_rate == base.table.refused[:3].mean() and 0 <= base.p_value <= 1
    ok, why = base.precondition
    assert ok == base.refuses == (base.p_value < 0.05) and "held-out prompts refused" in why
    # a random-weight model does not refuse, so every claim of a conclusion is untestable on it
    assert not base.refuses and "does not refuse" in why

    # saved: a second call generates nothing
    def boom(*a, **k):
        raise AssertionError("regenerated although saved")

    monkeypatch.setattr("refusal_circuits.generation.generate", boom)
    again = stages.baseline(tiny_llama, store, progress=False, n_prompts=3, max_new_tokens=2)
    assert again.table.equals(base.table) and again.p_value == base.p_value


def test_baseline_precondition_follows_the_counts(monkeypatch):
    import pandas as pd

    table = pd.DataFrame({"refused": [True] * 10 + [False] * 2 + [False] * 11 + [True],
                          "kind": ["harmful"] * 12 + ["harmless"] * 12})
    base = stages.Baseline(table, 10 / 12, 1 / 12, stages.fisher_greater(10, 12, 1, 12), True, {"alpha": 0.05})
    assert base.p_value < 0.001 and base.precondition[0] and "harmful 10/12 vs harmless 1/12" in base.summary
    with pytest.raises(ValueError, match="alpha"):
        stages.BaselineParams(alpha=1.5)
