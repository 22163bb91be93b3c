"""The gate of "How Alignment Routes" (arXiv 2604.04385): per-head interchange on structurally matched
pairs with the NLL metric (``docs/methods.md``, "06_gate_amplifier").

* :func:`load_pairs` / :func:`prepare_pairs` -- a CSV of ``sensitive`` / ``control`` prompts (optional
  ``pair_id``, ``category``) through the chat template, with each pair's *target tokens*: the control
  prompt's first ``<= 5`` greedy reply tokens, special tokens dropped;
* :func:`nll` -- mean teacher-forced NLL of the target tokens after a prompt; the refusal *gap* is
  ``NLL(sensitive) - NLL(control)``;
* :func:`position_map` -- how positions of two prompts of different lengths line up for interchange:
  ``end`` (default: counted from the end, the source run carrying the same target tokens) or ``start``
  (the paper's code: the source prompt's positions copied onto the target run's first positions);
* :func:`interchange` -- the exact batched interchange of every head's ``z`` (one head at a time, every
  position the alignment maps), *necessity* (run sensitive, ``z`` from control) or *sufficiency* (run
  control, ``z`` from sensitive); :func:`interchange_loop` -- the paper's procedure (batch 1, one full
  forward per head per pair), the reference the engine must equal;
* :func:`summarise` -- per head, necessity and sufficiency as % of the mean gap, ranked;
  :func:`gate_of` -- the head with the largest ``necessity % + sufficiency %``;
  :func:`permutation_p` -- sign-flip test of the gate's necessity; :func:`bootstrap_stability`.

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

from . import hooks
from .batching import cached_runs
from .models import ChatModel
from .patching import skip_lower_layers
from .results import Checkpoint, run_parts

Align = Literal["end", "start"]
Direction = Literal["necessity", "sufficiency"]
PAIR_COLUMNS = ("sensitive", "control")


class PairsError(ValueError):
    """A pair file that cannot be used; the message says what is wrong with it."""


def load_pairs(path: str | Path) -> pd.DataFrame:
    """A CSV of matched pairs: columns ``sensitive`` and ``control`` (required), ``pair_id`` and
    ``category`` (optional; a ``pair_id`` is made from the row number when missing)."""
    path = Path(path)
    if not path.exists():
        raise PairsError(f"Pair file {path} does not exist.")
    try:
        df = pd.read_csv(path, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise PairsError(f"Pair file {path} is empty.") from None
    missing = [c for c in PAIR_COLUMNS if c not in df.columns]
    if missing:
        raise PairsError(f"{path} has no {' or '.join(repr(c) for c in missing)} column; it needs 'sensitive' and "
                         f"'control' (optional 'pair_id', 'category'); its columns are {list(df.columns)}.")
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


def _left_pad(seqs: Sequence[torch.Tensor], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = s
        mask[b, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def _runs(gp: GatePairs, idx: Sequence[int], direction: Direction, align: Align):
    """Token lists of the target run (prompt + target tokens) and the source run of each pair."""
    tgt_prompt, src_prompt = ((gp.sensitive, gp.control) if direction == "necessity" else (gp.control, gp.sensitive))
    target = [torch.cat([tgt_prompt[i], gp.targets[i]]) for i in idx]
    source = [torch.cat([src_prompt[i], gp.targets[i]]) if align == "end" else src_prompt[i] for i in idx]
    return target, source


def position_map(target_len: Sequence[int], source_len: Sequence[int], T: int, S: int, align: Align
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which target-run positions take which source-run position, for left-padded runs of widths
    ``T`` and ``S``: ``(mask [B, T] bool, src [B, T] long)``.

    * ``end``: target position ``T - 1 - j`` takes source position ``S - 1 - j`` for
      ``j < min(len_target, len_source)``: the two runs end with the same target tokens, so the template
      suffix, the last prompt position and the target tokens line up; positions of the longer run with
      no counterpart are left alone.
    * ``start``: the ``i``-th real token of the target run takes the ``i``-th of the source prompt for
      ``i < min(len_target, len_source)`` (the paper's ``seq_len = min(...)``, copied from position 0).
      When the source prompt is longer than the target prompt, its positions overwrite the target
      prompt's last positions and its target-token positions; when it is shorter, the target run's
      remaining positions (its last prompt position among them) keep their own activations.
    """
    if align not in ("end", "start"):
        raise ValueError(f"align must be 'end' or 'start', got {align!r}.")
    lt = torch.as_tensor(list(target_len))
    ls = torch.as_tensor(list(source_len))
    p = torch.arange(T)[None]
    if align == "end":
        j = T - 1 - p
        mask = j < torch.minimum(lt, ls)[:, None]
        src = S - 1 - j
    else:
        i = p - (T - lt)[:, None]
        mask = (i >= 0) & (i < torch.minimum(lt, ls)[:, None])
        src = (S - ls)[:, None] + i
    return mask, torch.where(mask, src, torch.zeros_like(src))


