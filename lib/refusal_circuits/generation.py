"""Greedy generation and the generative refusal score, in one place.

* :func:`generate` -- greedy completions, batched with left padding, with hooks active for every
  generated token (so an intervention applies during generation too);
* :func:`generate_conditions` -- the same prompts under several sets of hooks that only change the
  last prompt position and what follows (the cipher rescue): the rest of each prompt is run once and
  its key/value cache reused by every set;
* :func:`refusal_scores` -- completions with their substring refusal flags
  (:func:`~refusal_circuits.metrics.is_refusal`); with a checkpoint, every batch is saved as it
  finishes and an interrupted run resumes;
* :func:`refusal_rate` -- the mean flag.
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

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


def _stacked_hooks(hook_sets: Sequence[FwdHooks], k: int) -> FwdHooks:
    """One hook per hook name over a batch whose row ``i * k + c`` is prompt ``i`` under condition ``c``:
    each condition's hooks see (and return) only their own rows, in prompt order."""
    by_name: dict[str, list[list[Callable]]] = {}
    for c, fwd in enumerate(hook_sets):
        for name, fn in fwd:
            if not isinstance(name, str):
                raise ValueError(f"generate_conditions needs hook names, not filters; got {name!r}.")
            by_name.setdefault(name, [[] for _ in range(k)])[c].append(fn)

    def make(per_condition: list[list[Callable]]):
        def hook(t, hook):
            out = t.clone()
            for c, fns in enumerate(per_condition):
                piece = t[c::k]
                for fn in fns:
                    result = fn(piece, hook=hook)
                    piece = piece if result is None else result
                out[c::k] = piece
            return out

        return hook

    return [(name, make(fns)) for name, fns in by_name.items()]


@torch.no_grad()
def generate_conditions(model: ChatModel, instructions: Sequence[str], conditions: Mapping[str, FwdHooks | Callable],
                        max_new_tokens: int = 64, batch_size: int = 16, conditions_per_batch: int | None = None,
                        progress: bool = True, prefixes: dict | None = None, share_prefix: bool = True
                        ) -> dict[str, list[str]]:
    """Greedy completions of the same ``instructions`` under each of ``conditions`` (name -> hooks), as
    :func:`generate` gives them one condition at a time, in far fewer forwards:

    * every prompt's first ``n - 1`` positions are run once, without hooks, and their key/value cache
      is shared by every condition;
    * ``conditions_per_batch`` conditions (default: all) are generated together, stacked along the
      batch, each condition's hooks acting on its own rows only.

    A condition may be a callable ``rows -> hooks``, given the batch's row indices into
    ``instructions`` (for hooks that carry per-prompt values). This is exact for hooks that act on
    each row alone and leave the prompt's earlier positions untouched, such as a write at position
    ``-1`` (the last prompt token on the prompt pass, the new token on each step); the tests check it
    against :func:`generate` on every tiny architecture. Returns ``{name: completions}`` in input order.

    With ``share_prefix=False`` nothing is shared but the batch: then any hooks that act on each row
    alone are exact, including ones at every position (a steering vector).

    ``prefixes``: a dict in which each batch's prefix cache is kept, so that later calls on the same
    ``instructions`` and ``batch_size`` (the parts of a checkpointed sweep) skip the prefix too.
    """
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if not conditions:
        raise ValueError("No conditions given: pass at least one name -> hooks (an empty list for none).")
    names = list(conditions)
    per = len(names) if conditions_per_batch is None else int(conditions_per_batch)
    if per < 1:
        raise ValueError(f"conditions_per_batch must be >= 1, got {conditions_per_batch}.")
    tok = model.tokenizer
    items = list(instructions)
    out: dict[str, list[str]] = {name: [] for name in names}
    bar = progress_bar(batches(list(range(len(items))), batch_size), n_batches(len(items), batch_size),
                       "generating", progress)
    for rows in bar:
        rows = list(rows)
        ids, mask = model.to_tokens([items[i] for i in rows])
        if share_prefix and ids.shape[1] < 2:
            raise ValueError("A prompt of one token has no prefix to share; pass share_prefix=False.")
        key = tuple(items[i] for i in rows)
        prefix = None if prefixes is None else prefixes.get(key)
        if share_prefix and prefix is None:
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            prefix = model.hf_model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                                    position_ids=positions[:, :-1], use_cache=True).past_key_values
            if prefixes is not None:
                prefixes[key] = prefix
        for group in batches(names, per):
            k = len(group)
            fwd = _stacked_hooks([conditions[n](rows) if callable(conditions[n]) else conditions[n]
                                  for n in group], k)
            cache = None
            if share_prefix:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(k)
            with model.bridge.hooks(fwd_hooks=list(fwd)):
                gen = model.hf_model.generate(
                    input_ids=ids.repeat_interleave(k, 0), attention_mask=mask.repeat_interleave(k, 0),
                    past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False,
                    pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None,
                )
            texts = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
            for c, name in enumerate(group):
                out[name] += texts[c::k]
    return out


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
