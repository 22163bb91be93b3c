"""The logit refusal metrics of a model's prompts, as a tidy table (the metrics themselves are pure
functions in :mod:`refusal_circuits.metrics`)."""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from .batching import FwdHooks, last_logits
from .metrics import log_odds_refusal_score, logit_refusal_metric
from .models import ChatModel


def refusal_metrics(model: ChatModel, instructions: Sequence[str], fwd_hooks: FwdHooks = (),
                    batch_size: int = 32) -> pd.DataFrame:
    """Both logit-based refusal metrics at the last prompt position of each instruction: columns
    ``instruction, logit_metric, log_odds``. ``fwd_hooks`` (an intervention) stay on during the run."""
    logits = last_logits(model, instructions, fwd_hooks, batch_size)
    return pd.DataFrame({
        "instruction": list(instructions),
        "logit_metric": logit_refusal_metric(logits, model.refusal_token_id).double().numpy(),
        "log_odds": log_odds_refusal_score(logits, model.refusal_token_ids).double().numpy(),
    })
