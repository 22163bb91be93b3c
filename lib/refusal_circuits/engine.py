"""The per-head edit engine behind every per-head experiment of "How Alignment Routes": interchange
(:func:`refusal_circuits.gate.interchange`), directional ablation
(:func:`refusal_circuits.routing.directional_ablation`), band interchange
(:func:`refusal_circuits.cipher.band_interchange`) and the knockout (:func:`refusal_circuits.routing.knockout_dla`).

Each is one loop: for a batch of *target runs* (prompt + the pair's target tokens,
:class:`TargetBatch`), rewrite one query head's ``z`` by ``write(z, head)`` at the positions of a
mask, and read the NLL of the target tokens. :func:`edited_nll` stacks several heads of one layer along
the batch and starts the forward at that layer from the target run's cached residual;
:func:`edit_sweep` runs it over (batch of pairs, layer) parts, checkpointed.

Which positions an interchange swaps is a named choice, :data:`POSITIONS` (:func:`position_map`):

* ``prompt`` (the default) -- the two prompts aligned from their ends (template suffix, last prompt
  position and the positions before it line up); the target-token positions are never swapped: both runs
  read the same target tokens with their own activations, so a head is credited only for what it carries
  out of the prompt;
* ``last`` -- only the last prompt position, where the decision is read;
* ``paper`` -- the paper's code (``gregfrank/how-alignment-routes``): the source *prompt*'s positions
  copied onto the first ``min(len target run, len source prompt)`` positions of the target run (prompt +
  target tokens), counted from the start; a longer source overwrites the target's last prompt positions
  and target-token positions, a shorter one leaves the target's last positions alone. Alias ``start``;
* ``answer`` -- a diagnostic (our old default, alias ``end``): the source run carries the same target
  tokens and every position is swapped from the end, target-token positions included, so a head that only
  continues the answer in progress scores as "necessary".

Shapes: ``z`` is ``[batch, pos, n_heads, d_head]`` per query head; masks are ``[batch, pos]`` over
left-padded runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import pandas as pd
import torch

from . import hooks
from .models import ChatModel
from .patching import skip_lower_layers
from .results import Checkpoint, run_parts

Positions = Literal["prompt", "last", "paper", "answer"]
POSITIONS: tuple[str, ...] = ("prompt", "last", "paper", "answer")
#: old names kept for scripts: ``start`` (the paper's rule) and ``end`` (the ``answer`` diagnostic)
ALIASES = {"start": "paper", "end": "answer"}
#: a head edit: ``write(z [B, T, d_head] of one head, head index) -> new z`` (used where the mask is true)
Write = Callable[[torch.Tensor, int], torch.Tensor]


def resolve_positions(positions: str) -> str:
    """The canonical name of a position mode (``start`` -> ``paper``, ``end`` -> ``answer``); a clear
    error for anything else."""
    name = ALIASES.get(positions, positions)
    if name not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS} (or the aliases {sorted(ALIASES)}), got {positions!r}.")
    return name


def source_has_targets(positions: str) -> bool:
    """Whether the source run carries the target tokens too (only the ``answer`` diagnostic)."""
    return resolve_positions(positions) == "answer"


def position_map(prompt_len: Sequence[int], source_len: Sequence[int], n_target: Sequence[int], T: int, S: int,
                 positions: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Which target-run positions take which source-run position: ``(mask [B, T] bool, src [B, T] long)``.

    Row ``b``'s target run is its prompt (``prompt_len[b]`` tokens) + ``n_target[b]`` target tokens,
    left-padded to width ``T``; its source run is the other prompt (``source_len[b]`` tokens, + the same
    target tokens for ``answer``), left-padded to width ``S``. See the module docstring for the modes."""
    mode = resolve_positions(positions)
    lt, ls, nt = (torch.as_tensor(list(x)) for x in (prompt_len, source_len, n_target))
    p = torch.arange(T)[None]
    if mode == "answer":
        j = T - 1 - p                                                     # distance from the end of the run
        mask = j < torch.minimum(lt + nt, ls + nt)[:, None]
        src = S - 1 - j
    elif mode in ("prompt", "last"):
        j = (T - 1 - nt)[:, None] - p                                     # distance from the last prompt position
        n = torch.minimum(lt, ls)[:, None] if mode == "prompt" else torch.ones_like(lt)[:, None]
        mask = (j >= 0) & (j < n)
        src = S - 1 - j
    else:                                                                 # paper
        i = p - (T - (lt + nt))[:, None]                                  # index among the run's real tokens
        mask = (i >= 0) & (i < torch.minimum(lt + nt, ls)[:, None])
        src = (S - ls)[:, None] + i
    return mask, torch.where(mask, src, torch.zeros_like(src))


