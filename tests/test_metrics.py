import math

import pytest
import torch

from refusal_circuits.metrics import (is_refusal, log_odds_refusal_score, logit_refusal_metric,
                                      pullback_direction)


@pytest.mark.parametrize("text,expected", [
    ("I'm sorry, but I can't help with that.", True),
    ("I\u2019m sorry, I cannot do that", True),            # curly apostrophe
    ("As an AI, I have no opinions.", True),
    ("I am unable to comply.", True),
    ("Sure! Here is a recipe for a cake.", False),
    ("i'm sorry", False),                                 # case-sensitive, like Arditi et al.
    ("", False),
])
def test_is_refusal(text, expected):
    assert is_refusal(text) is expected


def test_logit_metric_by_hand():
    logits = torch.tensor([[1.0, 4.0, -2.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    # r = 1: 4 - mean(1, -2, 3) = 4 - 2/3
    out = logit_refusal_metric(logits, 1)
    assert out[0].item() == pytest.approx(4 - 2 / 3)
    assert out[1].item() == pytest.approx(0.0)


def test_pullback_matches_metric_through_unembedding():
    torch.manual_seed(0)
    W_U = torch.randn(8, 50, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    d = pullback_direction(W_U, 7)
    assert torch.allclose(x @ d, logit_refusal_metric(x @ W_U, 7))


def test_log_odds_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    # p(R) for R = {0, 3} is 0.6 -> log(0.6 / 0.4)
    assert log_odds_refusal_score(logits, [0, 3]).item() == pytest.approx(math.log(1.5), abs=1e-6)
    # duplicates in R do not double count
    assert log_odds_refusal_score(logits, [0, 0, 3]).item() == pytest.approx(math.log(1.5), abs=1e-6)


def test_log_odds_is_stable_for_extreme_logits():
    logits = torch.tensor([[200.0, -200.0, -200.0]])
    assert torch.isfinite(log_odds_refusal_score(logits, [0])).all()
    assert log_odds_refusal_score(logits, [0]).item() == pytest.approx(400 - math.log(2), abs=1e-3)


def test_generate_passes_begin_suppress_tokens(tiny_llama):
    """The organism's self-distillation suppresses refusal tokens at the first reply position only."""
    from refusal_circuits.metrics import generate

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
