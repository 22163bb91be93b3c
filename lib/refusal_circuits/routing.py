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
  output DLA (sensitive - control) under two amplifier rules (ours: top ``|DLA|`` after the gate; the
  paper's kind: top ``|DLA|`` in its depth band, either side); change % = ``(KO - normal) / |normal|``,
  "suppressed" counted both ways; the null knocks out >= 100 random heads of nearby layers instead;
  :func:`cascade_summary`;
* :func:`dose_response` -- ``-alpha d`` on the sensitive prompts, ``+alpha d`` on the controls, at the
  detection layer (or its output, the paper's) and every position (generated tokens too), greedy
  generations; :func:`classify_generations` classes them refusal / compliance / degenerate;
  :func:`dose_summary`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from . import gate as G
from . import engine as E
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
    its target tokens), one head at a time, through the edit engine
    (:func:`refusal_circuits.engine.edit_sweep`: heads packed into the batch, each forward started at the
    head's layer). One row per (head, pair): ``layer, head, pair_id, baseline, ablated`` (NLL of the
    control's answer tokens) and ``reduction = baseline - ablated`` (positive: the head's ``d`` component
    was holding the answer back)."""
    if len(gp) == 0:
        raise G.PairsError("No pairs given.")
    U = ablation_directions(model, d).to(model.device)

    def prepare(idx: list[int], layers: list[int]) -> E.TargetBatch:
        seqs = [torch.cat([gp.sensitive[i], gp.targets[i]]) for i in idx]
        return E.target_batch(model, seqs, [gp.targets[i] for i in idx], layers, idx)

    def write_for(batch: E.TargetBatch, l: int) -> E.Write:
        def write(z, h):
            u = U[l, h].to(z.dtype)
            return z - alpha * (z @ u)[..., None] * u
        return write

    def row(b: E.TargetBatch, l: int, h: int, bi: int, base: float, abl: float) -> dict:
        return {"layer": l, "head": h, "pair_id": gp.pairs.pair_id.iloc[b.idx[bi]], "baseline": base,
                "ablated": abl, "reduction": base - abl}

    df = E.edit_sweep(model, len(gp), heads, prepare, write_for, lambda b: b.mask.bool(), row, "directional ablation",
                      max_batch, pairs_per_batch, checkpoint, progress)
    return G.sort_by_head(df, gp)


def summarise_ablation(df: pd.DataFrame, gap: float) -> pd.DataFrame:
    """Per head: mean NLL ``reduction`` over pairs, as % of the mean ``gap``, ranked (1 = strongest)."""
    out = df.groupby(["layer", "head"]).reduction.mean().reset_index()
    out["reduction_pct"] = 100 * out.reduction / gap
    out["rank"] = out.reduction.rank(ascending=False, method="first").astype(int)
    return out.sort_values("rank").reset_index(drop=True)


AMPLIFIER_RULES = ("after_gate", "paper_band")


def amplifiers_of(dla: pd.DataFrame, gate: tuple[int, int], k: int = 5, rule: str = "after_gate",
                  n_layers: int | None = None) -> list[tuple[int, int]]:
    """The ``k`` amplifier candidates of ``gate`` by ``|dla|`` (the unablated head-DLA summary):

    * ``after_gate`` (ours) -- the largest ``|dla|`` in the layers after the gate's (none for a gate in
      the last layer: an empty list);
    * ``paper_band`` -- the paper's kind of candidate: the largest ``|dla|`` in its 25-65% depth band
      (:func:`refusal_circuits.gate.depth_band` of ``n_layers``), either side of the gate (its published
      amplifiers were chosen by hand from that band: Gemma-2-2B's L8H3 and L12H3 come before its L13 gate)."""
    if rule not in AMPLIFIER_RULES:
        raise ValueError(f"rule must be one of {AMPLIFIER_RULES}, got {rule!r}.")
    gate = (int(gate[0]), int(gate[1]))
    if rule == "after_gate":
        pool = dla[dla.layer > gate[0]]
    else:
        if n_layers is None:
            raise ValueError("the paper_band rule needs n_layers.")
        band = G.depth_band(n_layers)
        pool = dla[dla.layer.isin(band) & ~((dla.layer == gate[0]) & (dla["head"] == gate[1]))]
    top = pool.assign(a=pool.dla.abs()).sort_values("a", ascending=False).head(k)
    return [(int(l), int(h)) for l, h in zip(top.layer, top["head"])]


def null_heads(model: ChatModel, gate: tuple[int, int], exclude: Sequence[tuple[int, int]], n: int = 100,
               window: int = 2, seed: int = 0) -> tuple[list[tuple[int, int]], int]:
    """``n`` random heads (seeded) from the layers within ``window`` of the gate's, other than the gate
    and ``exclude``; the window widens one layer at a time until it holds ``n`` heads (or the whole
    model). Returns ``(heads, window used)``."""
    skip = {tuple(gate), *map(tuple, exclude)}

    def pool_of(w: int) -> list[tuple[int, int]]:
        return [(l, h) for l in range(max(0, gate[0] - w), min(model.n_layers, gate[0] + w + 1))
                for h in range(model.n_heads) if (l, h) not in skip]

    w = int(window)
    while len(pool_of(w)) < n and w < model.n_layers:
        w += 1
    pool = pool_of(w)
    pick = np.random.default_rng(seed).permutation(len(pool))[: min(n, len(pool))]
    return [pool[i] for i in sorted(pick)], w


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
    by_layer = E.by_layer(knocked)
    names_r = {hooks.resid_pre(int(l)) for l in (by_layer if resid_layers is None else resid_layers) if int(l) > 0}
    missing = sorted(l for l in by_layer if l > 0 and hooks.resid_pre(l) not in names_r)
    if missing:
        raise ValueError(f"resid_layers must include every knocked head's layer; missing {missing}.")
    dirs = G.dla_directions(model, gp)
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
                        fwd = [(hooks.z(l), E.z_writer(lambda z, h: torch.zeros_like(z), everywhere, chunk, B))]
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
                            layer = hooks.layer_of(name)
                            below = (layer is not None and layer < l) or name in ("hook_embed", "hook_pos_embed")
                            merged[name] = base[name].repeat(n, *[1] * (base[name].dim() - 1)) if below else ko[name]
                        normed = G.heads_normed(model, ActivationCache(merged, model.bridge))  # [L, H, n*B, d]
                        for j, h in enumerate(chunk):
                            per[(l, h)][kind].append(normed[:, :, j * B:(j + 1) * B])
    out = {}
    for head, runs in per.items():
        sens = (torch.cat(runs["sensitive"], 2) * dirs[None, None]).sum(-1)
        ctrl = (torch.cat(runs["control"], 2) * dirs[None, None]).sum(-1)
        out[head] = sens - ctrl
    return out


def knockout_cascade(model: ChatModel, gp: G.GatePairs, gate: tuple[int, int], dla: pd.DataFrame, k: int = 5,
                     n_random: int = 100, window: int = 2, seed: int = 0,
                     rules: Sequence[str] = AMPLIFIER_RULES, extra: Sequence[tuple[int, int]] = (),
                     batch_size: int = 8, checkpoint: Checkpoint | None = None, progress: bool = True) -> pd.DataFrame:
    """Zero the ``z`` of the gate at every position of both prompts of every pair and recompute the
    output DLA (sensitive - control, mean over pairs) of its amplifiers, under each amplifier rule of
    ``rules`` (:func:`amplifiers_of` on ``dla``, the unablated :func:`refusal_circuits.gate.head_dla`
    summary). The null knocks out instead each of ``n_random`` random heads near the gate
    (:func:`null_heads`, amplifiers excluded); ``extra`` heads are knocked out too, labelled ``extra``.
    ``dla`` only picks the amplifiers; ``normal`` is each amplifier's unablated DLA on ``gp`` itself, the
    pairs the knockouts run on (a screen's summary over other pairs would add the difference between the
    two pair sets to every knockout's change, the null's included).
    One row per (knocked head, rule, amplifier): ``knocked, kind`` (gate / random / extra), ``rule,
    amplifier, normal, knockout, change_pct`` = ``100 (knockout - normal) / |normal|``,
    ``suppressed_signed`` (change % < 0: the paper's count) and ``suppressed_abs`` (``|DLA|`` moved toward
    zero). The knockouts run through :func:`knockout_dla` (all heads' DLA per knockout, so every rule's
    amplifiers come from the same runs); the knocked heads of one layer are a checkpointed part."""
    gate = (int(gate[0]), int(gate[1]))
    amps = {r: amplifiers_of(dla, gate, k, r, model.n_layers) for r in rules}
    every_amp = sorted({a for v in amps.values() for a in v})
    nulls, _ = null_heads(model, gate, every_amp + [tuple(map(int, e)) for e in extra], n_random, window, seed)
    kinds = {gate: "gate", **{tuple(map(int, e)): "extra" for e in extra if tuple(map(int, e)) != gate},
             **{h: "random" for h in nulls}}
    knocked = list(kinds)
    sens, ctrl = G.head_dla_pairs(model, gp, batch_size)
    normal = (sens - ctrl).mean(-1)                                                # [L, H], unablated, on gp
    memo: dict = {}
    layers = sorted(dict.fromkeys(l for l, _ in knocked))

    def run(layer: int) -> pd.DataFrame:
        heads = [h for h in knocked if h[0] == layer]
        diffs = knockout_dla(model, gp, heads, batch_size, memo=memo, resid_layers=layers)
        rows = []
        for head in heads:
            diff = diffs[head].mean(-1)                                            # [L, H]
            for rule, amp_list in amps.items():
                for a in amp_list:
                    n0, ko = float(normal[a]), float(diff[a])
                    rows.append({"knocked": f"L{head[0]}H{head[1]}", "kind": kinds[head], "rule": rule,
                                 "amplifier": f"L{a[0]}H{a[1]}", "normal": n0, "knockout": ko,
                                 "change_pct": 100 * (ko - n0) / abs(n0), "suppressed_signed": bool(ko < n0),
                                 "suppressed_abs": bool(abs(ko) < abs(n0))})
        return pd.DataFrame(rows, columns=["knocked", "kind", "rule", "amplifier", "normal", "knockout", "change_pct",
                                           "suppressed_signed", "suppressed_abs"])

    df = run_parts(layers, run, checkpoint, "knockout cascade", progress, part_ids=[f"L{l}" for l in layers])
    order = {f"L{l}H{h}": i for i, (l, h) in enumerate(knocked)}
    return df.sort_values("knocked", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def cascade_summary(df: pd.DataFrame, rule: str = "after_gate") -> dict:
    """The statistic under one amplifier ``rule``: mean ``|change %|`` over the amplifiers, for the gate
    and for each random head; the gate's amplifiers suppressed, counted both ways (``suppressed_signed``:
    change % < 0, the paper's count; ``suppressed_abs``: ``|DLA|`` toward zero) with the range of their
    ``|change %|``; the null's mean, sample and population sd, and the empirical p = (1 + #random >= gate)
    / (1 + #random). ``testable`` is false (and the numbers NaN) when the rule gives no amplifier."""
    sub = df[df.rule == rule]
    g = sub[sub.kind == "gate"]
    if len(g) == 0:
        nan = float("nan")
        return {"rule": rule, "testable": False, "gate": df[df.kind == "gate"].knocked.iloc[0] if len(df) else None,
                "gate_change_pct": nan, "n_amplifiers": 0, "suppressed_signed": 0, "suppressed_abs": 0,
                "suppression_range_pct": (nan, nan), "random_mean_pct": nan, "random_sd_pct": nan,
                "random_sd_pop_pct": nan, "n_random": 0, "p_random_ge_gate": nan, "amplifiers": []}
    per = sub.groupby(["knocked", "kind"], sort=False).change_pct.apply(lambda x: x.abs().mean()).reset_index()
    null = per[per.kind == "random"].change_pct
    gate_stat = float(per[per.kind == "gate"].change_pct.iloc[0])
    sup = g.suppressed_signed
    return {"rule": rule, "testable": True, "gate": g.knocked.iloc[0], "gate_change_pct": gate_stat,
            "n_amplifiers": len(g), "amplifiers": list(g.amplifier),
            "suppressed_signed": int(g.suppressed_signed.sum()), "suppressed_abs": int(g.suppressed_abs.sum()),
            "suppression_range_pct": (float(g.change_pct[sup].abs().min()), float(g.change_pct[sup].abs().max()))
            if sup.any() else (float("nan"), float("nan")),
            "random_mean_pct": float(null.mean()), "random_sd_pct": float(null.std(ddof=1)),
            "random_sd_pop_pct": float(null.std(ddof=0)), "n_random": len(null),
            "p_random_ge_gate": float((1 + (null >= gate_stat).sum()) / (1 + len(null)))}


DOSE_LAYERS = ("detection", "paper")


def dose_response(model: ChatModel, gp: G.GatePairs, detection: Detection,
                  fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), max_new_tokens: int = 64,
                  batch_size: int = 16, at: str = "detection", checkpoint: Checkpoint | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Steer along the detection direction: ``alpha = fraction * resid_norm`` (the mean residual norm at
    the detection layer, so the grid means the same on every model), ``-alpha d`` on the sensitive
    prompts (attenuation) and ``+alpha d`` on the controls (amplification), at every position, generated
    tokens included. ``at="detection"`` adds to the residual entering the detection layer, where ``d`` was
    measured; ``at="paper"`` adds to that layer's *output* (``resid_pre[layer + 1]``), as the paper's code
    does. One row per (kind, fraction, prompt): ``kind, fraction, alpha, site`` (the hook), ``instruction, completion,
    refused`` (substring score; :func:`classify_generations` separates refusal from broken text). Each kind
    is a checkpointed part, its fractions stacked along the batch
    (:func:`~refusal_circuits.generation.generate_conditions`, equal to one ``generate`` per fraction)."""
    if len(gp) == 0:
        raise G.PairsError("No pairs given.")
    if any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be >= 0 (the sign comes from the prompt kind), got {list(fractions)}.")
    if at not in DOSE_LAYERS:
        raise ValueError(f"at must be one of {DOSE_LAYERS}, got {at!r}.")
    site = hooks.resid_pre(detection.layer) if at == "detection" else hooks.resid_post(detection.layer)
    fractions = [float(f) for f in fractions]

    def push(alpha: float) -> list:
        if at == "detection":
            return addition_hooks(model, detection.direction, detection.layer, alpha)
        v = detection.direction

        def hook(x, hook):                       # the output of the detection layer (= resid_pre[layer + 1])
            return x + alpha * v.to(device=x.device, dtype=x.dtype)

        return [(site, hook)]

    def run(kind: str) -> pd.DataFrame:
        sign = -1.0 if kind == "sensitive" else 1.0
        conditions = {f: push(sign * f * detection.resid_norm) if f > 0 else [] for f in fractions}
        prompts = list(gp.pairs[kind])
        comps = generate_conditions(model, prompts, conditions, max_new_tokens, batch_size, share_prefix=False,
                                    progress=False)
        return pd.concat([pd.DataFrame({"kind": kind, "fraction": f, "alpha": sign * f * detection.resid_norm,
                                        "site": site, "instruction": prompts, "completion": comps[f],
                                        "refused": [is_refusal(c) for c in comps[f]]}) for f in fractions],
                         ignore_index=True)

    return run_parts(["sensitive", "control"], run, checkpoint, "dose-response", progress,
                     part_ids=["sensitive", "control"])


def repetition(text: str, n: int = 3) -> float:
    """Share of the text's word ``n``-grams that repeat an earlier one (0: none repeats; empty or
    shorter texts: 0)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)


