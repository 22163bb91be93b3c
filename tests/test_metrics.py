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