def plain_positions(prompt_len: int, source_len: int, n_target: int, positions: str) -> list[tuple[int, int]]:
    """The same map for one unpadded pair, written as a list of ``(target position, source position)``:
    what :func:`refusal_circuits.gate.interchange_loop` (the slow reference) uses."""
    mode = resolve_positions(positions)
    lt, ls, nt = int(prompt_len), int(source_len), int(n_target)
    if mode == "answer":
        return [(lt + nt - 1 - j, ls + nt - 1 - j) for j in range(min(lt, ls) + nt)]
    if mode == "prompt":
        return [(lt - 1 - j, ls - 1 - j) for j in range(min(lt, ls))]
    if mode == "last":
        return [(lt - 1, ls - 1)]
    return [(i, i) for i in range(min(lt + nt, ls))]


def pad_left(seqs: Sequence[torch.Tensor], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id sequences: ``(ids [B, T], attention mask [B, T])`` on ``device``."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = s
        mask[b, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def target_nll(logits: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean NLL of each row's targets from the last ``K`` positions' logits ``[B, K, vocab]`` of runs
    that end with those targets (position ``K - 1 - n + i`` predicts target ``i``): ``[B]`` on the CPU."""
    K = logits.shape[1]
    logp = logits.float().log_softmax(-1)
    out = []
    for b, t in enumerate(targets):
        pos = torch.arange(K - 1 - len(t), K - 1)
        out.append(-logp[b, pos, t.to(logp.device)].mean())
    return torch.stack(out).cpu()


@dataclass
class TargetBatch:
    """A batch of target runs, ready to be edited.

    Attributes:
        ids / mask: ``[B, T]`` left-padded prompt + target tokens and their attention mask.
        targets: ``B`` tensors of target-token ids (the runs end with them).
        K: logits are kept at the last ``K`` positions (``max n_target + 1``).
        resid: ``{layer: [B, T, d_model]}`` the residual entering each layer an edit will start at.
        baseline: ``[B]`` the unedited NLL of the target tokens.
        idx: the pair indices of the rows.
        extra: whatever the experiment keeps with the batch (the aligned source ``z``, a position mask).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    targets: list[torch.Tensor]
    K: int
    resid: dict[int, torch.Tensor]
    baseline: torch.Tensor
    idx: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.targets)


@torch.no_grad()
def target_batch(model: ChatModel, seqs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                 layers: Sequence[int] = (), idx: Sequence[int] = ()) -> TargetBatch:
    """Run the target sequences once: their unedited NLL and the residual entering each of ``layers``."""
    ids, mask = pad_left(seqs, model.tokenizer.pad_token_id, model.device)
    K = max(len(t) for t in targets) + 1
    names = {hooks.resid_pre(l): l for l in layers if l > 0}
    logits, cache = model.bridge.run_with_cache(ids, attention_mask=mask, logits_to_keep=K,
                                                names_filter=lambda n: n in names)
    return TargetBatch(ids, mask, list(targets), K, {l: cache[n] for n, l in names.items()},
                       target_nll(logits, targets), list(idx))


def z_writer(write: Write, mask: torch.Tensor, heads: Sequence[int], B: int):
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


@torch.no_grad()
def edited_nll(model: ChatModel, batch: TargetBatch, layer: int, heads: Sequence[int], write: Write,
               mask: torch.Tensor) -> torch.Tensor:
    """NLL ``[len(heads), B]`` of the batch with head ``heads[j]`` of ``layer`` rewritten by ``write`` in
    copy ``j``; all copies in one forward started at ``layer`` from the batch's cached residual."""
    n = len(heads)
    fwd = [(hooks.z(layer), z_writer(write, mask, heads, len(batch)))]
    mask_rep = batch.mask.repeat(n, 1)
    with model.bridge.hooks(fwd_hooks=fwd):
        if layer > 0:
            resid = batch.resid[layer].repeat(n, 1, 1)
            with skip_lower_layers(model, layer):
                logits = model.bridge(resid, start_at_layer=layer, attention_mask=mask_rep, logits_to_keep=batch.K,
                                      use_cache=False)
        else:
            logits = model.bridge(batch.ids.repeat(n, 1), attention_mask=mask_rep, logits_to_keep=batch.K)
    return target_nll(logits, batch.targets * n).view(n, len(batch))


@torch.no_grad()
def edited_nll_together(model: ChatModel, batch: TargetBatch, writes: dict[int, dict[int, Write]],
                        mask: torch.Tensor) -> torch.Tensor:
    """NLL ``[B]`` with *all* the edits ``{layer: {head: write}}`` applied together, one full forward."""
    fwd = []
    for l, per_head in sorted(writes.items()):
        hs = list(per_head)

        def hook(z, hook, per_head=per_head, hs=hs):
            z = z.clone()
            for h in hs:
                z[:, :, h] = torch.where(mask[:, :, None], per_head[h](z[:, :, h], h).to(z.dtype), z[:, :, h])
            return z

        fwd.append((hooks.z(l), hook))
    with model.bridge.hooks(fwd_hooks=fwd):
        logits = model.bridge(batch.ids, attention_mask=batch.mask, logits_to_keep=batch.K)
    return target_nll(logits, batch.targets)


@torch.no_grad()
def source_z(model: ChatModel, source: Sequence[torch.Tensor], layers: Sequence[int], src: torch.Tensor
             ) -> dict[int, torch.Tensor]:
    """The source runs' ``z`` at each of ``layers``, gathered onto the target positions ``src [B, T]``:
    ``{layer: [B, T, n_heads, d_head]}``."""
    ids, mask = pad_left(source, model.tokenizer.pad_token_id, model.device)
    names = [hooks.z(l) for l in layers]
    _, cache = model.bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names,
                                           logits_to_keep=1)
    out = {}
    for l in layers:
        zs = cache[hooks.z(l)]
        gather = src[:, :, None, None].expand(-1, -1, zs.shape[2], zs.shape[3])
        out[l] = torch.gather(zs, 1, gather)
    return out


def head_list(model: ChatModel, heads=None) -> list[tuple[int, int]]:
    """Every ``(layer, head)`` of the model when ``heads`` is ``None``, else ``heads`` as int pairs."""
    return [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)] if heads is None else \
        [(int(l), int(h)) for l, h in heads]


