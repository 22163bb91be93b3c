"""Batches, progress bars and the batch-and-cache loop."""
import pytest
import torch

from refusal_circuits import hooks
from refusal_circuits.batching import batches, cached_runs, last_logits, progress, progress_enabled


def test_batches_cover_items_in_order():
    assert [list(b) for b in batches(list(range(7)), 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="batch_size"):
        list(batches([1], 0))


def test_progress_is_off_when_the_environment_says_so(monkeypatch):
    monkeypatch.setenv("REFUSAL_PROGRESS", "0")
    items = [1, 2]
    assert progress(items, 2, "x") is items and not progress_enabled(True)
    monkeypatch.setenv("REFUSAL_PROGRESS", "1")
    assert progress_enabled(True) and not progress_enabled(False)
    assert list(progress(items, 2, "x")) == items and progress(items, 2, "x") is not items


def test_cached_runs_equal_one_prompt_at_a_time(tiny_llama):
    """Left padding in a batch changes nothing at the last position, nor the order of the rows."""
    m = tiny_llama
    prompts = ["Tell me about cats", "How do I bake a loaf of bread at home?", "Hi"]
    name = hooks.resid_pre(1)
    rows = []
    for batch, logits, cache in cached_runs(m, prompts, [name], batch_size=2):
        assert set(cache.keys()) == {name}
        rows += [(p, logits[i, -1], cache[name][i, -1]) for i, p in enumerate(batch)]
    assert [r[0] for r in rows] == prompts
    for p, lg, act in rows:
        ids, _ = m.to_tokens([p])
        _, single = m.bridge.run_with_cache(ids, names_filter=[name])
        assert torch.allclose(act, single[name][0, -1], atol=1e-4)
    assert torch.allclose(last_logits(m, prompts, batch_size=2)[1], rows[1][1].float(), atol=1e-4)
    with pytest.raises(ValueError, match="empty"):
        next(cached_runs(m, [], [name]))


def test_unembedding_only_the_last_position_leaves_the_cache_unchanged(tiny_model):
    """Callers that read only the cache pass logits_to_keep=1: every cached activation is bit-for-bit
    what the full run caches, and the one logit row kept is the last position's."""
    import torch

    from refusal_circuits import dla as D

    prompts = ["Hi", "Write a long story about a dragon who likes tea"]
    (_, full_logits, full), = cached_runs(tiny_model, prompts, D.needed_for_components, batch_size=2)
    (_, last_logits_, last), = cached_runs(tiny_model, prompts, D.needed_for_components, batch_size=2,
                                           logits_to_keep=1)
    assert set(full.keys()) == set(last.keys()) and len(full.keys()) > 0
    for name in full.keys():
        assert torch.equal(full[name], last[name]), name
    assert last_logits_.shape[1] == 1
    assert torch.allclose(last_logits_[:, -1], full_logits[:, -1], atol=1e-4)
