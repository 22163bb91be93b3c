"""Greedy generation and the generative refusal score, in one place.

* :func:`generate` -- greedy completions, batched with left padding, with hooks active for every
  generated token (so an intervention applies during generation too);
* :func:`refusal_scores` -- completions with their substring refusal flags
  (:func:`~refusal_circuits.metrics.is_refusal`); with a checkpoint, every batch is saved as it
  finishes and an interrupted run resumes;
* :func:`refusal_rate` -- the mean flag.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from .batching import FwdHooks, batches, n_batches
from .batching import progress as progress_bar
from .metrics import is_refusal
from .models import ChatModel
from .results import Checkpoint, run_parts


@torch.no_grad()
def generate(model: ChatModel, instructions: Sequence[str], max_new_tokens: int = 64,
             batch_size: int = 16, fwd_hooks: FwdHooks = (), progress: bool = True,
             generate_kwargs: dict | None = None) -> list[str]:
    """Greedy completions, batched with left padding. ``fwd_hooks`` (bridge hook names and functions)
    stay active for every generated token. ``generate_kwargs`` go to ``transformers``' ``generate``
    (e.g. ``begin_suppress_tokens``)."""
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    tok = model.tokenizer
    completions: list[str] = []
    items = list(instructions)
    for batch in progress_bar(batches(items, batch_size), n_batches(len(items), batch_size), "generating",
                              progress):
        ids, mask = model.to_tokens(batch)
        with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
            out = model.hf_model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None,
                **(generate_kwargs or {}),
            )
        completions += tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return completions


def refusal_scores(model: ChatModel, instructions: Sequence[str], max_new_tokens: int = 64,
                   batch_size: int = 16, fwd_hooks: FwdHooks = (), progress: bool = True,
                   generate_kwargs: dict | None = None, checkpoint: Checkpoint | None = None) -> pd.DataFrame:
    """Greedy completions with their substring refusal flags: columns ``instruction, completion,
    refused``. The refusal rate is ``df.refused.mean()``. With ``checkpoint``
    (``store.checkpoint(name, params)``) each batch is saved as it finishes and a rerun resumes."""
    if len(instructions) == 0:
        raise ValueError("No instructions given: the prompt list is empty.")
    items = list(instructions)

    def one_batch(batch: Sequence[str]) -> pd.DataFrame:
        comps = generate(model, batch, max_new_tokens, len(batch), fwd_hooks, False, generate_kwargs)
        return pd.DataFrame({"instruction": list(batch), "completion": comps,
                             "refused": [is_refusal(c) for c in comps]})

    return run_parts(list(batches(items, batch_size)), one_batch, checkpoint, "generating", progress)


def refusal_rate(model: ChatModel, instructions: Sequence[str], **kwargs) -> float:
    """The share of ``instructions`` whose greedy completion is a refusal (substring score)."""
    return float(refusal_scores(model, instructions, **kwargs)["refused"].mean())