def _nll(logits: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean NLL of each row's targets from the last ``K`` positions' logits ``[B, K, vocab]`` of runs
    that end with those targets (position ``K - 1 - n + i`` predicts target ``i``)."""
    K = logits.shape[1]
    logp = logits.float().log_softmax(-1)
    out = []
    for b, t in enumerate(targets):
        n = len(t)
        pos = torch.arange(K - 1 - n, K - 1)
        out.append(-logp[b, pos, t.to(logp.device)].mean())
    return torch.stack(out).cpu()


@torch.no_grad()
def nll(model: ChatModel, prompts: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
        batch_size: int = 16) -> torch.Tensor:
    """Mean teacher-forced NLL of ``targets[i]`` after ``prompts[i]`` (token ids), one value per
    prompt. Logits are computed only at the positions that predict the targets."""
    pad = model.tokenizer.pad_token_id
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs = [torch.cat([p, t]) for p, t in zip(prompts[i:i + batch_size], targets[i:i + batch_size])]
        ids, mask = _left_pad(seqs, pad, model.device)
        K = max(len(t) for t in targets[i:i + batch_size]) + 1
        logits = model.bridge(ids, attention_mask=mask, logits_to_keep=K)
        out.append(_nll(logits, targets[i:i + batch_size]))
    return torch.cat(out)


def _z_writer(write, mask: torch.Tensor, heads: Sequence[int], B: int):
    """A ``hook_z`` hook for ``len(heads)`` stacked copies of a batch of ``B`` runs: copy ``j`` gets
    ``write(z_copy_j_head, head)`` for head ``heads[j]`` at the positions where ``mask [B, T]`` is true."""
    m = mask[:, :, None]

    def hook(z, hook):
        z = z.clone()
        for j, h in enumerate(heads):
            rows = slice(j * B, (j + 1) * B)
            z[rows, :, h] = torch.where(m, write(z[rows, :, h], h).to(z.dtype), z[rows, :, h])
        return z

    return hook


def _target_batch(model: ChatModel, seqs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                  layers: Sequence[int]) -> dict:
    """One batch of target runs (prompt + target tokens), left-padded, with its unpatched NLL and the
    residual stream entering each of ``layers`` (so a patched forward can start there)."""
    ids, mask = _left_pad(seqs, model.tokenizer.pad_token_id, model.device)
    K = max(len(t) for t in targets) + 1
    names_r = [hooks.resid_pre(l) for l in layers if l > 0]
    logits, cache = model.bridge.run_with_cache(ids, attention_mask=mask, logits_to_keep=K,
                                                names_filter=lambda n: n in names_r)
    return {"t_ids": ids, "t_mask": mask, "K": K, "targets": list(targets),
            "resid": {n: cache[n] for n in names_r}, "baseline": _nll(logits, targets)}


def _patched_nll(model: ChatModel, c: dict, layer: int, heads: Sequence[int], write, mask: torch.Tensor
                 ) -> torch.Tensor:
    """NLL ``[len(heads), B]`` of the target batch ``c`` (:func:`_target_batch`) with head ``heads[j]``
    of ``layer`` rewritten by ``write`` in copy ``j``; all copies in one forward started at ``layer``."""
    n, B = len(heads), len(c["targets"])
    fwd = [(hooks.z(layer), _z_writer(write, mask, heads, B))]
    mask_rep = c["t_mask"].repeat(n, 1)
    with model.bridge.hooks(fwd_hooks=fwd):
        if layer > 0:
            resid = c["resid"][hooks.resid_pre(layer)].repeat(n, 1, 1)
            with skip_lower_layers(model, layer):
                logits = model.bridge(resid, start_at_layer=layer, attention_mask=mask_rep, logits_to_keep=c["K"],
                                      use_cache=False)
        else:
            logits = model.bridge(c["t_ids"].repeat(n, 1), attention_mask=mask_rep, logits_to_keep=c["K"])
    return _nll(logits, c["targets"] * n).view(n, B)


def _head_list(model: ChatModel, heads) -> list[tuple[int, int]]:
    return [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)] if heads is None else \
        [(int(l), int(h)) for l, h in heads]


def _by_layer(heads: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for l, h in heads:
        out.setdefault(int(l), []).append(int(h))
    return dict(sorted(out.items()))


def _pair_batches(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def _effect_row(l, h, pair_id, direction, base, pat) -> dict:
    return {"layer": l, "head": h, "pair_id": pair_id, "direction": direction, "baseline": base, "patched": pat,
            "effect": base - pat if direction == "necessity" else pat - base}


def _source_z(model: ChatModel, source: Sequence[torch.Tensor], layers: Sequence[int], src: torch.Tensor
              ) -> dict[int, torch.Tensor]:
    """The source runs' ``z`` at each of ``layers``, gathered onto the target positions ``src [B, T]``."""
    ids, mask = _left_pad(source, model.tokenizer.pad_token_id, model.device)
    names = [hooks.z(l) for l in layers]
    _, cache = model.bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names)
    out = {}
    for l in layers:
        zs = cache[hooks.z(l)]                                                    # [B, S, H, d]
        gather = src[:, :, None, None].expand(-1, -1, zs.shape[2], zs.shape[3])
        out[l] = torch.gather(zs, 1, gather)                                      # [B, T, H, d]
    return out


