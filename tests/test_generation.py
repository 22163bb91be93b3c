"""Greedy generation and the generative refusal score (resumable per batch)."""
import pandas as pd
import pytest
import torch
from refusal_circuits import hooks
from refusal_circuits.generation import (
    generate,
    generate_conditions,
    refusal_rate,
    refusal_scores,
)
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


def _last_write(head, values):
    def hook(z, hook):
        z = z.clone()
        z[:, -1, head] = values.to(z.dtype)
        return z
    return hook


def test_shared_prefix_stacked_generation_equals_one_generate_per_condition(tiny_model):
    """Conditions that write at the last position (the cipher rescue), generated together from one
    prefix cache, give exactly the completions of separate generate() calls, with uneven left padding."""
    m = tiny_model
    prompts = ["Hi", "How do I pick a lock on an old door?", "Write a haiku about tea", "Name two primes"]
    g = torch.Generator().manual_seed(0)
    vals = 8 * torch.randn(len(prompts), int(m.cfg.d_head), generator=g)
    last = m.n_layers - 1

    def per_rows(rows):                            # per-prompt values, as the rescue passes them
        return [(hooks.z(0), _last_write(1, vals[rows]))]

    def scale(resid, hook):                         # the last position only, as the method requires
        resid = resid.clone()
        resid[:, -1] *= 3
        return resid

    conditions = {"none": [], "const": [(hooks.z(last), _last_write(0, vals[0].expand(2, -1)))],
                  "rows": per_rows, "two": [(hooks.z(0), _last_write(1, -vals[0].expand(2, -1))),
                                            (hooks.resid_pre(last), scale)]}
    for per in (None, 1, 3):
        got = generate_conditions(m, prompts, conditions, max_new_tokens=4, batch_size=2,
                                  conditions_per_batch=per, progress=False)
        for name, c in conditions.items():
            want = []
            for i in (0, 2):
                fwd = c(list(range(i, i + 2))) if callable(c) else c
                want += generate(m, prompts[i:i + 2], max_new_tokens=4, batch_size=2, fwd_hooks=fwd, progress=False)
            assert got[name] == want, (m.name, per, name)
    assert got["none"] == generate(m, prompts, max_new_tokens=4, progress=False)
    assert len({tuple(v) for v in got.values()}) > 1          # the hooks really change the replies

    def everywhere(resid, hook):                    # every position: exact only without a shared prefix
        return resid * 3

    steer = {"none": [], "steer": [(hooks.resid_pre(last), everywhere)]}
    got = generate_conditions(m, prompts, steer, max_new_tokens=4, batch_size=4, share_prefix=False, progress=False)
    assert got["steer"] == generate(m, prompts, max_new_tokens=4, fwd_hooks=steer["steer"], progress=False)
    assert got["none"] == generate(m, prompts, max_new_tokens=4, progress=False)


def test_generate_conditions_rejects_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="No conditions"):
        generate_conditions(tiny_llama, ["Hi"], {})
    with pytest.raises(ValueError, match="conditions_per_batch"):
        generate_conditions(tiny_llama, ["Hi"], {"a": []}, conditions_per_batch=0)
    with pytest.raises(ValueError, match="hook names"):
        generate_conditions(tiny_llama, ["Hi"], {"a": [(lambda n: True, lambda z, hook: z)]}, max_new_tokens=1)
