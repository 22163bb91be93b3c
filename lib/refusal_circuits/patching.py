"""Activation patching on token-aligned pairs, with many patches packed into one batch.

Vocabulary (the seed write-up's): **noising** runs the harmful prompt and patches in activations from
its harmless twin; **denoising** runs the harmless prompt and patches in activations from the harmful
one. For both, the score is the *fraction moved towards the source*:

    fraction = (patched - target) / (source - target)

with ``target`` the metric of the prompt that is run and ``source`` that of the prompt the activations
come from. For noising this is the write-up's ``(patched - clean) / (corrupt - clean)``.

A :class:`Patch` is a set of :class:`Site` s (hook name, position, optional head) replaced together.
:func:`patch_sweep` caches the source activations once per length group, then runs ``k`` patched
copies of the target batch at once (``k * n_pairs <= max_batch``), so a sweep of P patches over N pairs
costs ``P * N / max_batch`` batched forwards instead of ``P * N`` single ones.

Positions: ``"all"``, ``"subject"`` (the position where the pair differs), ``"last"``, or an int
counted from the end (``-1`` = last).

Long sweeps resume: pass ``checkpoint=store.checkpoint(name, params)`` and the patches are run in
parts, each saved as it finishes (:func:`refusal_circuits.results.run_parts`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence, Union

import numpy as np
import pandas as pd
import torch

from . import hooks
from .batching import progress as progress_bar
from .data import AlignedPairs
from .metrics import logit_refusal_metric
from .models import ChatModel
from .results import Checkpoint, run_parts

PosSpec = Union[str, int]
Mode = Literal["noising", "denoising"]


@dataclass(frozen=True)
class Site:
    hook: str
    pos: PosSpec = "all"
    head: int | None = None  # for per-head hooks (``attn.hook_z``: [batch, pos, head, d_head])


@dataclass
class Patch:
    label: str
    sites: tuple[Site, ...]
    meta: dict = field(default_factory=dict)  # copied into the result rows (layer, position, group...)


def resid_patches(model: ChatModel, positions: Sequence[int], layers: Sequence[int] | None = None
                  ) -> list[Patch]:
    """One patch per (layer, position) of ``resid_pre``."""
    layers = range(model.n_layers) if layers is None else layers
    return [Patch(f"L{l} pos{p}", (Site(hooks.resid_pre(l), p),), {"layer": l, "position": p})
            for l in layers for p in positions]


def block_patches(model: ChatModel, blocks: Sequence[str] = ("attn", "mlp"), pos: PosSpec = "all"
                  ) -> list[Patch]:
    """One patch per individual block output (``hook_attn_out`` / ``hook_mlp_out``) per layer."""
    return [Patch(f"{b} L{l}", (Site(hooks.block_out(l, b), pos),), {"block": b, "layer": l})
            for b in blocks for l in range(model.n_layers)]


def grouped_block_patches(model: ChatModel, n_groups: int = 3) -> list[Patch]:
    """The write-up's 12 settings: {early, middle, late} layer groups (thirds of the depth) x
    {attention, MLP} x {subject, last} position; each patches every block of its group at once."""
    names = ["early", "middle", "late"] if n_groups == 3 else [f"group{i}" for i in range(n_groups)]
    out = []
    for name, group in zip(names, model.layer_groups(n_groups)):
        for b in ("attn", "mlp"):
            for pos in ("subject", "last"):
                sites = tuple(Site(hooks.block_out(l, b), pos) for l in group)
                out.append(Patch(f"{name} {b} @{pos}", sites,
                                 {"group": name, "layers": f"L{group.start}-L{group.stop - 1}", "block": b,
                                  "position": pos}))
    return out


def head_patches(model: ChatModel, heads: Sequence[tuple[int, int]], pos: PosSpec = "all",
                 label: str | None = None) -> Patch:
    """One patch replacing the ``hook_z`` of several heads together (a head class)."""
    sites = tuple(Site(hooks.z(l), pos, h) for l, h in heads)
    return Patch(label or ",".join(f"L{l}H{h}" for l, h in heads), sites, {"n_heads": len(heads)})


def _positions(spec: PosSpec, seq_len: int, subject: torch.Tensor) -> torch.Tensor | None:
    """Per-row position index ``[B]`` or ``None`` for all positions."""
    if spec == "all":
        return None
    if spec == "subject":
        return subject
    if spec == "last":
        return torch.full_like(subject, seq_len - 1)
    if isinstance(spec, (int, np.integer)) and -seq_len <= spec < 0:
        return torch.full_like(subject, seq_len + int(spec))
    raise ValueError(f"Bad position {spec!r}: use 'all', 'subject', 'last' or a negative int >= -{seq_len}.")


def _make_hook(writes: list[tuple[int, Site]], src: dict, B: int, seq_len: int, subject: torch.Tensor):
    """A hook that writes the source activation of each (copy index, site) into its batch rows."""
    rows_b = torch.arange(B, device=subject.device)

    def hook(x, hook):
        x = x.clone()
        for j, site in writes:
            s = src[site.hook]
            rows = slice(j * B, (j + 1) * B)
            pos = _positions(site.pos, seq_len, subject)
            if site.head is None:
                if pos is None:
                    x[rows] = s
                else:
                    x[rows_b + j * B, pos] = s[rows_b, pos]
            else:
                if pos is None:
                    x[rows, :, site.head] = s[:, :, site.head]
                else:
                    x[rows_b + j * B, pos, site.head] = s[rows_b, pos, site.head]
        return x

    return hook


def _decoder_layers(model: ChatModel):
    """The HF module holding the decoder-layer ModuleList whose items are the bridge's blocks."""
    blocks = list(model.bridge.blocks)
    for module in model.hf_model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == len(blocks) and layers[0] is blocks[0]:
            return module
    return None