@torch.no_grad()
def classify_generations(model: ChatModel, prompts: Sequence[str], completions: Sequence[str],
                         max_repetition: float = 0.5, max_nll: float = 4.0, batch_size: int = 16) -> pd.DataFrame:
    """Class each generation ``refusal`` / ``compliance`` / ``degenerate``, so that broken text is never
    counted as "refusal removed". ``degenerate``: empty, or more than ``max_repetition`` of its word
    3-grams repeat an earlier one, or its mean per-token NLL under the *unsteered* model, after its
    prompt, exceeds ``max_nll`` nats (text the model itself would not write); otherwise ``refusal`` when
    the substring score says so, else ``compliance``. Returns ``repetition, nll, response`` per row."""
    tok = model.tokenizer
    p_ids = [torch.tensor(tok(model.format_prompt(p), add_special_tokens=False)["input_ids"]) for p in prompts]
    c_ids = [torch.tensor(tok(c, add_special_tokens=False)["input_ids"], dtype=torch.long) for c in completions]
    has = [i for i, c in enumerate(c_ids) if len(c) > 0]
    nll = np.full(len(prompts), np.nan)
    if has:
        vals = G.nll(model, [p_ids[i] for i in has], [c_ids[i] for i in has], batch_size)
        nll[has] = vals.numpy()
    rep = np.array([repetition(c) for c in completions])
    out = []
    for c, r, n in zip(completions, rep, nll):
        broken = not c.strip() or r > max_repetition or not np.isfinite(n) or n > max_nll
        out.append("degenerate" if broken else "refusal" if is_refusal(c) else "compliance")
    return pd.DataFrame({"repetition": rep, "nll": nll, "response": out})


def dose_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Refusal rate by prompt kind and ``fraction`` (with ``alpha``), and, when ``df`` has a ``response``
    column (:func:`classify_generations`), the share of each response class."""
    out = df.groupby(["kind", "fraction"]).agg(alpha=("alpha", "first"), refusal_rate=("refused", "mean"),
                                               n=("refused", "size")).reset_index()
    if "response" in df.columns:
        shares = pd.crosstab([df.kind, df.fraction], df.response, normalize="index")
        for c in ("refusal", "compliance", "degenerate"):
            out[c] = [float(shares[c].get((k, f), 0.0)) if c in shares else 0.0 for k, f in zip(out.kind, out.fraction)]
    return out