def _alignment(target: Sequence[torch.Tensor], source: Sequence[torch.Tensor], align: Align, device):
    T, S = max(len(t) for t in target), max(len(s) for s in source)
    mask, src = position_map([len(t) for t in target], [len(s) for s in source], T, S, align)
    return mask.to(device), src.to(device)


def _check(direction: str, gp: GatePairs) -> None:
    if direction not in ("necessity", "sufficiency"):
        raise ValueError(f"direction must be 'necessity' or 'sufficiency', got {direction!r}.")
    if len(gp) == 0:
        raise PairsError("No pairs given.")


@torch.no_grad()
def interchange(model: ChatModel, gp: GatePairs, direction: Direction = "necessity", align: Align = "end",
                heads: Sequence[tuple[int, int]] | None = None, max_batch: int = 64, pairs_per_batch: int = 8,
                checkpoint: Checkpoint | None = None, progress: bool = True) -> pd.DataFrame:
    """Exact interchange of each head's ``z``, one head at a time, on every pair.

    ``necessity`` runs the sensitive prompt (+ target tokens) with the head's ``z`` from the control
    run; ``sufficiency`` runs the control prompt with ``z`` from the sensitive run; positions line up
    by ``align`` (:func:`position_map`). Per batch of pairs the source run is cached once, ``k`` patched
    copies of the batch run per forward (``k * pairs <= max_batch``), each forward starts at its head's
    layer from the target run's cached residual (the layers below are skipped), and logits are computed
    only at the positions that predict the target tokens. One row per (head, pair): ``layer, head,
    pair_id, direction, baseline`` (unpatched NLL of the run), ``patched``, ``effect`` (necessity:
    ``baseline - patched``; sufficiency: ``patched - baseline``). With ``checkpoint`` each (batch of
    pairs, layer) part is saved as it finishes and a rerun resumes."""
    _check(direction, gp)
    by_layer = _by_layer(_head_list(model, heads))
    layers = list(by_layer)
    batches = _pair_batches(len(gp), pairs_per_batch)
    parts = [(b, l) for b in range(len(batches)) for l in layers]
    current: dict = {}

    def prepare(b: int) -> dict:
        idx = batches[b]
        target, source = _runs(gp, idx, direction, align)
        mask, src = _alignment(target, source, align, model.device)
        c = _target_batch(model, target, [gp.targets[i] for i in idx], layers)
        return {**c, "idx": idx, "mask": mask, "aligned": _source_z(model, source, layers, src)}

    def run(part: tuple[int, int]) -> pd.DataFrame:
        b, l = part
        if current.get("batch") != b:
            current.clear()
            current.update(batch=b, **prepare(b))
        c = current
        k = max(1, max_batch // len(c["idx"]))
        rows = []
        hs = by_layer[l]
        for s in range(0, len(hs), k):
            chunk = hs[s:s + k]
            patched = _patched_nll(model, c, l, chunk, lambda z, h: c["aligned"][l][:, :, h], c["mask"])
            for j, h in enumerate(chunk):
                for bi, i in enumerate(c["idx"]):
                    rows.append(_effect_row(l, h, gp.pairs.pair_id.iloc[i], direction, float(c["baseline"][bi]),
                                            float(patched[j, bi])))
        return pd.DataFrame(rows)

    ids = [f"pairs {batches[b][0]}-{batches[b][-1]} L{l}" for b, l in parts]
    df = run_parts(parts, run, checkpoint, f"interchange ({direction})", progress, part_ids=ids)
    return _sort(df, gp)


def _sort(df: pd.DataFrame, gp: GatePairs) -> pd.DataFrame:
    order = {p: i for i, p in enumerate(gp.pairs.pair_id)}
    df = df.assign(_p=df.pair_id.map(order)).sort_values(["layer", "head", "_p"], kind="stable")
    return df.drop(columns="_p").reset_index(drop=True)


def attribution(model: ChatModel, gp: GatePairs, direction: Direction = "necessity", align: Align = "end",
                heads: Sequence[tuple[int, int]] | None = None, pairs_per_batch: int = 8,
                checkpoint: Checkpoint | None = None, progress: bool = True) -> pd.DataFrame:
    """Attribution-patching estimate of :func:`interchange` for every head at once.

    The patched NLL is linearised around the target run: for head ``(l, h)``,
    ``NLL(patched) - NLL(target) ~ sum_p dNLL/dz[p, h] . (z_source[src(p), h] - z_target[p, h])`` over
    the positions that ``align`` maps, with the gradient of the same NLL metric (mean over the target
    tokens). One forward + backward of the target runs and one forward of the source runs per batch of
    pairs, for all heads. The gradient at each ``hook_z`` is read by a backward hook (the bridge hands
    forward hooks a reshaped view), and the backward is driven by :func:`torch.autograd.grad` from a
    residual-stream leaf, so no parameter needs ``requires_grad``. Same columns as
    :func:`interchange`; ``patched`` is the linear estimate."""
    _check(direction, gp)
    wanted = _by_layer(_head_list(model, heads))
    batches = _pair_batches(len(gp), pairs_per_batch)
    pad = model.tokenizer.pad_token_id

    def run(b: int) -> pd.DataFrame:
        idx = batches[b]
        target, source = _runs(gp, idx, direction, align)
        tgt = [gp.targets[i] for i in idx]
        mask, src = _alignment(target, source, align, model.device)
        with torch.no_grad():
            aligned = _source_z(model, source, list(wanted), src)
        ids, amask = _left_pad(target, pad, model.device)
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
            base = _nll(logits, tgt)
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
    df = run_parts(list(range(len(batches))), run, checkpoint, f"attribution ({direction})", progress, part_ids=ids)
    return _sort(df, gp)


@torch.no_grad()
def interchange_loop(model: ChatModel, gp: GatePairs, direction: Direction = "necessity", align: Align = "end",
                     heads: Sequence[tuple[int, int]] | None = None) -> pd.DataFrame:
    """The paper's procedure, written plainly: for every pair, batch 1, capture the source run's ``z``
    at every layer once, then for every head one full forward of the target sequence with that head's
    ``z`` written at the mapped positions (full logits). Slow; the reference that :func:`interchange`
    must equal, and the baseline of ``make bench``."""
    heads = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)] if heads is None else list(heads)
    rows = []
    dev = model.device
    for i in range(len(gp)):
        (target,), (source,) = _runs(gp, [i], direction, align)
        t, s = target[None].to(dev), source[None].to(dev)
        base = float(_nll(model.bridge(t)[:, -(len(gp.targets[i]) + 1):], [gp.targets[i]])[0])
        mask, src = position_map([t.shape[1]], [s.shape[1]], t.shape[1], s.shape[1], align)
        names = {hooks.z(l) for l, _ in heads}
        _, cache = model.bridge.run_with_cache(s, names_filter=lambda n: n in names)
        for l, h in heads:
            zs = cache[hooks.z(l)]

            def hook(z, hook, zs=zs, h=h):
                z = z.clone()
                for p in range(z.shape[1]):
                    if mask[0, p]:
                        z[0, p, h] = zs[0, src[0, p], h]
                return z

            with model.bridge.hooks(fwd_hooks=[(hooks.z(l), hook)]):
                logits = model.bridge(t)
            pat = float(_nll(logits[:, -(len(gp.targets[i]) + 1):], [gp.targets[i]])[0])
            rows.append({"layer": l, "head": h, "pair_id": gp.pairs.pair_id.iloc[i], "direction": direction,
                         "baseline": base, "patched": pat,
                         "effect": base - pat if direction == "necessity" else pat - base})
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