@contextlib.contextmanager
def skip_lower_layers(model: ChatModel, start: int):
    """Temporarily drop decoder layers ``0..start-1`` from the HF model, so that a bridge forward with
    ``start_at_layer=start`` computes only the layers that a patch at ``start`` can change.

    ``TransformerBridge`` resumes at a layer by swapping the residual in at block ``start`` but still
    runs the blocks below it; this removes them. Per-layer config lists indexed by position
    (``config.layer_types``, e.g. Gemma-2's sliding/global layers) are sliced alike. Yields ``False``
    (and changes nothing) when the layer list cannot be found.
    """
    owner = _decoder_layers(model) if start > 0 else None
    if owner is None:
        yield False
        return
    cfg = model.hf_model.config
    text_cfg = getattr(cfg, "text_config", None) or cfg
    full = owner.layers
    types = getattr(text_cfg, "layer_types", None)
    owner.layers = torch.nn.ModuleList(list(full)[start:])
    if isinstance(types, list) and len(types) == len(full):
        text_cfg.layer_types = types[start:]
    try:
        yield True
    finally:
        owner.layers = full
        if isinstance(types, list):
            text_cfg.layer_types = types


def start_layer(patch: Patch) -> int:
    """The lowest layer any site of ``patch`` touches: nothing below it differs from the target run."""
    layers = [hooks.layer_of(s.hook) for s in patch.sites]
    return 0 if None in layers or not layers else min(layers)


MetricFn = Callable[[torch.Tensor], torch.Tensor]


def default_metric(model: ChatModel) -> MetricFn:
    """The logit refusal metric on last-position logits ``[batch, d_vocab]``."""
    r = model.refusal_token_id
    return lambda last: logit_refusal_metric(last, r)


