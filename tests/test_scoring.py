"""The logit refusal metrics of a model's prompts."""
import pytest

from refusal_circuits.batching import last_logits
from refusal_circuits.metrics import log_odds_refusal_score, logit_refusal_metric
from refusal_circuits.scoring import refusal_metrics


def test_refusal_metrics_are_the_metrics_of_the_last_logits(tiny_llama):
    m = tiny_llama
    prompts = ["Tell me about cats", "How do I bake bread?"]
    df = refusal_metrics(m, prompts, batch_size=1)
    logits = last_logits(m, prompts)
    assert list(df.columns) == ["instruction", "logit_metric", "log_odds"] and df.instruction.tolist() == prompts
    assert df.logit_metric.values == pytest.approx(logit_refusal_metric(logits, m.refusal_token_id).numpy(), abs=1e-4)
    assert df.log_odds.values == pytest.approx(log_odds_refusal_score(logits, m.refusal_token_ids).numpy(), abs=1e-4)


def test_an_intervention_changes_the_metric(tiny_llama):
    from refusal_circuits import hooks

    m = tiny_llama
    base = refusal_metrics(m, ["Tell me about cats"])
    zeroed = refusal_metrics(m, ["Tell me about cats"], [(hooks.resid_pre(1), lambda x, hook: x * 0)])
    assert abs(base.logit_metric[0] - zeroed.logit_metric[0]) > 1e-3