def permutation_p(effects: np.ndarray, n: int = 10_000, seed: int = 0) -> float:
    """One-sided sign-flip permutation test of ``mean(effects) > 0`` over pairs: the share of ``n``
    random sign flips (plus the observed one) whose mean is at least the observed mean."""
    x = np.asarray(effects, dtype=float)
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n, len(x)))
    null = (signs * x).mean(1)
    return float((1 + (null >= x.mean()).sum()) / (n + 1))


def bootstrap_stability(nec: pd.DataFrame, suf: pd.DataFrame, gap: pd.DataFrame, gate: tuple[int, int],
                        n: int = 1000, seed: int = 0) -> dict:
    """Resample the pairs ``n`` times, recompute every head's ``necessity % + sufficiency %`` and its
    ranking: the share of resamples in which ``gate`` comes first, and in the top 3."""
    pairs = list(gap.pair_id)
    heads = nec[["layer", "head"]].drop_duplicates().values.tolist()
    N = nec.pivot_table(index=["layer", "head"], columns="pair_id", values="effect").loc[
        [tuple(h) for h in heads], pairs].values
    S = suf.pivot_table(index=["layer", "head"], columns="pair_id", values="effect").loc[
        [tuple(h) for h in heads], pairs].values
    G = gap.set_index("pair_id").loc[pairs, "gap"].values
    rng = np.random.default_rng(seed)
    gi = heads.index(list(gate))
    first = top3 = 0
    for _ in range(n):
        idx = rng.integers(0, len(pairs), len(pairs))
        score = (N[:, idx].mean(1) + S[:, idx].mean(1)) / G[idx].mean()
        order = np.argsort(-score)
        first += order[0] == gi
        top3 += gi in order[:3]
    return {"gate_share": first / n, "top3_share": top3 / n, "n": n}


