"""The gate of "How Alignment Routes" (arXiv 2604.04385): per-head interchange on structurally matched
pairs with the NLL metric (``docs/methods.md``, "06_gate_amplifier").

* :func:`load_pairs` / :func:`prepare_pairs` -- a CSV of ``sensitive`` / ``control`` prompts (optional
  ``pair_id``, ``category``) through the chat template, with each pair's *target tokens*: the control
  prompt's first ``<= 5`` greedy reply tokens, special tokens dropped;
* :func:`nll` -- mean teacher-forced NLL of the target tokens after a prompt; the refusal *gap* is
  ``NLL(sensitive) - NLL(control)``;
* :func:`alignment` -- the target and source runs of a batch of pairs and which positions are swapped
  (``positions``: ``prompt`` by default, ``last``, ``paper``, or the ``answer`` diagnostic; see
  :mod:`refusal_circuits.engine`);
* :func:`interchange` -- the exact batched interchange of every head's ``z`` (one head at a time, at the
  positions ``positions`` maps), *necessity* (run sensitive, ``z`` from control) or *sufficiency* (run
  control, ``z`` from sensitive); :func:`interchange_loop` -- the paper's procedure (batch 1, one full
  forward per head per pair), the reference the engine must equal;
* :func:`summarise` -- per head, necessity and sufficiency as % of the mean gap, ranked;
  :func:`gate_of` -- the head with the largest ``necessity % + sufficiency %``;
  :func:`gate_statistics` -- the family-wise permutation test, top-set stability and the "stands out"
  margin (:mod:`refusal_circuits.stats`).

Heads are query heads: ``hook_z`` is the input of the attention output projection, one slice per
query head, which is the paper's per-head activation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch

from . import engine as E
from . import hooks, stats
from .batching import cached_runs
from .data import read_table
from .models import ChatModel
from .results import Checkpoint, run_parts

Direction = Literal["necessity", "sufficiency"]
PAIR_COLUMNS = ("sensitive", "control")


class PairsError(ValueError):
    """A pair file that cannot be used; the message says what is wrong with it."""


def load_pairs(path: str | Path) -> pd.DataFrame:
    """A CSV of matched pairs: columns ``sensitive`` and ``control`` (required), ``pair_id`` and
    ``category`` (optional; a ``pair_id`` is made from the row number when missing)."""
    path = Path(path)
    try:
        df = read_table(path, "pair file", PAIR_COLUMNS,
                        hint="A pair file needs 'sensitive' and 'control' (optional 'pair_id', 'category').")
    except (FileNotFoundError, ValueError) as err:
        raise PairsError(str(err)) from None
    df = df[(df.sensitive.astype(str).str.strip() != "") & (df.control.astype(str).str.strip() != "")]
    if len(df) == 0:
        raise PairsError(f"Pair file {path} has no pairs (no row with both a sensitive and a control prompt).")
    if "pair_id" not in df.columns:
        df = df.assign(pair_id=[f"pair{i:04d}" for i in range(len(df))])
    if "category" not in df.columns:
        df = df.assign(category="")
    return df.reset_index(drop=True)


@dataclass
class GatePairs:
    """Matched pairs ready for the NLL metric.

    Attributes:
        pairs: one row per pair: ``pair_id, sensitive, control, category, n_sensitive, n_control,
            n_target, target`` (token counts of the templated prompts; the decoded target tokens).
        sensitive / control: one ``[pos]`` tensor of prompt ids per pair (chat template applied).
        targets: one ``[n_target]`` tensor per pair: the control's first greedy reply tokens.
    """

    pairs: pd.DataFrame
    sensitive: list[torch.Tensor]
    control: list[torch.Tensor]
    targets: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, idx: Sequence[int]) -> "GatePairs":
        idx = list(idx)
        return GatePairs(self.pairs.iloc[idx].reset_index(drop=True), [self.sensitive[i] for i in idx],
                         [self.control[i] for i in idx], [self.targets[i] for i in idx])


@torch.no_grad()
def prepare_pairs(model: ChatModel, df: pd.DataFrame, n_pairs: int | None = None, max_target_tokens: int = 5,
                  batch_size: int = 16, seed: int = 0) -> GatePairs:
    """Tokenise the pairs and find each pair's target tokens: the control prompt's greedy reply,
    ``max_target_tokens`` tokens, with the tokenizer's special tokens (EOS, end of turn, padding, BOS)
    dropped; if nothing is left, its first token. ``n_pairs`` takes that many pairs in a seeded order
    (the paper's fixed, seeded order); all of them when ``None``."""
    if len(df) == 0:
        raise PairsError("No pairs given: the pair table is empty.")
    if n_pairs is not None:
        if int(n_pairs) < 1:
            raise PairsError(f"--n-pairs must be >= 1, got {n_pairs}.")
        if int(n_pairs) > len(df):
            raise PairsError(f"--n-pairs {n_pairs} is larger than the pair file ({len(df)} pairs).")
        order = np.random.default_rng(seed).permutation(len(df))[: int(n_pairs)]
        df = df.iloc[sorted(order)]
    df = df.reset_index(drop=True)
    tok = model.tokenizer
    enc = lambda text: torch.tensor(tok(model.format_prompt(text), add_special_tokens=False)["input_ids"])  # noqa: E731
    sens = [enc(s) for s in df.sensitive]
    ctrl = [enc(c) for c in df.control]
    special = set(tok.all_special_ids) | {t for t in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
                                          if t is not None}
    targets = []
    for i in range(0, len(df), batch_size):
        ids, mask = model.to_tokens(list(df.control[i:i + batch_size]))
        out = model.hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_target_tokens,
                                      do_sample=False, pad_token_id=tok.pad_token_id, temperature=None,
                                      top_p=None, top_k=None)[:, ids.shape[1]:].cpu()
        for row in out.tolist():
            content = [t for t in row if t not in special]
            targets.append(torch.tensor(content[:max_target_tokens] or row[:1]))
    table = df[["pair_id", "sensitive", "control", "category"]].copy()
    table["n_sensitive"] = [len(t) for t in sens]
    table["n_control"] = [len(t) for t in ctrl]
    table["n_target"] = [len(t) for t in targets]
    table["target"] = [tok.decode(t) for t in targets]
    return GatePairs(table, sens, ctrl, targets)