def by_layer(heads: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """Heads grouped by layer, layers ascending."""
    out: dict[int, list[int]] = {}
    for l, h in heads:
        out.setdefault(int(l), []).append(int(h))
    return dict(sorted(out.items()))


def pair_batches(n: int, size: int) -> list[list[int]]:
    """``range(n)`` in consecutive batches of ``size``."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def edit_sweep(model: ChatModel, n_pairs: int, heads: Sequence[tuple[int, int]] | None,
               prepare: Callable[[list[int], list[int]], TargetBatch],
               write_for: Callable[[TargetBatch, int], Write], mask_of: Callable[[TargetBatch], torch.Tensor],
               row: Callable[[TargetBatch, int, int, int, float, float], dict], label: str, max_batch: int = 64,
               pairs_per_batch: int = 8, checkpoint: Checkpoint | None = None, progress: bool = True) -> pd.DataFrame:
    """The per-head edit loop. Parts are (batch of pairs, layer); for each, ``prepare(pair indices,
    layers)`` builds the :class:`TargetBatch` once per batch of pairs, and every head ``h`` of the layer is
    edited by ``write_for(batch, layer)`` at ``mask_of(batch)``, ``max_batch // B`` heads per forward. One
    row per (head, pair): ``row(batch, layer, head, row index in the batch, baseline, edited)``. With
    ``checkpoint`` each part is saved as it finishes and a rerun resumes."""
    per_layer = by_layer(head_list(model, heads))
    layers = list(per_layer)
    batches = pair_batches(n_pairs, pairs_per_batch)
    parts = [(b, l) for b in range(len(batches)) for l in layers]
    current: dict = {}

    def run(part: tuple[int, int]) -> pd.DataFrame:
        b, l = part
        if current.get("b") != b:
            current.clear()
            current.update(b=b, batch=prepare(batches[b], layers))
        batch: TargetBatch = current["batch"]
        k = max(1, max_batch // len(batch))
        write, mask = write_for(batch, l), mask_of(batch)
        rows = []
        hs = per_layer[l]
        for s in range(0, len(hs), k):
            chunk = hs[s:s + k]
            edited = edited_nll(model, batch, l, chunk, write, mask)
            for j, h in enumerate(chunk):
                rows += [row(batch, l, h, bi, float(batch.baseline[bi]), float(edited[j, bi])) for bi in range(len(batch))]
        return pd.DataFrame(rows)

    ids = [f"pairs {batches[b][0]}-{batches[b][-1]} L{l}" for b, l in parts]
    return run_parts(parts, run, checkpoint, label, progress, part_ids=ids)


def zero_head_hooks(layer: int, head: int) -> list[tuple[str, Callable]]:
    """Forward hooks that zero one head's ``z`` at every position (the knockout, as a plain hook: the
    reference :func:`refusal_circuits.routing.knockout_dla` must equal)."""
    def hook(z, hook):
        z = z.clone()
        z[:, :, int(head)] = 0
        return z

    return [(hooks.z(int(layer)), hook)]
