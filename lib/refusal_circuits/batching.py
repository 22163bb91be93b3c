"""Batching, progress bars and the batch-and-cache loop, in one place.

* :func:`batches` -- fixed-size slices of a list;
* :func:`progress` -- a ``tqdm`` bar for long loops, shown to people (a terminal, an interactive
  notebook) and never stored: ``REFUSAL_PROGRESS=0`` (set by ``make figures`` and ``make test``) turns
  every bar off, so executed notebooks hold no progress-bar text;
* :func:`cached_runs` -- run chat-formatted prompts through the bridge in batches and yield each
  batch's logits and activation cache (the loop every activation statistic is built on);
* :func:`last_logits` -- next-token logits at the last prompt position.

Prompts are left-padded (:meth:`~refusal_circuits.models.ChatModel.to_tokens`), so position ``-1`` is
the last prompt token of every row.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator, Sequence

import torch
from jaxtyping import Float

from .models import ChatModel

FwdHooks = Sequence[tuple[str | Callable, Callable]]


def batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    """Consecutive slices of ``items`` of at most ``batch_size`` elements."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    for i in range(0, len(items), batch_size):
        yield items[i:i + batch_size]


def n_batches(n_items: int, batch_size: int) -> int:
    return -(-n_items // batch_size)


def progress_enabled(show: bool = True) -> bool:
    """Whether a progress bar asked for with ``show`` is drawn: never when ``REFUSAL_PROGRESS=0``."""
    return bool(show) and os.environ.get("REFUSAL_PROGRESS", "1") not in ("0", "false", "no")


def progress(iterable: Iterable, total: int | None = None, desc: str = "", show: bool = True):
    """``iterable`` wrapped in a ``tqdm`` bar (``tqdm.auto``: a widget in Jupyter, text in a terminal)
    when :func:`progress_enabled`; the plain iterable otherwise."""
    if not progress_enabled(show):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


@torch.no_grad()
def cached_runs(model: ChatModel, instructions: Sequence[str], names: Sequence[str] | Callable[[str], bool],
                batch_size: int = 32, fwd_hooks: FwdHooks = (), show_progress: bool = False,
                desc: str = "activations", logits_to_keep: int = 0
                ) -> Iterator[tuple[Sequence[str], torch.Tensor, dict]]:
    """For each batch of ``instructions`` (chat-formatted, left-padded): ``(batch, logits, cache)``
    with the activations of the hooks ``names`` (a list of hook names or a filter). ``fwd_hooks`` stay
    on during the run, so the cache sees an intervention (a clamp, an ablation).

    ``logits_to_keep=1`` unembeds only the last position (``0``: every position). A caller that reads
    only the cache passes 1: the unembedding of every position is a large share of a small model's
    forward, and the cached activations are the same either way (tested)."""
    if len(instructions) == 0:
        raise ValueError("No instructions given: the prompt list is empty.")
    keep = names if callable(names) else set(names).__contains__
    keep_kw = {"logits_to_keep": int(logits_to_keep)} if logits_to_keep else {}
    items = list(instructions)
    for batch in progress(batches(items, batch_size), n_batches(len(items), batch_size), desc, show_progress):
        ids, mask = model.to_tokens(batch)
        with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
            logits, cache = model.bridge.run_with_cache(ids, attention_mask=mask, names_filter=keep, **keep_kw)
        yield batch, logits, cache


@torch.no_grad()
def last_logits(model: ChatModel, instructions: Sequence[str], fwd_hooks: FwdHooks = (),
                batch_size: int = 32, show_progress: bool = False) -> Float[torch.Tensor, "n d_vocab"]:
    """Next-token logits (float32, on the CPU) at the last prompt position of each instruction."""
    if len(instructions) == 0:
        raise ValueError("No instructions given: the prompt list is empty.")
    out = []
    items = list(instructions)
    for batch in progress(batches(items, batch_size), n_batches(len(items), batch_size), "logits", show_progress):
        ids, mask = model.to_tokens(batch)
        with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
            logits = model.bridge(ids, attention_mask=mask)
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out)