def _runs(gp: GatePairs, idx: Sequence[int], direction: Direction, positions: str):
    """Token lists of the target runs (prompt + target tokens), the source runs (the other prompt; + the
    target tokens for the ``answer`` diagnostic) and the target runs' prompt lengths."""
    tgt_prompt, src_prompt = ((gp.sensitive, gp.control) if direction == "necessity" else (gp.control, gp.sensitive))
    target = [torch.cat([tgt_prompt[i], gp.targets[i]]) for i in idx]
    with_targets = E.source_has_targets(positions)
    source = [torch.cat([src_prompt[i], gp.targets[i]]) if with_targets else src_prompt[i] for i in idx]
    return target, source, [len(tgt_prompt[i]) for i in idx]


def alignment(gp: GatePairs, idx: Sequence[int], direction: Direction, positions: str, device
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """For the pairs ``idx``: ``(target runs, source runs, mask [B, T], src [B, T])``, the position map
    (:func:`refusal_circuits.engine.position_map`) of the padded runs."""
    target, source, lt = _runs(gp, idx, direction, positions)
    nt = [len(gp.targets[i]) for i in idx]
    ls = [len(s) - (n if E.source_has_targets(positions) else 0) for s, n in zip(source, nt)]
    mask, src = E.position_map(lt, ls, nt, max(map(len, target)), max(map(len, source)), positions)
    return target, source, mask.to(device), src.to(device)


@torch.no_grad()
def nll(model: ChatModel, prompts: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
        batch_size: int = 16) -> torch.Tensor:
    """Mean teacher-forced NLL of ``targets[i]`` after ``prompts[i]`` (token ids), one value per
    prompt. Logits are computed only at the positions that predict the targets."""
    pad = model.tokenizer.pad_token_id
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs = [torch.cat([p, t]) for p, t in zip(prompts[i:i + batch_size], targets[i:i + batch_size])]
        ids, mask = E.pad_left(seqs, pad, model.device)
        K = max(len(t) for t in targets[i:i + batch_size]) + 1
        logits = model.bridge(ids, attention_mask=mask, logits_to_keep=K)
        out.append(E.target_nll(logits, targets[i:i + batch_size]))
    return torch.cat(out)


def _effect_row(l, h, pair_id, direction, base, pat) -> dict:
    return {"layer": l, "head": h, "pair_id": pair_id, "direction": direction, "baseline": base, "patched": pat,
            "effect": base - pat if direction == "necessity" else pat - base}


def check_direction(direction: str, gp: GatePairs) -> None:
    """A clear error for an unknown direction or no pairs."""
    if direction not in ("necessity", "sufficiency"):
        raise ValueError(f"direction must be 'necessity' or 'sufficiency', got {direction!r}.")
    if len(gp) == 0:
        raise PairsError("No pairs given.")


@torch.no_grad()
def interchange(model: ChatModel, gp: GatePairs, direction: Direction = "necessity", positions: str = "prompt",
                heads: Sequence[tuple[int, int]] | None = None, max_batch: int = 64, pairs_per_batch: int = 8,
                checkpoint: Checkpoint | None = None, progress: bool = True) -> pd.DataFrame:
    """Exact interchange of each head's ``z``, one head at a time, on every pair.

    ``necessity`` runs the sensitive prompt (+ target tokens) with the head's ``z`` from the control
    run; ``sufficiency`` runs the control prompt with ``z`` from the sensitive run; the positions swapped
    are ``positions`` (:data:`refusal_circuits.engine.POSITIONS`). Through the edit engine
    (:func:`refusal_circuits.engine.edit_sweep`): per batch of pairs the source run is cached once,
    ``max_batch // pairs`` patched copies run per forward, each started at its head's layer, logits only
    at the positions that predict the target tokens. One row per (head, pair): ``layer, head, pair_id,
    direction, baseline`` (unpatched NLL of the run), ``patched``, ``effect`` (necessity: ``baseline -
    patched``; sufficiency: ``patched - baseline``). With ``checkpoint`` a rerun resumes."""
    check_direction(direction, gp)
    positions = E.resolve_positions(positions)

    def prepare(idx: list[int], layers: list[int]) -> E.TargetBatch:
        target, source, mask, src = alignment(gp, idx, direction, positions, model.device)
        b = E.target_batch(model, target, [gp.targets[i] for i in idx], layers, idx)
        b.extra.update(mask=mask, aligned=E.source_z(model, source, layers, src))
        return b

    def row(b: E.TargetBatch, l: int, h: int, bi: int, base: float, pat: float) -> dict:
        return _effect_row(l, h, gp.pairs.pair_id.iloc[b.idx[bi]], direction, base, pat)

    df = E.edit_sweep(model, len(gp), heads, prepare, lambda b, l: (lambda z, h: b.extra["aligned"][l][:, :, h]),
                      lambda b: b.extra["mask"], row, f"interchange ({direction}, {positions})", max_batch,
                      pairs_per_batch, checkpoint, progress)
    return sort_by_head(df, gp)


def sort_by_head(df: pd.DataFrame, gp: GatePairs) -> pd.DataFrame:
    """Rows ordered by layer, head and the pairs' order."""
    order = {p: i for i, p in enumerate(gp.pairs.pair_id)}
    df = df.assign(_p=df.pair_id.map(order)).sort_values(["layer", "head", "_p"], kind="stable")
    return df.drop(columns="_p").reset_index(drop=True)


def attribution(model: ChatModel, gp: GatePairs, direction: Direction = "necessity", positions: str = "prompt",
                heads: Sequence[tuple[int, int]] | None = None, pairs_per_batch: int = 8,
                checkpoint: Checkpoint | None = None, progress: bool = True) -> pd.DataFrame:
    """Attribution-patching estimate of :func:`interchange` for every head at once.

    The patched NLL is linearised around the target run: for head ``(l, h)``,
    ``NLL(patched) - NLL(target) ~ sum_p dNLL/dz[p, h] . (z_source[src(p), h] - z_target[p, h])`` over
    the positions that ``positions`` maps, with the gradient of the same NLL metric (mean over the target
    tokens). One forward + backward of the target runs and one forward of the source runs per batch of
    pairs, for all heads. The gradient at each ``hook_z`` is read by a backward hook (the bridge hands
    forward hooks a reshaped view), and the backward is driven by :func:`torch.autograd.grad` from a
    residual-stream leaf, so no parameter needs ``requires_grad``. Same columns as
    :func:`interchange`; ``patched`` is the linear estimate."""
    check_direction(direction, gp)
    positions = E.resolve_positions(positions)
    wanted = E.by_layer(E.head_list(model, heads))
    batches = E.pair_batches(len(gp), pairs_per_batch)
    pad = model.tokenizer.pad_token_id

    def run(b: int) -> pd.DataFrame:
        idx = batches[b]
        tgt = [gp.targets[i] for i in idx]
        target, source, mask, src = alignment(gp, idx, direction, positions, model.device)
        with torch.no_grad():
            aligned = E.source_z(model, source, list(wanted), src)
        ids, amask = E.pad_left(target, pad, model.device)
        K = max(len(t) for t in tgt) + 1
        acts, grads, leaf = {}, {}, {}

        def make_leaf(x, hook):
            leaf["x"] = x.detach().requires_grad_(True)
            return leaf["x"]

        def saver(store: dict, name: str):
            def hook(x, hook):
                store[name] = x.detach()
            return hook

        names = [hooks.z(l) for l in wanted]
        fwd = [(hooks.resid_pre(0), make_leaf)] + [(n, saver(acts, n)) for n in names]
        bwd = [(n, saver(grads, n)) for n in names]
        with torch.enable_grad(), model.bridge.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
            logits = model.bridge(ids, attention_mask=amask, logits_to_keep=K)
            base = E.target_nll(logits, tgt)
            torch.autograd.grad(base.sum(), [leaf["x"]])
        m = mask[:, :, None, None].to(torch.float32)
        rows = []
        for l, hs in wanted.items():
            n = hooks.z(l)
            diff = (aligned[l].float() - acts[n].float()) * m                       # [B, T, H, d]
            est = (diff * grads[n].float()).sum(dim=(1, 3)).cpu()                   # [B, H]
            for h in hs:
                for bi, i in enumerate(idx):
                    b0 = float(base[bi])
                    rows.append(_effect_row(l, h, gp.pairs.pair_id.iloc[i], direction, b0, b0 + float(est[bi, h])))
        return pd.DataFrame(rows)

    ids = [f"pairs {bt[0]}-{bt[-1]}" for bt in batches]
    df = run_parts(list(range(len(batches))), run, checkpoint, f"attribution ({direction}, {positions})", progress,
                   part_ids=ids)
    return sort_by_head(df, gp)


@torch.no_grad()
def interchange_loop(model: ChatModel, gp: GatePairs, direction: Direction = "necessity", positions: str = "prompt",
                     heads: Sequence[tuple[int, int]] | None = None) -> pd.DataFrame:
    """The paper's procedure, written plainly: for every pair, batch 1, no padding, capture the source
    run's ``z`` at every layer once, then for every head one full forward of the target sequence with that
    head's ``z`` written, position by position, at the pairs of
    :func:`refusal_circuits.engine.plain_positions` (full logits). Slow; the reference that
    :func:`interchange` must equal, and the baseline of ``make bench``."""
    positions = E.resolve_positions(positions)
    heads = E.head_list(model, heads)
    rows = []
    dev = model.device
    for i in range(len(gp)):
        (target,), (source,), (lt,) = _runs(gp, [i], direction, positions)
        n = len(gp.targets[i])
        ls = len(source) - (n if E.source_has_targets(positions) else 0)
        pos_pairs = E.plain_positions(lt, ls, n, positions)
        t, s = target[None].to(dev), source[None].to(dev)
        base = float(E.target_nll(model.bridge(t)[:, -(n + 1):], [gp.targets[i]])[0])
        names = {hooks.z(l) for l, _ in heads}
        _, cache = model.bridge.run_with_cache(s, names_filter=lambda nm: nm in names)
        for l, h in heads:
            zs = cache[hooks.z(l)]

            def hook(z, hook, zs=zs, h=h):
                z = z.clone()
                for pt, ps in pos_pairs:
                    z[0, pt, h] = zs[0, ps, h]
                return z

            with model.bridge.hooks(fwd_hooks=[(hooks.z(l), hook)]):
                logits = model.bridge(t)
            pat = float(E.target_nll(logits[:, -(n + 1):], [gp.targets[i]])[0])
            rows.append(_effect_row(l, h, gp.pairs.pair_id.iloc[i], direction, base, pat))
    df = pd.DataFrame(rows)
    return df.sort_values(["layer", "head"], kind="stable").reset_index(drop=True)


def gaps(model: ChatModel, gp: GatePairs, batch_size: int = 16) -> pd.DataFrame:
    """Per pair: ``nll_sensitive``, ``nll_control`` and ``gap = nll_sensitive - nll_control``."""
    s = nll(model, gp.sensitive, gp.targets, batch_size)
    c = nll(model, gp.control, gp.targets, batch_size)
    return pd.DataFrame({"pair_id": gp.pairs.pair_id, "nll_sensitive": s.numpy(), "nll_control": c.numpy(),
                         "gap": (s - c).numpy()})


def summarise(nec: pd.DataFrame, suf: pd.DataFrame, gap: pd.DataFrame) -> pd.DataFrame:
    """Per head: mean ``necessity`` and ``sufficiency`` over pairs, the mean ``gap``, each effect as a
    percentage of the mean gap (a ratio of means, as the paper reports them), ``combined`` = necessity %
    + sufficiency %, and the rank by ``combined`` (1 = the gate)."""
    g = float(gap.gap.mean())
    n = nec.groupby(["layer", "head"], sort=False).effect.mean().rename("necessity")
    s = suf.groupby(["layer", "head"], sort=False).effect.mean().rename("sufficiency")
    out = pd.concat([n, s], axis=1).reset_index()
    out["gap"] = g
    out["necessity_pct"] = 100 * out.necessity / g
    out["sufficiency_pct"] = 100 * out.sufficiency / g
    out["combined"] = out.necessity_pct + out.sufficiency_pct
    out["rank"] = out.combined.rank(ascending=False, method="first").astype(int)
    return out.sort_values("rank").reset_index(drop=True)


def gate_of(summary: pd.DataFrame) -> pd.Series:
    """The gate: the head with the largest ``necessity % + sufficiency %`` (the paper's "strongest
    combined necessity and sufficiency")."""
    return summary.loc[summary.combined.idxmax()]


def effect_matrices(nec: pd.DataFrame, suf: pd.DataFrame, gap: pd.DataFrame
                    ) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray, np.ndarray]:
    """The per-pair effects as arrays: ``(heads, N [head, pair], S [head, pair], gap [pair])`` over the
    heads present in ``nec`` and the pairs of ``gap``, in its order."""
    pairs = list(gap.pair_id)
    heads = [tuple(map(int, h)) for h in nec[["layer", "head"]].drop_duplicates().values.tolist()]
    piv = lambda df: df.pivot_table(index=["layer", "head"], columns="pair_id", values="effect").loc[heads, pairs].values  # noqa: E731
    return heads, piv(nec), piv(suf), gap.set_index("pair_id").loc[pairs, "gap"].values.astype(float)