def _dla_directions(model: ChatModel, gp: GatePairs) -> torch.Tensor:
    """``mean_{t in R} W_U[:, t] - W_U[:, a_pair]`` for every pair: ``[pair, d_model]``."""
    W = model.W_U.detach().float().cpu()
    refusal = W[:, list(model.refusal_token_ids)].mean(1)
    return torch.stack([refusal - W[:, int(t[0])] for t in gp.targets])


def _heads_normed(model: ChatModel, cache) -> torch.Tensor:
    """Every head's write at the last position through the final norm, linearised with the run's own
    scale: ``[layer, head, B, d_model]`` (float32, CPU)."""
    from . import dla as D

    heads = D.head_residual_writes(model, cache, -1)                               # [L, H, B, d]
    L, H = heads.shape[:2]
    normed = cache.apply_ln_to_stack(heads.reshape(L * H, *heads.shape[2:]), layer=None, pos_slice=-1)
    return (normed.float().cpu() * D.final_norm(model).weight).view(L, H, heads.shape[2], -1)


@torch.no_grad()
def head_dla_pairs(model: ChatModel, gp: GatePairs, batch_size: int = 8, fwd_hooks=(), controls: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every head's output DLA at the last prompt position of each pair's sensitive and control prompt
    (see :func:`head_dla`): ``(sensitive, control)``, each ``[layer, head, pair]`` (``control`` is
    ``None`` with ``controls=False``, which skips their runs). ``fwd_hooks`` stay on during the runs
    (a knockout), and the final norm is linearised with that run's own scale."""
    from . import dla as D

    dirs = _dla_directions(model, gp)

    def run(prompts: list[str]) -> torch.Tensor:
        out = [_heads_normed(model, cache)
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
    rng = np.random.default_rng(seed)
    boot = diff[:, :, rng.integers(0, P, size=(n_boot, P))].mean(-1)               # [L, H, n_boot]
    summary = pd.DataFrame([{"layer": l, "head": h, "dla": float(diff[l, h].mean()),
                             "ci_lo": float(np.quantile(boot[l, h], 0.025)), "ci_hi": float(np.quantile(boot[l, h], 0.975))}
                            for l in range(L) for h in range(H)])
    per_pair = pd.DataFrame([{"layer": l, "head": h, "pair_id": gp.pairs.pair_id.iloc[p],
                              "dla_sensitive": float(sens[l, h, p]), "dla_control": float(ctrl[l, h, p]),
                              "diff": float(diff[l, h, p])} for l in range(L) for h in range(H) for p in range(P)])
    return summary, per_pair


def depth_band(n_layers: int, lo: float = 0.25, hi: float = 0.65) -> range:
    """The paper's screening band: layers ``int(L * lo)`` to ``int(L * hi)`` inclusive."""
    return range(int(n_layers * lo), int(n_layers * hi) + 1)
