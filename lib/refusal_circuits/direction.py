"""The refusal direction (Arditi et al. 2024), directional ablation and activation addition.

Conventions: positions are counted **from the end** of the (left-padded) prompt, so ``-1`` is the last
prompt position for every prompt of a batch. Layers index ``blocks.{l}.hook_resid_pre``.

* :func:`post_instruction_positions` -- how many template tokens follow the instruction.
* :func:`mean_resid` / :func:`candidate_directions` -- difference of means (float64) of ``resid_pre``
  between harmful and harmless prompts at every layer x post-instruction position.
* :func:`ablation_hooks` -- remove ``r̂`` from everything written to the residual stream.
* :func:`addition_hooks` -- add ``alpha * r`` to ``resid_pre`` at one layer, all positions.
* :func:`select_direction` -- score every candidate by *bypass*, *induce* and *KL* and pick one with
  the filters of section A (KL <= 0.1, induce > 0, layer < 0.8 L, lowest bypass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd
import torch
from jaxtyping import Float

from . import hooks
from .batching import cached_runs, last_logits
from .metrics import log_odds_refusal_score
from .models import ChatModel
from .results import Checkpoint, run_parts
from .scoring import refusal_metrics


def post_instruction_positions(model: ChatModel) -> int:
    """Number of template tokens after the instruction (e.g. ``<end_of_turn>\\n<start_of_turn>model\\n``),
    found as the longest common token suffix of two differently-ending prompts."""
    tok = model.tokenizer
    a = tok(model.format_prompt("Tell me about apples"), add_special_tokens=False)["input_ids"]
    b = tok(model.format_prompt("Write a poem please"), add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    if n == 0:
        raise ValueError("The chat template adds no tokens after the instruction; use positions=[-1].")
    return n


def resid_hook_names(model: ChatModel) -> list[str]:
    return [hooks.resid_pre(l) for l in range(model.n_layers)]


@torch.no_grad()
def mean_resid(model: ChatModel, instructions: Sequence[str], positions: Sequence[int],
               batch_size: int = 16, progress: bool = False) -> Float[torch.Tensor, "layer pos d_model"]:
    """Mean over prompts of ``resid_pre`` at every layer and the given positions (from the end), in
    float64."""
    if len(instructions) == 0:
        raise ValueError("No instructions given: the prompt list is empty.")
    names = resid_hook_names(model)
    total = torch.zeros(model.n_layers, len(positions), model.d_model, dtype=torch.float64)
    pos = torch.tensor(list(positions))
    for _, _, cache in cached_runs(model, instructions, names, batch_size, show_progress=progress, logits_to_keep=1):
        for l, name in enumerate(names):
            total[l] += cache[name][:, pos].double().sum(0).cpu()
    return total / len(instructions)


def candidate_directions(model: ChatModel, harmful: Sequence[str], harmless: Sequence[str],
                         positions: Sequence[int] | None = None, batch_size: int = 16, progress: bool = False
                         ) -> tuple[Float[torch.Tensor, "layer pos d_model"], list[int]]:
    """Difference of means ``mean(harmful) - mean(harmless)`` of ``resid_pre`` for every layer and
    post-instruction position. Returns ``(directions, positions)``; directions are not normalised."""
    if positions is None:
        positions = list(range(-post_instruction_positions(model), 0))
    diff = (mean_resid(model, harmful, positions, batch_size, progress)
            - mean_resid(model, harmless, positions, batch_size, progress))
    return diff, list(positions)


def _unit(direction: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    d = direction.to(device=like.device, dtype=torch.float32)
    return d / d.norm()


def ablation_hooks(model: ChatModel, direction: Float[torch.Tensor, "d_model"]) -> list:
    """Directional ablation: project ``r̂`` out of the residual stream before and after every
    attention and MLP block (``resid_pre`` and ``resid_mid`` of every layer and the final
    ``resid_post``). Because every write passes through one of these points before anything reads it,
    this equals removing ``r̂`` from the embeddings and from every block output."""

    def hook(x, hook):
        r = _unit(direction, x)
        return x - (x.float() @ r).unsqueeze(-1).to(x.dtype) * r.to(x.dtype)

    names = []
    for l in range(model.n_layers):
        names += [hooks.resid_pre(l), hooks.resid_mid(l)]
    names.append(hooks.final_resid(model.n_layers))
    return [(n, hook) for n in names]


def addition_hooks(model: ChatModel, vector: Float[torch.Tensor, "d_model"], layer: int,
                   alpha: float = 1.0) -> list:
    """Activation addition: ``resid_pre[layer] += alpha * vector`` at every position."""
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"layer must be in [0, {model.n_layers}), got {layer}.")

    def hook(x, hook):
        return x + alpha * vector.to(device=x.device, dtype=x.dtype)

    return [(hooks.resid_pre(layer), hook)]


def component_hooks(layer: int, direction: torch.Tensor, value: float | None, position: int = -1) -> list:
    """Set (clamp) the component of ``resid_pre[layer]`` along ``r̂`` at ``position`` to ``value``
    (``value=None`` leaves it; ``0`` zeroes it)."""

    def hook(x, hook):
        r = _unit(direction, x).to(x.dtype)
        x = x.clone()
        cur = x[:, position] @ r
        x[:, position] += (value - cur).unsqueeze(-1) * r
        return x

    return [(hooks.resid_pre(layer), hook)] if value is not None else []


@torch.no_grad()
def _last_log_probs(model: ChatModel, instructions: Sequence[str], fwd_hooks: list, batch_size: int
                    ) -> torch.Tensor:
    return last_logits(model, instructions, fwd_hooks, batch_size).log_softmax(-1)


@dataclass
class DirectionChoice:
    """The selected refusal direction and the scores of every candidate."""

    direction: torch.Tensor          # [d_model], not normalised (the difference of means)
    layer: int
    position: int                    # counted from the end
    scores: pd.DataFrame             # one row per candidate: layer, position, bypass, induce, kl, kept
    baseline_harmful: float          # mean refusal score on harmful val prompts, no intervention
    baseline_harmless: float
    params: dict = field(default_factory=dict)  # what produced it (the stage's canonical parameters)

    @property
    def unit(self) -> torch.Tensor:
        return self.direction / self.direction.norm()


def select_direction(model: ChatModel, candidates: torch.Tensor, positions: Sequence[int],
                     harmful_val: Sequence[str], harmless_val: Sequence[str], layers: Sequence[int] | None = None,
                     kl_max: float = 0.1, max_layer_frac: float = 0.8, batch_size: int = 32,
                     progress: bool = True, checkpoint: Checkpoint | None = None) -> DirectionChoice:
    """Score candidates as Arditi et al. and pick one.

    For every candidate ``(layer, position)`` (``layers`` defaults to all layers below
    ``max_layer_frac * L``): *bypass* = mean log-odds refusal score on ``harmful_val`` with the
    direction ablated everywhere; *induce* = the same on ``harmless_val`` with the vector added at its
    layer; *KL* = mean KL(baseline || ablated) of the last-position distribution on ``harmless_val``.
    Candidates with ``kl > kl_max`` or ``induce < 0`` are discarded; the lowest bypass wins. If none
    passes, the filters are relaxed in that order (KL first) and the choice is flagged in ``scores``.
    With ``checkpoint`` every candidate's scores are saved as they finish (a rerun resumes).
    """
    L = model.n_layers
    if layers is None:
        layers = [l for l in range(L) if l < max_layer_frac * L]
    R = model.refusal_token_ids
    base_h = _last_log_probs(model, harmful_val, [], batch_size)
    base_s = _last_log_probs(model, harmless_val, [], batch_size)
    grid = [(l, pi) for l in layers for pi in range(len(positions))]

    def score(cell: tuple[int, int]) -> pd.DataFrame:
        l, pi = cell
        vec = candidates[l, pi]
        both = _last_log_probs(model, list(harmful_val) + list(harmless_val), ablation_hooks(model, vec),
                               batch_size)
        lp_h, lp_s_abl = both[:len(harmful_val)], both[len(harmful_val):]
        lp_s_add = _last_log_probs(model, harmless_val, addition_hooks(model, vec, l), batch_size)
        kl = (base_s.exp() * (base_s - lp_s_abl)).sum(-1).mean()
        return pd.DataFrame([{"layer": l, "position": positions[pi],
                              "bypass": log_odds_refusal_score(lp_h, R).mean().item(),
                              "induce": log_odds_refusal_score(lp_s_add, R).mean().item(),
                              "kl": kl.item()}])

    scores = run_parts(grid, score, checkpoint, "candidates", progress,
                       part_ids=[f"L{l} pos{positions[pi]}" for l, pi in grid])
    scores["kept"] = (scores.kl <= kl_max) & (scores.induce > 0) & (scores.layer < max_layer_frac * L)
    pool = scores[scores.kept]
    scores["relaxed"] = False
    if pool.empty:  # say so rather than fail: a finding about the model
        pool = scores[scores.induce > 0]
        if pool.empty:
            pool = scores
        scores["relaxed"] = True
    best = pool.sort_values("bypass").iloc[0]
    l, p = int(best.layer), int(best.position)
    return DirectionChoice(direction=candidates[l, positions.index(p)].clone(), layer=l, position=p,
                           scores=scores,
                           baseline_harmful=log_odds_refusal_score(base_h, R).mean().item(),
                           baseline_harmless=log_odds_refusal_score(base_s, R).mean().item())


# ------------------------------------------------------------------------------------------------
# The refusal component: resid . r̂ at the last position
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def component_by_layer(model: ChatModel, instructions: Sequence[str], direction: torch.Tensor,
                       fwd_hooks: Sequence = (), batch_size: int = 32, position: int = -1) -> pd.DataFrame:
    """``resid_pre[l] . r̂`` at ``position`` for every layer ``l`` (and ``final`` = last ``resid_post``),
    one row per (prompt, layer). ``fwd_hooks`` (e.g. a clamp) stay on during the run."""
    names = resid_hook_names(model) + [hooks.final_resid(model.n_layers)]
    rows = []
    for batch, _, cache in cached_runs(model, instructions, names, batch_size, fwd_hooks, logits_to_keep=1):
        r = _unit(direction, cache[names[0]])
        for l, name in enumerate(names):
            comp = (cache[name][:, position].float() @ r).cpu().numpy()
            for instr, v in zip(batch, comp):
                rows.append({"instruction": instr, "layer": l, "component": float(v)})
    return pd.DataFrame(rows)


@torch.no_grad()
def block_contributions(model: ChatModel, instructions: Sequence[str], direction: torch.Tensor,
                        batch_size: int = 32, position: int = -1) -> pd.DataFrame:
    """What each attention and MLP block writes along ``direction`` at ``position``: one row per
    (prompt, layer, block) with ``value = block_out . d`` (``d`` normalised)."""
    sites = [(l, b, hooks.block_out(l, b)) for l in range(model.n_layers) for b in hooks.BLOCK_OUTPUTS]
    rows = []
    offset = 0
    for batch, _, cache in cached_runs(model, instructions, [n for _, _, n in sites], batch_size,
                                     logits_to_keep=1):
        r = _unit(direction, cache[sites[0][2]])
        for l, b, name in sites:
            vals = (cache[name][:, position].float() @ r).cpu().numpy()
            for k, (instr, v) in enumerate(zip(batch, vals)):
                rows.append({"prompt": offset + k, "instruction": instr, "layer": l, "block": b, "value": float(v)})
        offset += len(batch)
    return pd.DataFrame(rows)


def paired_block_contributions(model: ChatModel, harmful: Sequence[str], harmless: Sequence[str],
                               direction: torch.Tensor) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Block writes along ``direction`` for pairs (``harmful[i]`` with ``harmless[i]``). Returns
    ``(per_pair, summary)``: per pair ``diff = harmful - harmless``; the summary has the mean difference
    per (block, layer) with a 95% normal interval (``lo``, ``hi``)."""
    if len(harmful) != len(harmless):
        raise ValueError(f"harmful and harmless must pair up: {len(harmful)} vs {len(harmless)} prompts.")
    h = block_contributions(model, harmful, direction)
    s = block_contributions(model, harmless, direction)
    per_pair = h.merge(s, on=["prompt", "layer", "block"], suffixes=("_harmful", "_harmless"))
    per_pair["diff"] = per_pair.value_harmful - per_pair.value_harmless
    summary = per_pair.groupby(["block", "layer"])["diff"].agg(["mean", "sem"]).reset_index()
    summary["sem"] = summary["sem"].fillna(0.0)
    summary["lo"] = summary["mean"] - 1.96 * summary["sem"]
    summary["hi"] = summary["mean"] + 1.96 * summary["sem"]
    return per_pair, summary


def clamp_sweep(model: ChatModel, instructions: Sequence[str], direction: torch.Tensor, layer: int,
                values: Sequence[float], batch_size: int = 32) -> pd.DataFrame:
    """Logit refusal metric with the refusal component of ``resid_pre[layer]`` at the last position
    clamped to each value: one row per (prompt, value)."""
    frames = []
    for v in values:
        df = refusal_metrics(model, instructions, component_hooks(layer, direction, float(v)), batch_size)
        frames.append(df.assign(value=float(v)))
    return pd.concat(frames, ignore_index=True)


def self_repair(model: ChatModel, instructions: Sequence[str], direction: torch.Tensor,
                layers: Sequence[int], batch_size: int = 32) -> pd.DataFrame:
    """Zero the refusal component of ``resid_pre[l]`` (last position) for each ``l`` in ``layers`` and
    record the component at every layer. ``ablated_at = -1`` rows are the unablated baseline."""
    frames = [component_by_layer(model, instructions, direction, (), batch_size).assign(ablated_at=-1)]
    for l in layers:
        hooks = component_hooks(l, direction, 0.0)
        frames.append(component_by_layer(model, instructions, direction, hooks, batch_size).assign(ablated_at=l))
    return pd.concat(frames, ignore_index=True)