def gate_statistics(nec: pd.DataFrame, suf: pd.DataFrame, gap: pd.DataFrame, n_perm: int = 10_000,
                    n_boot: int = 2_000, k: int = 5, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Is the gate real, and does it stand out? Over the heads of ``nec`` / ``suf`` (exact rows):

    * per head, the family-wise (max-T) sign-flip p of its combined score ``100 (nec + suf) / mean gap``
      per pair (:func:`refusal_circuits.stats.familywise_p`, ``n_perm`` flips);
    * the gate's sign-flip p of necessity alone (uncorrected, the test our earlier notebooks reported);
    * bootstrap stability of the top-``k`` set (Jaccard) and of the gate (``n_boot`` resamples);
    * "stands out": the gate's combined score minus the runner-up's, with a paired bootstrap 95%
      interval; the gate stands out when the interval excludes zero.

    Returns ``(per_head, summary)``: ``layer, head, combined, p_fwer`` sorted by ``combined``, and a dict."""
    from . import stats

    heads, N, S, Gp = effect_matrices(nec, suf, gap)
    g = float(Gp.mean())
    scores = 100 * (N + S) / g                                                  # [head, pair]
    p = stats.familywise_p(scores, n_perm, seed)
    per_head = pd.DataFrame({"layer": [l for l, _ in heads], "head": [h for _, h in heads],
                             "combined": scores.mean(1), "p_fwer": p}).sort_values("combined", ascending=False)
    order = per_head.index.tolist()
    first, second = order[0], order[1] if len(order) > 1 else order[0]
    margin = stats.margin_ci(100 * (N[first] + S[first]), 100 * (N[second] + S[second]), n_boot, seed, denominator=Gp)
    stab = stats.top_set_stability(N + S, k, n_boot, seed, denominator=Gp)
    summary = {"gate": f"L{heads[first][0]}H{heads[first][1]}", "runner_up": f"L{heads[second][0]}H{heads[second][1]}",
               "n_heads": len(heads), "n_pairs": int(N.shape[1]), "n_perm": n_perm, "n_boot": n_boot,
               "gate_p_fwer": float(p[first]), "gate_necessity_p_sign_flip": stats.sign_flip_p(N[first], n_perm, seed),
               "margin_pct": margin["margin"], "margin_lo": margin["lo"], "margin_hi": margin["hi"],
               "stands_out": margin["stands_out"], "n_significant_fwer_05": int((p <= 0.05).sum()), **stab}
    return per_head.reset_index(drop=True), summary


def routing_sparsity(nec: pd.DataFrame, ks: tuple[int, ...] = (1, 5, 10), n_boot: int = 2000, seed: int = 0
                     ) -> pd.DataFrame:
    """Sparse gate or dense routing? From per-pair necessity rows (``layer, head, pair_id, effect``, and
    ``method`` when the screen mixed estimates with exact rows): the share of the total |necessity| over
    heads carried by the top 1, 5 and 10 heads and the Gini coefficient of |necessity|, each with a
    bootstrap 95% interval over pairs (:func:`refusal_circuits.stats.concentration`).

    One row per statistic: ``statistic, estimate, lo, hi, n_heads, n_pairs, n_exact_heads`` (heads whose
    every row is exact; the others are attribution estimates)."""
    from . import stats

    if nec.empty:
        raise ValueError("routing_sparsity needs per-pair necessity rows; the table is empty.")
    heads = nec[["layer", "head"]].drop_duplicates().values.tolist()
    N = nec.pivot_table(index=["layer", "head"], columns="pair_id", values="effect").loc[
        [tuple(h) for h in heads]].values
    if np.isnan(N).any():
        raise ValueError("routing_sparsity needs every head on every pair; some (head, pair) rows are missing.")
    n_exact = len(heads) if "method" not in nec else int(
        nec.groupby(["layer", "head"]).method.agg(lambda m: (m == "exact").all()).sum())
    conc = stats.concentration(N, ks, n_boot, seed)
    return pd.DataFrame([{"statistic": k, "estimate": e, "lo": lo, "hi": hi, "n_heads": len(heads),
                          "n_pairs": int(N.shape[1]), "n_exact_heads": n_exact} for k, (e, lo, hi) in conc.items()])


def dla_directions(model: ChatModel, gp: GatePairs) -> torch.Tensor:
    """``mean_{t in R} W_U[:, t] - W_U[:, a_pair]`` for every pair: ``[pair, d_model]``."""
    W = model.W_U.detach().float().cpu()
    refusal = W[:, list(model.refusal_token_ids)].mean(1)
    return torch.stack([refusal - W[:, int(t[0])] for t in gp.targets])


def heads_normed(model: ChatModel, cache) -> torch.Tensor:
    """Every head's write at the last position through the final norm, linearised with the run's own
    scale: ``[layer, head, B, d_model]`` (float32, CPU)."""
    from . import dla as D

    heads = D.head_residual_writes(model, cache, -1)                               # [L, H, B, d]
    L, H = heads.shape[:2]
    normed = cache.apply_ln_to_stack(heads.reshape(L * H, *heads.shape[2:]), layer=None, pos_slice=-1)
    return (normed.float().cpu() * D.final_norm(model).weight).view(L, H, heads.shape[2], -1)


@torch.no_grad()
def head_dla_pairs(model: ChatModel, gp: GatePairs, batch_size: int = 8, fwd_hooks=(), controls: bool = True,
                   direction: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every head's output DLA at the last prompt position of each pair's sensitive and control prompt
    (see :func:`head_dla`): ``(sensitive, control)``, each ``[layer, head, pair]`` (``control`` is
    ``None`` with ``controls=False``, which skips their runs). ``fwd_hooks`` stay on during the runs
    (a knockout), and the final norm is linearised with that run's own scale. ``direction``: one
    ``[d_model]`` vector to project on for every pair (the paper's cipher contrast uses the detection
    direction) instead of each pair's refusal-logit direction."""
    from . import dla as D

    dirs = dla_directions(model, gp) if direction is None else \
        torch.as_tensor(direction).detach().float().cpu()[None].expand(len(gp), -1)

    def run(prompts: list[str]) -> torch.Tensor:
        out = [heads_normed(model, cache)
               for _, _, cache in cached_runs(model, prompts, D.needed_for_components, batch_size, fwd_hooks,
                                                 logits_to_keep=1)]
        return torch.cat(out, 2)                                                   # [L, H, pair, d]

    sens = (run(list(gp.pairs.sensitive)) * dirs[None, None]).sum(-1)
    ctrl = (run(list(gp.pairs.control)) * dirs[None, None]).sum(-1) if controls else None
    return sens, ctrl


def head_dla(model: ChatModel, gp: GatePairs, batch_size: int = 8, n_boot: int = 1000, seed: int = 0
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each head's output DLA at the last prompt position (no target tokens appended): the head's write
    to the residual (:func:`refusal_circuits.dla.head_residual_writes`), through the final norm
    linearised with that run's own scale, dotted with ``mean_{t in R} W_U[:, t] - W_U[:, a]`` (``R`` =
    the model's refusal tokens, ``a`` = the pair's first target token, the control's answer). Score =
    mean over pairs of DLA(sensitive) - DLA(control), with a bootstrap 95% interval (``n_boot``
    resamples of the pairs). Returns ``(summary, per_pair)``: ``layer, head, dla, ci_lo, ci_hi`` and
    ``layer, head, pair_id, dla_sensitive, dla_control, diff``."""
    sens, ctrl = head_dla_pairs(model, gp, batch_size)
    diff = (sens - ctrl).numpy()                                                   # [L, H, pair]
    L, H, P = diff.shape
    est, lo, hi = stats.bootstrap(lambda x: x.mean(-1), diff, n_boot=n_boot, seed=seed)
    summary = pd.DataFrame([{"layer": l, "head": h, "dla": float(est[l, h]), "ci_lo": float(lo[l, h]),
                             "ci_hi": float(hi[l, h])} for l in range(L) for h in range(H)])
    per_pair = pd.DataFrame([{"layer": l, "head": h, "pair_id": gp.pairs.pair_id.iloc[p],
                              "dla_sensitive": float(sens[l, h, p]), "dla_control": float(ctrl[l, h, p]),
                              "diff": float(diff[l, h, p])} for l in range(L) for h in range(H) for p in range(P)])
    return summary, per_pair


def depth_band(n_layers: int, lo: float = 0.25, hi: float = 0.65) -> range:
    """The paper's screening band: layers ``int(L * lo)`` to ``int(L * hi)`` inclusive."""
    return range(int(n_layers * lo), int(n_layers * hi) + 1)


def target_share(prompt: pd.DataFrame, answer: pd.DataFrame) -> pd.DataFrame:
    """How much of each head's interchange effect under the ``answer`` diagnostic comes from swapping the
    target-token positions: both are :func:`summarise` tables of the same heads and pairs, ``prompt``
    swapping the prompt positions only and ``answer`` those and the target positions (aligned the same
    way from the end). Per head: ``combined_prompt, combined_answer`` and ``target_share = (answer -
    prompt) / answer`` (NaN when ``answer`` is 0)."""
    k = ["layer", "head"]
    m = prompt[k + ["combined"]].merge(answer[k + ["combined"]], on=k, suffixes=("_prompt", "_answer"))
    m["target_share"] = (m.combined_answer - m.combined_prompt) / m.combined_answer.where(m.combined_answer != 0)
    return m.sort_values("combined_answer", ascending=False).reset_index(drop=True)
