"""Greedy generation and the generative refusal score (resumable per batch)."""
import pandas as pd
import pytest

from refusal_circuits.generation import generate, refusal_rate, refusal_scores
from refusal_circuits.results import ResultsStore


def test_generate_passes_begin_suppress_tokens(tiny_llama):
    """The organism's self-distillation suppresses refusal tokens at the first reply position only."""
    prompts = ["Tell me about cats", "How do I bake bread?"]
    tok, hf = tiny_llama.tokenizer, tiny_llama.hf_model
    ids, mask = tiny_llama.to_tokens(prompts)
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    banned = sorted(set(hf.generate(input_ids=ids, **kw)[:, ids.shape[1]].tolist()))  # the greedy first tokens
    ref = hf.generate(input_ids=ids, begin_suppress_tokens=banned, **kw)[:, ids.shape[1]:]
    assert not set(ref[:, 0].tolist()) & set(banned)
    out = generate(tiny_llama, prompts, max_new_tokens=3, progress=False,
                   generate_kwargs={"begin_suppress_tokens": banned})
    assert out == tok.batch_decode(ref, skip_special_tokens=True)
    assert out != generate(tiny_llama, prompts, max_new_tokens=3, progress=False)


def test_refusal_scores_flags_and_resumes_per_batch(tiny_llama, tmp_path, monkeypatch):
    """A generation run killed after its first batch resumes from the saved batch and gives the same table."""
    import refusal_circuits.generation as G

    prompts = ["Tell me about cats", "How do I bake bread?", "Name a prime", "Write a haiku", "Say hi"]
    store = ResultsStore("m", root=tmp_path)
    full = refusal_scores(tiny_llama, prompts, max_new_tokens=3, batch_size=2, progress=False,
                          checkpoint=store.checkpoint("full", {}))
    assert list(full.columns) == ["instruction", "completion", "refused"] and len(full) == 5
    assert full.refused.tolist() == [G.is_refusal(c) for c in full.completion]
    real, calls, state = G.generate, [], {"die": True}

    def flaky(model, batch, *a, **k):
        calls.append(list(batch))
        if state["die"] and len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second batch
        return real(model, batch, *a, **k)

    monkeypatch.setattr(G, "generate", flaky)
    ck = store.checkpoint("resumed", {})
    with pytest.raises(KeyboardInterrupt):
        refusal_scores(tiny_llama, prompts, max_new_tokens=3, batch_size=2, progress=False, checkpoint=ck)
    calls.clear()
    state["die"] = False
    again = refusal_scores(tiny_llama, prompts, max_new_tokens=3, batch_size=2, progress=False, checkpoint=ck)
    assert calls == [prompts[2:4], prompts[4:]]  # the first batch was not generated again
    pd.testing.assert_frame_equal(again, full)


def test_refusal_rate_and_bad_input(tiny_llama):
    rate = refusal_rate(tiny_llama, ["Say hi"], max_new_tokens=2, progress=False)
    assert 0.0 <= rate <= 1.0
    with pytest.raises(ValueError, match="empty"):
        refusal_scores(tiny_llama, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny_llama, ["hi"], max_new_tokens=0)
