"""Downstream of the gate ("How Alignment Routes", arXiv 2604.04385; ``docs/methods.md``,
"06_gate_amplifier"): the detection direction, per-head directional ablation, the knockout cascade
and the dose-response of the detection layer.

* :func:`detection_direction` -- ``d`` = mean(sensitive) - mean(control) of the residual stream entering
  layer ``L // 2`` (Hugging Face's ``hidden_states[L // 2]``) at the last prompt position, unit length,
  with the mean residual norm there (the scale of the dose-response grid);
* :func:`ablation_directions` / :func:`directional_ablation` -- per head, ``u_h = lstsq(W_O[h], d)``
  normalised, and ``z_h <- z_h - alpha (z_h . u_h) u_h`` at every position; score = NLL reduction on the
  sensitive prompts (the gate's NLL metric); :func:`summarise_ablation`;
* :func:`knockout_cascade` -- zero the gate's ``z`` at every position and recompute the amplifiers'
  output DLA (sensitive - control); change % = ``(KO - normal) / |normal|``; the null knocks out random
  heads of nearby layers instead; :func:`cascade_summary`;
* :func:`dose_response` -- ``-alpha d`` on the sensitive prompts, ``+alpha d`` on the controls, at the
  detection layer and every position (generated tokens too), greedy generations scored by the
  substring rule; :func:`dose_summary`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from . import gate as G
from . import hooks
from .batching import batches, cached_runs
from .direction import addition_hooks
from .generation import generate_conditions
from .metrics import is_refusal
from .models import ChatModel
from .patching import skip_lower_layers
from .results import Checkpoint, run_parts


@dataclass
class Detection:
    """The detection direction.

    Attributes:
        layer: the residual stream entering this layer (``resid_pre``; ``L // 2`` by default).
        direction: ``[d_model]`` unit vector, mean(sensitive) - mean(control) at the last prompt position.
        diff_norm: the norm of that mean difference before normalising.
        resid_norm: mean ``||resid||`` over every pair's two prompts at that layer and position.
    """

    layer: int
    direction: torch.Tensor
    diff_norm: float
    resid_norm: float


@torch.no_grad()
def detection_direction(model: ChatModel, gp: G.GatePairs, layer: int | None = None, batch_size: int = 16
                        ) -> Detection:
    """The mean-difference direction of the pairs at ``resid_pre[layer]`` (default ``L // 2``), last
    prompt position."""
    layer = model.n_layers // 2 if layer is None else int(layer)
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"layer must be in [0, {model.n_layers}), got {layer}.")
    name = hooks.resid_pre(layer)

    def last(prompts: Sequence[str]) -> torch.Tensor:
        return torch.cat([c[name][:, -1].float().cpu() for _, _, c in cached_runs(model, prompts, [name], batch_size,
                                                                                  logits_to_keep=1)])

    s, c = last(list(gp.pairs.sensitive)), last(list(gp.pairs.control))
    diff = s.mean(0) - c.mean(0)
    if float(diff.norm()) <= 1e-6 * float(s.norm(dim=-1).mean()):
        raise ValueError(f"The sensitive and control prompts have the same mean residual entering layer {layer} at "
                         "the last position, so there is no detection direction there (e.g. a sliding-window layer "
                         "that sees only the shared template suffix); choose another layer.")
    return Detection(layer, diff / diff.norm(), float(diff.norm()), float(torch.cat([s, c]).norm(dim=-1).mean()))


def ablation_directions(model: ChatModel, d: torch.Tensor) -> torch.Tensor:
    """``[layer, head, d_head]``: per query head the unit ``u`` in ``z`` space whose write ``u @ W_O[h]``
    best matches ``d`` (least squares, ``W_O[h]^T u = d``; the minimum-norm solution, so a head whose
    ``W_O`` is zero gets ``u = 0`` and its ablation does nothing)."""
    W = model.bridge.W_O.detach()
    A = W.double().cpu().transpose(-1, -2)                                        # [L, H, d_model, d_head]
    # singular values below the stored precision's rounding are zeros (a rank-deficient W_O in float32
    # has ~1e-9-relative ones that an exact pseudo-inverse would blow up)
    rtol = max(A.shape[-2:]) * torch.finfo(W.dtype).eps
    u = torch.linalg.pinv(A, rtol=rtol) @ d.double().cpu()   # [L, H, d_head]: min-norm least squares
    return (u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()


@torch.no_grad()
def directional_ablation(model: ChatModel, gp: G.GatePairs, d: torch.Tensor, alpha: float = 5.0,
                         heads: Sequence[tuple[int, int]] | None = None, max_batch: int = 64,
                         pairs_per_batch: int = 8, checkpoint: Checkpoint | None = None,
                         progress: bool = True) -> pd.DataFrame:
    """Per head, ``z_h <- z_h - alpha (z_h . u_h) u_h`` at every position of the sensitive prompt (and
    its target tokens), one head at a time, through the interchange engine (patches packed into the
    batch, each forward started at the head's layer). One row per (head, pair): ``layer, head,
    pair_id, baseline, ablated`` (NLL of the control's answer tokens) and ``reduction = baseline -
    ablated`` (positive: the head's ``d`` component was holding the answer back)."""
    if len(gp) == 0:
        raise G.PairsError("No pairs given.")
    U = ablation_directions(model, d).to(model.device)
    by_layer = G._by_layer(G._head_list(model, heads))
    layers = list(by_layer)
    batches = G._pair_batches(len(gp), pairs_per_batch)
    parts = [(b, l) for b in range(len(batches)) for l in layers]
    current: dict = {}

    def run(part: tuple[int, int]) -> pd.DataFrame:
        b, l = part
        if current.get("batch") != b:
            current.clear()
            idx = batches[b]
            seqs = [torch.cat([gp.sensitive[i], gp.targets[i]]) for i in idx]
            current.update(batch=b, idx=idx, **G._target_batch(model, seqs, [gp.targets[i] for i in idx], layers))
        c = current
        k = max(1, max_batch // len(c["idx"]))

        def write(z, h):
            u = U[l, h].to(z.dtype)
            return z - alpha * (z @ u)[..., None] * u

        rows = []
        hs = by_layer[l]
        for s in range(0, len(hs), k):
            chunk = hs[s:s + k]
            ablated = G._patched_nll(model, c, l, chunk, write, c["t_mask"].bool())
            for j, h in enumerate(chunk):
                for bi, i in enumerate(c["idx"]):
                    base, abl = float(c["baseline"][bi]), float(ablated[j, bi])
                    rows.append({"layer": l, "head": h, "pair_id": gp.pairs.pair_id.iloc[i], "baseline": base,
                                 "ablated": abl, "reduction": base - abl})
        return pd.DataFrame(rows)

    ids = [f"pairs {batches[b][0]}-{batches[b][-1]} L{l}" for b, l in parts]
    return G._sort(run_parts(parts, run, checkpoint, "directional ablation", progress, part_ids=ids), gp)


def summarise_ablation(df: pd.DataFrame, gap: float) -> pd.DataFrame:
    """Per head: mean NLL ``reduction`` over pairs, as % of the mean ``gap``, ranked (1 = strongest)."""
    out = df.groupby(["layer", "head"]).reduction.mean().reset_index()
    out["reduction_pct"] = 100 * out.reduction / gap
    out["rank"] = out.reduction.rank(ascending=False, method="first").astype(int)
    return out.sort_values("rank").reset_index(drop=True)


def _zero_head(layer: int, head: int):
    def hook(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    return [(hooks.z(layer), hook)]


def amplifiers_of(dla: pd.DataFrame, gate: tuple[int, int], k: int = 5) -> list[tuple[int, int]]:
    """The ``k`` heads with the largest ``|dla|`` in the layers after the gate's."""
    later = dla[dla.layer > gate[0]]
    if len(later) == 0:
        raise ValueError(f"The gate L{gate[0]}H{gate[1]} is in the last layer: no head comes after it to amplify it.")
    top = later.assign(a=later.dla.abs()).sort_values("a", ascending=False).head(k)
    return [(int(l), int(h)) for l, h in zip(top.layer, top["head"])]


def null_heads(model: ChatModel, gate: tuple[int, int], exclude: Sequence[tuple[int, int]], n: int = 20,
               window: int = 2, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` random heads (seeded) from the layers within ``window`` of the gate's, other than the gate
    and ``exclude`` (all of them if there are fewer)."""
    skip = {tuple(gate), *map(tuple, exclude)}
    pool = [(l, h) for l in range(max(0, gate[0] - window), min(model.n_layers, gate[0] + window + 1))
            for h in range(model.n_heads) if (l, h) not in skip]
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(pool))[: min(n, len(pool))]
    return [pool[i] for i in sorted(pick)]


def _layer_of(name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def knockout_dla(model: ChatModel, gp: G.GatePairs, knocked: Sequence[tuple[int, int]], batch_size: int = 8,
                 max_batch: int = 64, memo: dict | None = None, resid_layers: Sequence[int] | None = None
                 ) -> dict[tuple[int, int], torch.Tensor]:
    """For each head of ``knocked``: every head's output DLA, sensitive - control, ``[layer, head, pair]``,
    with that head's ``z`` zeroed at every position of both prompts -- what
    :func:`refusal_circuits.gate.head_dla_pairs` gives with the zeroing hook on (the tests check it),
    in fewer layer passes: one unablated run per batch of prompts supplies the layers below each
    knocked head's (which the knockout cannot change) and the residual entering it; the knocked
    forwards start there, the heads of one layer stacked along the batch (``max_batch`` rows), and
    no run unembeds more than its last position.
    ``memo``: a dict that keeps the unablated runs between calls on the same pairs; ``resid_layers``:
    the layers whose entering residual those runs keep (default: the knocked heads' layers), so that
    calls for different layers (the cascade's parts) can share them."""
    from transformer_lens import ActivationCache

    from . import dla as D

    knocked = [(int(l), int(h)) for l, h in knocked]
    by_layer = G._by_layer(knocked)
    names_r = {hooks.resid_pre(int(l)) for l in (by_layer if resid_layers is None else resid_layers) if int(l) > 0}
    missing = sorted(l for l in by_layer if l > 0 and hooks.resid_pre(l) not in names_r)
    if missing:
        raise ValueError(f"resid_layers must include every knocked head's layer; missing {missing}.")
    dirs = G._dla_directions(model, gp)
    memo = {} if memo is None else memo
    per: dict[tuple[int, int], dict[str, list]] = {k: {"sensitive": [], "control": []} for k in knocked}
    with torch.no_grad():
        for kind in ("sensitive", "control"):
            prompts = list(gp.pairs[kind])
            for bi, batch in enumerate(batches(prompts, batch_size)):
                ids, mask = model.to_tokens(batch)
                B = len(batch)
                key = (kind, bi, tuple(batch), tuple(sorted(names_r)))
                if key not in memo:
                    memo[key] = model.bridge.run_with_cache(
                        ids, attention_mask=mask, logits_to_keep=1,
                        names_filter=lambda n: D.needed_for_components(n) or n in names_r)[1]
                base = memo[key]
                everywhere = torch.ones_like(mask, dtype=torch.bool)
                for l, hs in by_layer.items():
                    k = max(1, max_batch // B)
                    for s0 in range(0, len(hs), k):
                        chunk = hs[s0:s0 + k]
                        n = len(chunk)
                        fwd = [(hooks.z(l), G._z_writer(lambda z, h: torch.zeros_like(z), everywhere, chunk, B))]
                        with model.bridge.hooks(fwd_hooks=fwd):
                            if l > 0:
                                with skip_lower_layers(model, l):
                                    _, ko = model.bridge.run_with_cache(
                                        base[hooks.resid_pre(l)].repeat(n, 1, 1), start_at_layer=l,
                                        attention_mask=mask.repeat(n, 1), names_filter=D.needed_for_components,
                                        use_cache=False, logits_to_keep=1)
                            else:
                                _, ko = model.bridge.run_with_cache(ids.repeat(n, 1), attention_mask=mask.repeat(n, 1),
                                                                    names_filter=D.needed_for_components,
                                                                    logits_to_keep=1)
                        merged = {}
                        for name in base.keys():
                            if not D.needed_for_components(name):
                                continue
                            layer = _layer_of(name)
                            below = (layer is not None and layer < l) or name in ("hook_embed", "hook_pos_embed")
                            merged[name] = base[name].repeat(n, *[1] * (base[name].dim() - 1)) if below else ko[name]
                        normed = G._heads_normed(model, ActivationCache(merged, model.bridge))  # [L, H, n*B, d]
                        for j, h in enumerate(chunk):
                            per[(l, h)][kind].append(normed[:, :, j * B:(j + 1) * B])
    out = {}
    for head, runs in per.items():
        sens = (torch.cat(runs["sensitive"], 2) * dirs[None, None]).sum(-1)
        ctrl = (torch.cat(runs["control"], 2) * dirs[None, None]).sum(-1)
        out[head] = sens - ctrl
    return out


def knockout_cascade(model: ChatModel, gp: G.GatePairs, gate: tuple[int, int], dla: pd.DataFrame, k: int = 5,
                     n_random: int = 20, window: int = 2, seed: int = 0, amplifiers: Sequence[tuple[int, int]] | None = None,
                     batch_size: int = 8, checkpoint: Checkpoint | None = None, progress: bool = True) -> pd.DataFrame:
    """Zero the ``z`` of the gate (and, as the null, of each of ``n_random`` heads of the layers within
    ``window`` of it) at every position of both prompts of every pair, and recompute the output DLA
    (sensitive - control, mean over pairs) of the amplifiers (:func:`amplifiers_of` on ``dla``, the
    unablated :func:`refusal_circuits.gate.head_dla` summary, unless given). One row per (knocked head,
    amplifier): ``knocked, kind`` (gate / random), ``amplifier, normal, knockout, change_pct`` =
    ``100 (knockout - normal) / |normal|``, ``suppressed`` (``|DLA|`` moved toward zero). The knockouts
    run through :func:`knockout_dla`; the knocked heads of one layer are a checkpointed part."""
    gate = (int(gate[0]), int(gate[1]))
    amps = list(amplifiers) if amplifiers is not None else amplifiers_of(dla, gate, k)
    knocked = [gate] + null_heads(model, gate, amps, n_random, window, seed)
    normal = dla.set_index(["layer", "head"]).dla
    memo: dict = {}
    layers = list(dict.fromkeys(l for l, _ in knocked))

    def run(layer: int) -> pd.DataFrame:
        heads = [h for h in knocked if h[0] == layer]
        diffs = knockout_dla(model, gp, heads, batch_size, memo=memo, resid_layers=layers)
        rows = []
        for head in heads:
            diff = diffs[head].mean(-1)                                            # [L, H]
            for a in amps:
                n0, ko = float(normal.loc[a]), float(diff[a])
                rows.append({"knocked": f"L{head[0]}H{head[1]}", "kind": "gate" if head == gate else "random",
                             "amplifier": f"L{a[0]}H{a[1]}", "normal": n0, "knockout": ko,
                             "change_pct": 100 * (ko - n0) / abs(n0),
                             "suppressed": bool(np.sign(n0) * (ko - n0) < 0)})
        return pd.DataFrame(rows)

    df = run_parts(layers, run, checkpoint, "knockout cascade", progress, part_ids=[f"L{l}" for l in layers])
    order = {f"L{l}H{h}": i for i, (l, h) in enumerate(knocked)}
    return df.sort_values("knocked", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def cascade_summary(df: pd.DataFrame) -> dict:
    """The statistic: mean ``|change %|`` over the amplifiers, for the gate and for each random head;
    the number of the gate's amplifiers suppressed and the range of their ``|change %|``, the null's mean and sd, and the share of random heads at least
    as large as the gate (an empirical p-value)."""
    per = df.groupby(["knocked", "kind"], sort=False).change_pct.apply(lambda x: x.abs().mean()).reset_index()
    g = df[df.kind == "gate"]
    null = per[per.kind == "random"].change_pct
    gate_stat = float(per[per.kind == "gate"].change_pct.iloc[0])
    return {"gate": g.knocked.iloc[0], "gate_change_pct": gate_stat, "n_amplifiers": len(g),
            "suppressed": int(g.suppressed.sum()),
            "suppression_range_pct": (float(g.change_pct[g.suppressed].abs().min()),
                                      float(g.change_pct[g.suppressed].abs().max()))
            if g.suppressed.any() else (float("nan"), float("nan")),
            "random_mean_pct": float(null.mean()), "random_sd_pct": float(null.std(ddof=1)), "n_random": len(null),
            "p_random_ge_gate": float((1 + (null >= gate_stat).sum()) / (1 + len(null)))}


def dose_response(model: ChatModel, gp: G.GatePairs, detection: Detection,
                  fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), max_new_tokens: int = 32,
                  batch_size: int = 16, checkpoint: Checkpoint | None = None, progress: bool = True) -> pd.DataFrame:
    """Steer at the detection layer: ``alpha = fraction * resid_norm`` (the mean residual norm there, so
    the grid means the same on every model), ``resid_pre[layer] -= alpha d`` on the sensitive prompts
    (attenuation) and ``+= alpha d`` on the controls (amplification), at every position, generated
    tokens included. One row per (kind, fraction, prompt): ``kind, fraction, alpha, instruction,
    completion, refused`` (substring score). Each kind is a checkpointed part, its fractions generated
    together, stacked along the batch (:func:`~refusal_circuits.generation.generate_conditions`, equal
    to one ``generate`` per fraction)."""
    if len(gp) == 0:
        raise G.PairsError("No pairs given.")
    if any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be >= 0 (the sign comes from the prompt kind), got {list(fractions)}.")
    fractions = [float(f) for f in fractions]

    def run(kind: str) -> pd.DataFrame:
        sign = -1.0 if kind == "sensitive" else 1.0
        conditions = {f: addition_hooks(model, detection.direction, detection.layer, sign * f * detection.resid_norm)
                      if f > 0 else [] for f in fractions}
        prompts = list(gp.pairs[kind])
        comps = generate_conditions(model, prompts, conditions, max_new_tokens, batch_size, share_prefix=False,
                                    progress=False)
        return pd.concat([pd.DataFrame({"kind": kind, "fraction": f, "alpha": sign * f * detection.resid_norm,
                                        "instruction": prompts, "completion": comps[f],
                                        "refused": [is_refusal(c) for c in comps[f]]}) for f in fractions],
                         ignore_index=True)

    return run_parts(["sensitive", "control"], run, checkpoint, "dose-response", progress,
                     part_ids=["sensitive", "control"])


def dose_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Refusal rate by prompt kind and ``fraction`` (rows: fraction; columns: kind; plus ``alpha``)."""
    return df.groupby(["kind", "fraction"]).agg(alpha=("alpha", "first"), refusal_rate=("refused", "mean"),
                                                n=("refused", "size")).reset_index()
