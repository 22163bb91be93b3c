"""Attention-head classes of the seed write-up (§B 8-11, ``docs/methods.md`` "04_head_classes").

* :func:`pattern_scores` -- the three scores of one attention pattern ``[batch, head, query, key]``:
  *direct* (last query -> subject key), *diagonal* (attention to the previous position, averaged over
  the query positions that have one), *BOS* (attention to the first position, averaged likewise);
* :func:`head_scores` -- those scores for every (query) head of some layers on aligned pairs, per pair
  and half; :func:`summarise_scores` -- mean ± spread per head and half;
* :func:`classify_heads` -- direct / diagonal / BOS / other by threshold;
* :func:`class_patches` -- the head classes as patches for :func:`refusal_circuits.patching.patch_sweep`;
* :func:`patched_generations` -- greedy generations with a class's ``z`` taken from the other half of
  each pair at the prompt positions (generated positions left alone);
* :func:`head_writes` -- each head's output at the last position projected on a direction, per pair
  and half, and :func:`direct_vs_rest` -- the direct-minus-other statistic, with a random-direction
  control;
* :func:`mean_z_hooks` -- replace some heads' ``z`` at the last positions by a mean (format dependence).

Heads are *query* heads: for grouped-query models ``hook_z`` and ``hook_pattern`` have one slice per
query head, and that is what is scored, patched and projected.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from . import hooks
from .batching import FwdHooks, cached_runs
from .data import AlignedPairs
from .generation import refusal_scores
from .models import ChatModel
from .patching import Mode, Patch, Site
from .results import Checkpoint, run_parts

HEAD_CLASSES = ("direct", "diagonal", "BOS", "other")


def middle_layers(model: ChatModel, layers: str | Sequence[int] = "middle") -> list[int]:
    """``"middle"`` (the middle third of the depth, the write-up's L6-L12 of 18), ``"all"``, or a list."""
    if isinstance(layers, str):
        if layers == "middle":
            return list(model.middle_third)
        if layers == "all":
            return list(range(model.n_layers))
        raise ValueError(f"layers must be 'middle', 'all' or a list of layer indices, got {layers!r}.")
    out = [int(l) for l in layers]
    bad = [l for l in out if not 0 <= l < model.n_layers]
    if bad or not out:
        raise ValueError(f"layers {bad or out} outside [0, {model.n_layers}).")
    return out


def pattern_scores(pattern: Float[torch.Tensor, "batch head query key"], subject: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """The three head scores of attention patterns (rows = query positions, columns = key positions;
    ``pattern[b, h, q, k]`` = attention query ``q`` pays to key ``k``), one value per (batch, head).

    * ``direct`` = ``pattern[b, h, -1, subject[b]]``: the last position's attention to the subject;
    * ``diagonal`` = mean over ``q >= 1`` of ``pattern[b, h, q, q - 1]``: the share of attention each
      query position pays to its previous position, averaged over the positions that have one, so that
      it is comparable across prompt lengths (the write-up sums the sub-diagonal instead; its sum is
      ``(T - 1)`` times ours);
    * ``BOS`` = mean over ``q >= 1`` of ``pattern[b, h, q, 0]``: attention parked on the first position.
    """
    if pattern.ndim != 4 or pattern.shape[-1] != pattern.shape[-2]:
        raise ValueError(f"pattern must be [batch, head, query, key] with query = key positions, got "
                         f"{tuple(pattern.shape)}.")
    B, H, T, _ = pattern.shape
    if T < 2:
        raise ValueError("Scores need at least two positions.")
    p = pattern.float()
    subject = torch.as_tensor(subject, device=p.device).long().view(B)
    direct = p[torch.arange(B, device=p.device), :, T - 1, subject]             # [B, H]
    q = torch.arange(1, T, device=p.device)
    diagonal = p[:, :, q, q - 1].mean(-1)
    bos = p[:, :, 1:, 0].mean(-1)
    return {"direct": direct, "diagonal": diagonal, "BOS": bos}


@torch.no_grad()
def head_scores(model: ChatModel, pairs: AlignedPairs, layers: str | Sequence[int] = "middle") -> pd.DataFrame:
    """:func:`pattern_scores` of every query head of ``layers`` on both halves of every aligned pair.
    One row per (pair, half, layer, head): ``pair_id, kind, layer, head, direct, diagonal, BOS``
    (``kind`` is ``harmful`` for the pairs' first column, ``harmless`` for the second)."""
    layers = middle_layers(model, layers)
    names = [hooks.pattern(l) for l in layers]
    rows = []
    for _, idx in pairs.length_groups().items():
        subject = torch.tensor(pairs.pairs.subject_pos.values[idx])
        for kind, toks in zip(("harmful", "harmless"), pairs.batch(idx)):
            _, cache = model.bridge.run_with_cache(toks, names_filter=lambda n: n in names)
            for l, name in zip(layers, names):
                s = pattern_scores(cache[name], subject)
                for bi, pi in enumerate(idx):
                    for h in range(s["direct"].shape[1]):
                        rows.append({"pair_id": pairs.pairs.pair_id.iloc[pi], "kind": kind, "layer": l, "head": h,
                                     **{k: float(v[bi, h]) for k, v in s.items()}})
    return pd.DataFrame(rows)


def summarise_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over pairs of each score, per (layer, head) and half (``kind``,
    plus ``all`` = both halves together). Columns ``layer, head, kind, <score>_mean, <score>_std, n``."""
    both = pd.concat([scores, scores.assign(kind="all")], ignore_index=True)
    agg = both.groupby(["layer", "head", "kind"])[list(("direct", "diagonal", "BOS"))].agg(["mean", "std"])
    agg.columns = [f"{a}_{b}" for a, b in agg.columns]
    agg["n"] = both.groupby(["layer", "head", "kind"]).size()
    return agg.reset_index()


def classify_heads(summary: pd.DataFrame, threshold: float = 0.2, bos_threshold: float = 0.5,
                   kind: str = "all") -> pd.DataFrame:
    """One class per head from the mean scores over ``kind`` (default both halves): **direct** if the
    direct score >= ``threshold``, else **diagonal** if the diagonal score >= ``threshold``, else
    **BOS** (inactive) if the BOS score >= ``bos_threshold``, else **other**. Returns the summary rows
    of ``kind`` with a ``class`` column and the head's label ``L{layer}H{head}``."""
    if not 0 < threshold < 1 or not 0 < bos_threshold <= 1:
        raise ValueError(f"thresholds must be in (0, 1), got {threshold} and {bos_threshold}.")
    s = summary[summary.kind == kind].copy()
    if s.empty:
        raise ValueError(f"No scores for kind {kind!r}; kinds are {sorted(summary.kind.unique())}.")
    s["class"] = np.select([s.direct_mean >= threshold, s.diagonal_mean >= threshold, s.BOS_mean >= bos_threshold],
                           ["direct", "diagonal", "BOS"], "other")
    s["label"] = [f"L{l}H{h}" for l, h in zip(s.layer, s["head"])]
    return s.reset_index(drop=True)


def heads_of(classes: pd.DataFrame, cls: str) -> list[tuple[int, int]]:
    """The ``(layer, head)`` pairs of one class, strongest first (by the score that defines it)."""
    if cls not in HEAD_CLASSES:
        raise ValueError(f"class must be one of {HEAD_CLASSES}, got {cls!r}.")
    key = {"direct": "direct_mean", "diagonal": "diagonal_mean", "BOS": "BOS_mean", "other": "direct_mean"}[cls]
    sub = classes[classes["class"] == cls].sort_values(key, ascending=False)
    return [(int(l), int(h)) for l, h in zip(sub.layer, sub["head"])]


def class_patches(classes: pd.DataFrame, pos="all") -> list[Patch]:
    """Patches replacing the ``hook_z`` of every head of a class together: direct, diagonal,
    direct + diagonal, and all other heads of the scored layers (BOS and other). Empty classes are left out."""
    groups = {
        "direct": heads_of(classes, "direct"),
        "diagonal": heads_of(classes, "diagonal"),
        "direct + diagonal": heads_of(classes, "direct") + heads_of(classes, "diagonal"),
        "all other heads": heads_of(classes, "BOS") + heads_of(classes, "other"),
    }
    out = []
    for name, heads in groups.items():
        if heads:
            sites = tuple(Site(hooks.z(l), pos, h) for l, h in heads)
            out.append(Patch(name, sites, {"class": name, "n_heads": len(heads),
                                           "heads": ",".join(f"L{l}H{h}" for l, h in heads)}))
    return out


def z_write_hooks(heads: Sequence[tuple[int, int]], source: dict[str, torch.Tensor], n_prompt: int) -> list:
    """Hooks writing ``source[hook_z name][:, :, head]`` into the run's ``z`` of those heads on the
    forward pass that sees the whole prompt (``n_prompt`` positions) -- the first step of
    ``generate``. Later steps (one new position each, keys and values cached) are left alone."""
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(int(l), []).append(int(h))

    def make(name, hs):
        def hook(z, hook):
            if z.shape[1] != n_prompt:
                return z
            z = z.clone()
            src = source[name].to(device=z.device, dtype=z.dtype)
            z[:, :, hs] = src[:, :, hs]
            return z
        return hook

    return [(hooks.z(l), make(hooks.z(l), hs)) for l, hs in by_layer.items()]


@torch.no_grad()
def patched_generations(model: ChatModel, pairs: AlignedPairs, heads: Sequence[tuple[int, int]],
                        mode: Mode = "noising", max_new_tokens: int = 32, batch_size: int = 16,
                        checkpoint: Checkpoint | None = None) -> pd.DataFrame:
    """Greedy completions of the target half of each pair with ``heads``' ``z`` taken from the other
    half, at every prompt position; the generated positions are left alone (the source prompt has no
    continuation to copy from). ``noising`` runs the harmful prompt with harmless activations,
    ``denoising`` the reverse. The two halves of a pair have the same token length, so with left
    padding a batch of targets and its batch of sources line up position for position. One row per
    pair: ``pair_id, instruction, completion, refused``. With ``checkpoint`` each batch is saved as it
    finishes."""
    if mode not in ("noising", "denoising"):
        raise ValueError(f"mode must be 'noising' or 'denoising', got {mode!r}.")
    if not heads:
        raise ValueError("No heads given to patch.")
    col_t, col_s = ("harmful", "harmless") if mode == "noising" else ("harmless", "harmful")
    names = sorted({hooks.z(l) for l, _ in heads})
    batches = [list(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]

    def one_batch(idx):
        source, mask = model.to_tokens([pairs.pairs[col_s].iloc[i] for i in idx])
        _, cache = model.bridge.run_with_cache(source, attention_mask=mask, names_filter=lambda n: n in names)
        fwd = z_write_hooks(heads, {n: cache[n] for n in names}, source.shape[1])
        prompts = [pairs.pairs[col_t].iloc[i] for i in idx]
        out = refusal_scores(model, prompts, max_new_tokens, batch_size=len(idx), fwd_hooks=fwd, progress=False)
        return out.assign(pair_id=[pairs.pairs.pair_id.iloc[i] for i in idx])

    df = run_parts(batches, one_batch, checkpoint, f"generating ({mode})",
                   part_ids=[",".join(str(pairs.pairs.pair_id.iloc[i]) for i in idx) for idx in batches])
    return df[["pair_id", "instruction", "completion", "refused"]]


@torch.no_grad()
def head_outputs(model: ChatModel, instructions: Sequence[str], layers: Sequence[int], position: int = -1,
                 batch_size: int = 32) -> Float[torch.Tensor, "prompt layer head d_model"]:
    """Each query head's output ``z_h @ W_O[h]`` at ``position`` (float32, CPU), for every prompt and
    layer of ``layers``. It is the head's share of the attention output before any post-attention norm
    (Gemma-2 and GLM-4 normalise the summed output again)."""
    names = [hooks.z(l) for l in layers]
    W_O = model.bridge.W_O  # [layer, head, d_head, d_model]
    out = []
    for _, _, cache in cached_runs(model, instructions, names, batch_size, logits_to_keep=1):
        z = torch.stack([cache[n][:, position] for n in names], 1).float()      # [B, L', H, d_head]
        w = W_O[list(layers)].float().to(z.device)                             # [L', H, d_head, d_model]
        out.append(torch.einsum("blhd,lhdm->blhm", z, w).cpu())
    return torch.cat(out)


def head_writes(model: ChatModel, pairs: AlignedPairs, directions: Float[torch.Tensor, "n d_model"],
                layers: Sequence[int]) -> Float[torch.Tensor, "n_dir pair layer head"]:
    """``(out_h(harmful) - out_h(harmless)) . d`` at the last position, for each unit direction ``d``
    (rows of ``directions``, normalised here), pair and head of ``layers``."""
    d = torch.as_tensor(directions, dtype=torch.float32)
    d = (d / d.norm(dim=-1, keepdim=True)).view(-1, d.shape[-1])
    harm = head_outputs(model, list(pairs.pairs.harmful), layers)
    safe = head_outputs(model, list(pairs.pairs.harmless), layers)
    return torch.einsum("plhm,nm->nplh", harm - safe, d)


def direct_vs_rest(writes: Float[torch.Tensor, "n_dir pair layer head"], layers: Sequence[int],
                   direct: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per direction: the mean over pairs and direct heads of the differential write, minus the same
    mean over the other heads of ``layers``."""
    mask = torch.zeros(writes.shape[2:], dtype=torch.bool)
    pos = {l: i for i, l in enumerate(layers)}
    for l, h in direct:
        mask[pos[l], h] = True
    if not mask.any() or mask.all():
        raise ValueError("Need at least one direct head and one other head to compare.")
    per_head = writes.mean(1)                                              # [n_dir, layer, head]
    return (per_head[:, mask].mean(-1) - per_head[:, ~mask].mean(-1)).numpy()


def random_directions(n: int, d_model: int, seed: int = 0) -> torch.Tensor:
    """``n`` seeded random unit vectors (Gaussian, normalised)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d_model, generator=g, dtype=torch.float64)
    return (v / v.norm(dim=-1, keepdim=True)).float()


@torch.no_grad()
def mean_z(model: ChatModel, instructions: Sequence[str], heads: Sequence[tuple[int, int]], n_last: int,
           batch_size: int = 32) -> dict[tuple[int, int], torch.Tensor]:
    """Mean ``z`` of each head over ``instructions`` at the last ``n_last`` positions (counted from the
    end of the left-padded prompt): ``{(layer, head): [n_last, d_head]}``."""
    names = sorted({hooks.z(l) for l, _ in heads})
    total = {hd: 0.0 for hd in heads}
    for _, _, cache in cached_runs(model, instructions, names, batch_size, logits_to_keep=1):
        for l, h in heads:
            total[(l, h)] = total[(l, h)] + cache[hooks.z(l)][:, -n_last:, h].double().sum(0).cpu()
    return {hd: (v / len(instructions)).float() for hd, v in total.items()}


def mean_z_hooks(means: dict[tuple[int, int], torch.Tensor]) -> FwdHooks:
    """Hooks that set each head's ``z`` at the last ``n`` positions to a fixed mean (``n`` = rows of the
    mean), on the pass that sees the whole prompt (any pass longer than one position); generated
    positions are left alone."""
    by_layer: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for (l, h), m in means.items():
        by_layer.setdefault(int(l), []).append((int(h), m))

    def make(items):
        def hook(z, hook):
            if z.shape[1] == 1:
                return z
            z = z.clone()
            for h, m in items:
                n = m.shape[0]
                z[:, -n:, h] = m.to(device=z.device, dtype=z.dtype)
            return z
        return hook

    return [(hooks.z(l), make(items)) for l, items in by_layer.items()]