def patch_sweep(model: ChatModel, pairs: AlignedPairs, patches: Sequence[Patch], mode: Mode = "noising",
                metric: MetricFn | None = None, max_batch: int = 64, extra_hooks: Sequence = (),
                skip_layers: bool = True, progress: bool = True, checkpoint: Checkpoint | None = None,
                patches_per_part: int | None = None) -> pd.DataFrame:
    """Run every patch on every aligned pair. Returns a tidy table with one row per (patch, pair):
    ``label, pair_id, patched, target, source`` plus the patch's ``meta`` columns and
    ``fraction = (patched - target) / (source - target)``. ``extra_hooks`` stay on in every run.

    With ``skip_layers`` (default) each patched forward starts at the patch's lowest layer from the
    target's cached ``resid_pre`` and skips the layers below (see :func:`skip_lower_layers`), so the
    compute is the sum over patches of the layers that can change. Patches are chunked by start
    layer; extra hooks below a patch's start layer would be skipped, so they turn skipping off.

    The work is split into parts of (length group, ``patches_per_part`` patches). Without a checkpoint the
    default is one part per length group (every patch at once, as fast as the engine goes); with
    ``checkpoint`` (``store.checkpoint(name, params)``) it is about 16 batched forwards a part, each part
    is saved atomically as it finishes and a rerun computes only the missing parts. A resumed run returns
    exactly the table of an uninterrupted one with the same parts; different part sizes agree to float
    precision."""
    if mode not in ("noising", "denoising"):
        raise ValueError(f"mode must be 'noising' or 'denoising', got {mode!r}.")
    if not patches:
        raise ValueError("No patches given.")
    if len(pairs) == 0:
        raise ValueError("No pairs given: the aligned pair set is empty.")
    metric = metric or default_metric(model)
    patches = list(patches)
    groups = list(pairs.length_groups().items())
    if patches_per_part is None:  # in memory: one part per length group; saved: ~16 forwards a part
        patches_per_part = len(patches) if checkpoint is None else 16 * max(1, max_batch // len(pairs))
    size = int(patches_per_part)
    if size < 1:
        raise ValueError(f"patches_per_part must be >= 1, got {patches_per_part}.")
    parts = [(g, k) for g in range(len(groups)) for k in range(0, len(patches), size)]
    if extra_hooks:
        skip_layers = False
    current: dict = {}

    def run(part: tuple[int, int]) -> pd.DataFrame:
        g, k = part
        if current.get("group") != g:  # the source and target runs of a length group, cached once
            current.clear()
            current.update(group=g, runs=_group_runs(model, pairs, groups[g][1], patches, mode, metric,
                                                     extra_hooks, skip_layers))
        return _run_patches(model, pairs, groups[g], patches, range(k, min(k + size, len(patches))),
                            current["runs"], max_batch, extra_hooks, skip_layers)

    ids = [f"{groups[g][0]} tokens: " + "|".join(p.label for p in patches[k:k + size]) for g, k in parts]
    df = run_parts(parts, run, checkpoint, f"patching ({mode})", progress, part_ids=ids)
    df = df.sort_values(["_patch", "_pair"], kind="stable").drop(columns=["_patch", "_pair"])
    df = df.reset_index(drop=True)
    df["fraction"] = (df.patched - df.target) / (df.source - df.target)
    return df


@torch.no_grad()
def _group_runs(model: ChatModel, pairs: AlignedPairs, idx: list[int], patches: Sequence[Patch], mode: Mode,
                metric: MetricFn, extra_hooks: Sequence, skip_layers: bool) -> dict:
    """The source run's activations at every patched hook, the target run's ``resid_pre`` at every
    start layer, and both runs' metrics, for the pairs ``idx`` of one length group."""
    needed = sorted({s.hook for p in patches for s in p.sites})
    starts = sorted({start_layer(p) for p in patches}) if skip_layers else [0]
    resid_names = [hooks.resid_pre(l) for l in starts if l > 0]
    a, b = pairs.batch(idx)
    target, source = (a, b) if mode == "noising" else (b, a)
    with model.bridge.hooks(fwd_hooks=list(extra_hooks)):
        src_logits, cache = model.bridge.run_with_cache(source, names_filter=lambda n: n in needed)
        tgt_logits, tcache = model.bridge.run_with_cache(target, names_filter=lambda n: n in resid_names)
    return {"target": target, "src": {k: cache[k] for k in needed},
            "resid": {k: tcache[k] for k in resid_names},
            "m_src": metric(src_logits[:, -1]).cpu(), "m_tgt": metric(tgt_logits[:, -1]).cpu(),
            "metric": metric}


@torch.no_grad()
def _run_patches(model: ChatModel, pairs: AlignedPairs, group: tuple[int, list[int]], patches: Sequence[Patch],
                 which: Sequence[int], runs: dict, max_batch: int, extra_hooks: Sequence, skip_layers: bool
                 ) -> pd.DataFrame:
    """The patches ``which`` on one length group, ``k`` patched copies of the group per forward
    (``k * n_pairs <= max_batch``), each forward started at its patches' lowest layer. One row per
    (patch, pair), with ``_patch`` / ``_pair`` indices for the final order."""
    seq_len, idx = group
    B = len(idx)
    subject = torch.tensor(pairs.pairs.subject_pos.values[idx], device=runs["target"].device)
    order = sorted(which, key=lambda i: start_layer(patches[i]) if skip_layers else 0)
    k = max(1, max_batch // B)
    chunks, cur = [], []
    for i in order:
        if cur and (len(cur) == k or (skip_layers and start_layer(patches[i]) != start_layer(patches[cur[0]]))):
            chunks.append(cur)
            cur = []
        cur.append(i)
    chunks.append(cur)
    rows = []
    for chunk_idx in chunks:
        chunk = [patches[i] for i in chunk_idx]
        by_hook: dict[str, list] = {}
        for j, p in enumerate(chunk):
            for s in p.sites:
                by_hook.setdefault(s.hook, []).append((j, s))
        fwd = [(h, _make_hook(w, runs["src"], B, seq_len, subject)) for h, w in by_hook.items()]
        k0 = start_layer(chunk[0]) if skip_layers else 0
        with model.bridge.hooks(fwd_hooks=list(extra_hooks) + fwd):
            if k0 > 0:
                resid = runs["resid"][hooks.resid_pre(k0)].repeat(len(chunk), 1, 1)
                with skip_lower_layers(model, k0):
                    logits = model.bridge(resid, start_at_layer=k0, use_cache=False)
            else:
                logits = model.bridge(runs["target"].repeat(len(chunk), 1))
        vals = runs["metric"](logits[:, -1]).cpu().view(len(chunk), B)
        for j, (pidx, p) in enumerate(zip(chunk_idx, chunk)):
            for bi, pi in enumerate(idx):
                rows.append({"_patch": pidx, "_pair": pi, "label": p.label,
                             "pair_id": pairs.pairs.pair_id.iloc[pi], "patched": vals[j, bi].item(),
                             "target": runs["m_tgt"][bi].item(), "source": runs["m_src"][bi].item(), **p.meta})
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame, by: Sequence[str] = ("label",), n_boot: int = 500, seed: int = 0
              ) -> pd.DataFrame:
    """Fraction moved towards the source per patch, as a ratio of means over pairs
    ``(mean patched - mean target) / (mean source - mean target)`` (robust to pairs with a tiny gap),
    with a bootstrap 95% interval over pairs and the mean patched metric."""
    rng = np.random.default_rng(seed)
    out = []
    for key, g in df.groupby(list(by), sort=False):
        p, t, s = g.patched.values, g.target.values, g.source.values
        frac = (p.mean() - t.mean()) / (s.mean() - t.mean())
        idx = rng.integers(0, len(g), size=(n_boot, len(g)))
        boot = (p[idx].mean(1) - t[idx].mean(1)) / (s[idx].mean(1) - t[idx].mean(1))
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row.update(fraction=frac, lo=np.quantile(boot, 0.025), hi=np.quantile(boot, 0.975),
                   patched_mean=p.mean(), n_pairs=len(g))
        for col in g.columns:
            if col not in row and col not in ("pair_id", "patched", "target", "source", "fraction"):
                row[col] = g[col].iloc[0]
        out.append(row)
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------------------------
# Per-head interchange and its attribution-patching screen
# ------------------------------------------------------------------------------------------------


def all_heads(model: ChatModel, layers: Sequence[int] | None = None) -> list[tuple[int, int]]:
    layers = range(model.n_layers) if layers is None else layers
    return [(l, h) for l in layers for h in range(model.n_heads)]


def head_interchange(model: ChatModel, pairs: AlignedPairs, mode: Mode = "noising",
                     heads: Sequence[tuple[int, int]] | None = None, max_batch: int = 64,
                     progress: bool = True, **kwargs) -> pd.DataFrame:
    """Exact interchange of every head's ``z`` at all positions, one head at a time.

    ``mode="noising"`` runs the harmful (sensitive) prompt with one head's ``z`` taken from the
    harmless (control) run: the metric drop measures the head's *necessity*. ``"denoising"`` runs the
    control with the head from the sensitive run: *sufficiency*. Returns one row per (head, pair).
    """
    heads = all_heads(model) if heads is None else heads
    patches = [Patch(f"L{l}H{h}", (Site(hooks.z(l), "all", h),), {"layer": l, "head": h})
               for l, h in heads]
    return patch_sweep(model, pairs, patches, mode, max_batch=max_batch, progress=progress, **kwargs)


def attribution_head_scores(model: ChatModel, pairs: AlignedPairs, mode: Mode = "noising",
                            metric: MetricFn | None = None, progress: bool = True) -> pd.DataFrame:
    """Attribution patching (gradient x activation difference) for every head's ``z``, all positions.

    Linearises :func:`head_interchange`: for the run prompt (``target``), the estimated change when
    head ``(l, h)`` takes the source's ``z`` is ``sum_pos (z_source - z_target) . dM/dz_target``.
    Gradients come from TransformerLens 4's
    ``tools.analysis.attribution_patching.cache_activation_and_gradient`` (backward hooks on the
    bridge), one forward + backward per length group for all heads at once. Returns one row per
    (head, pair) with ``estimate`` (the estimated ``patched - target``) plus ``target`` and ``source``.
    """
    from transformer_lens.tools.analysis.attribution_patching import cache_activation_and_gradient

    metric = metric or default_metric(model)
    names = [hooks.z(l) for l in range(model.n_layers)]
    rows = []
    groups = list(pairs.length_groups().items())
    for seq_len, idx in progress_bar(groups, len(groups), f"attribution ({mode})", progress):
        a, b = pairs.batch(idx)
        target, source = (a, b) if mode == "noising" else (b, a)
        # frozen weights (a merged adapter, a model loaded for inference) leave nothing requiring grad:
        # make the residual stream a leaf that does, so the backward reaches every hook_z
        leaf = [(hooks.resid_pre(0), lambda x, hook: x.detach().requires_grad_(True))]
        with torch.enable_grad(), model.bridge.hooks(fwd_hooks=leaf):
            # the leaf is cached too, so that the backward runs through layer 0's hook_z to reach it
            tgt = cache_activation_and_gradient(model.bridge, target, lambda lg: metric(lg[:, -1]).sum(),
                                                names_filter=names + [leaf[0][0]])
        with torch.no_grad():
            src_logits, src_cache = model.bridge.run_with_cache(source, names_filter=lambda n: n in names)
            m_src = metric(src_logits[:, -1]).cpu()
            m_tgt = metric(model.bridge(target)[:, -1]).cpu()
        for l, name in enumerate(names):
            diff = (src_cache[name] - tgt.activations[name]).float()        # [B, pos, head, d_head]
            est = (diff * tgt.gradients[name].float()).sum(dim=(1, 3))     # [B, head]
            for bi, pi in enumerate(idx):
                for h in range(model.n_heads):
                    rows.append({"label": f"L{l}H{h}", "layer": l, "head": h,
                                 "pair_id": pairs.pairs.pair_id.iloc[pi], "estimate": est[bi, h].item(),
                                 "target": m_tgt[bi].item(), "source": m_src[bi].item()})
    return pd.DataFrame(rows)
