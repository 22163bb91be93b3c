"""Stages: the artifacts that later notebooks build on, each from one function with canonical
parameters recorded beside it (``results/<model>/<stage>-<key>.json``).

A notebook that needs an earlier notebook's artifact asks its stage for it: the stage loads it when it
was computed before with the same parameters, data and weights, and computes (and saves) it otherwise,
so every notebook also runs on its own from an empty ``results/``. No notebook repeats another's
defaults: the defaults live here.

=====================  ======================================  ====================================
stage                  artifact                                made by / used by
=====================  ======================================  ====================================
``baseline``           greedy generations on the held-out      notebook 01 / the precondition of
                       harmful and harmless prompts: does      every conclusion in 02-07
                       this model refuse at all?
``refusal_direction``  difference-of-means direction, its      notebook 02 / 03, 04, 05, 06, 07
                       layer and position, candidate scores
``transfer``           where the subject's information moves   notebook 03 / 03 (clamp, self-repair),
                       to the last position (residual          04 (head-class window)
                       denoising), and the windows derived
                       from it
=====================  ======================================  ====================================

The windows that the seed write-up chose for Gemma-2b-it (the middle third for head classes, the
direction's layer for clamping, every layer for self-repair) come from the model's own results here;
the Gemma choices stay available as notebook parameters. The gate screen keeps its own folder
(:mod:`refusal_circuits.screen`). :data:`STAGES` lists the stages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import pandas as pd

from . import patching
from .data import align_pairs, data_hash, load_instructions, load_toy_pairs
from .direction import DirectionChoice, candidate_directions, select_direction
from .models import ChatModel, middle_third
from .generation import refusal_scores
from .results import ResultsStore
from .stats import fisher_greater


def _require_positive(params, names: tuple[str, ...]) -> None:
    for name in names:
        if int(getattr(params, name)) < 1:
            raise ValueError(f"{type(params).__name__}.{name} must be >= 1, got {getattr(params, name)}.")


@dataclass(frozen=True)
class DirectionParams:
    """Canonical parameters of the refusal direction (Arditi et al.'s selection, ``docs/methods.md``).

    Candidates come from the first ``n_train`` harmful and harmless *train* prompts (difference of
    means of ``resid_pre`` at every layer and post-instruction position); each candidate at every
    ``layer_stride``-th layer below ``max_layer_frac * L`` is scored on ``n_val`` *val* prompts of each
    kind, and the filters ``KL <= kl_max``, ``induce > 0`` pick the lowest bypass."""

    n_train: int = 64
    n_val: int = 8
    layer_stride: int = 3
    kl_max: float = 0.1
    max_layer_frac: float = 0.8

    def __post_init__(self):
        _require_positive(self, ("n_train", "n_val", "layer_stride"))
        if not 0 < self.max_layer_frac <= 1:
            raise ValueError(f"DirectionParams.max_layer_frac must be in (0, 1], got {self.max_layer_frac}.")


@dataclass(frozen=True)
class BaselineParams:
    """Canonical parameters of the baseline: greedy generations (``max_new_tokens``) for the first
    ``n_prompts`` harmful and harmless *test* prompts, scored by the substring refusal flag. The model
    *refuses* when it refuses harmful prompts more often than harmless ones with a one-sided Fisher
    exact p below ``alpha``."""

    n_prompts: int = 24
    max_new_tokens: int = 32
    alpha: float = 0.05

    def __post_init__(self):
        _require_positive(self, ("n_prompts", "max_new_tokens"))
        if not 0 < self.alpha < 1:
            raise ValueError(f"BaselineParams.alpha must be in (0, 1), got {self.alpha}.")


@dataclass
class Baseline:
    """Does this model refuse? Its generations on held-out prompts and the test that says so.

    Attributes:
        table: ``instruction, completion, refused, kind`` (``kind`` harmful / harmless), one row per prompt.
        harmful_rate, harmless_rate: refusal rates of the two kinds.
        p_value: one-sided Fisher exact p of "harmful prompts are refused more often".
        refuses: ``p_value < alpha``: the precondition of every claim about how the model refuses.
        params: the stage parameters and data hash.
    """

    table: pd.DataFrame
    harmful_rate: float
    harmless_rate: float
    p_value: float
    refuses: bool
    params: dict = field(default_factory=dict)

    @property
    def summary(self) -> str:
        n = self.table.kind.value_counts()
        k = self.table.groupby("kind").refused.sum()
        return (f"harmful {int(k.get('harmful', 0))}/{int(n.get('harmful', 0))} vs harmless "
                f"{int(k.get('harmless', 0))}/{int(n.get('harmless', 0))} held-out prompts refused, one-sided "
                f"Fisher p {self.p_value:.2g}")

    @property
    def precondition(self) -> tuple[bool, str]:
        """``(refuses, why)`` for :class:`refusal_circuits.reference.Conclusion`'s ``requires``."""
        verb = "refuses harmful prompts more often than harmless ones" if self.refuses else \
            f"does not refuse harmful prompts more often than harmless ones (p ≥ {self.params.get('alpha')})"
        return self.refuses, f"the model {verb}: {self.summary}"


def baseline(model: ChatModel, store: ResultsStore | None = None, params: BaselineParams | None = None,
             progress: bool = True, **overrides) -> Baseline:
    """The model's baseline generations on held-out prompts (a resumable, saved run) and whether it
    refuses: the precondition of every notebook's conclusion."""
    store = store or ResultsStore.for_model(model)
    p = replace(params or BaselineParams(), **overrides)
    harm = load_instructions("harmful", "test", n=p.n_prompts)
    safe = load_instructions("harmless", "test", n=p.n_prompts)
    key = {**asdict(p), "data": data_hash(harm, safe)}
    prompts = harm.instruction.tolist() + safe.instruction.tolist()
    table = refusal_scores(model, prompts, max_new_tokens=p.max_new_tokens, progress=progress,
                           checkpoint=store.checkpoint("refusal_baseline", {k: v for k, v in key.items() if k != "alpha"}))
    table["kind"] = ["harmful"] * len(harm) + ["harmless"] * len(safe)
    k_h, k_s = int(table.refused[: len(harm)].sum()), int(table.refused[len(harm):].sum())
    pval = fisher_greater(k_h, len(harm), k_s, len(safe))
    return Baseline(table=table, harmful_rate=k_h / len(harm), harmless_rate=k_s / len(safe), p_value=pval,
                    refuses=pval < p.alpha, params=key)


def refusal_direction(model: ChatModel, store: ResultsStore | None = None,
                      params: DirectionParams | None = None, progress: bool = True, **overrides
                      ) -> DirectionChoice:
    """The model's refusal direction: loaded from ``store`` if this stage ran before with the same
    parameters (and data and weights), computed and saved otherwise.

    Called with no parameters it is *the* direction every notebook shares; ``params`` or keyword
    overrides (``n_train=128``) give another, saved under its own key. The parameters, the data hash
    and the choice are in the artifact's manifest and in :attr:`DirectionChoice.params`. The candidate
    scoring is a resumable sweep: an interrupted run continues where it stopped."""
    store = store or ResultsStore.for_model(model)
    p = replace(params or DirectionParams(), **overrides)
    harm_tr = load_instructions("harmful", "train", n=p.n_train)
    safe_tr = load_instructions("harmless", "train", n=p.n_train)
    harm_va = load_instructions("harmful", "val", n=p.n_val)
    safe_va = load_instructions("harmless", "val", n=p.n_val)
    key = {**asdict(p), "data": data_hash(harm_tr, safe_tr, harm_va, safe_va)}
    saved = store.load_tensor("refusal_direction", key)
    scores = store.load("direction_scores", key)
    if saved is not None and scores is not None:
        vec, meta = saved
        return DirectionChoice(vec, meta["layer"], meta["position"], scores, meta["baseline_harmful"],
                               meta["baseline_harmless"], params=key)
    cands, positions = candidate_directions(model, harm_tr.instruction.tolist(), safe_tr.instruction.tolist(),
                                            progress=progress)
    layers = [l for l in range(0, model.n_layers, p.layer_stride) if l < p.max_layer_frac * model.n_layers]
    choice = select_direction(model, cands, positions, harm_va.instruction.tolist(), safe_va.instruction.tolist(),
                              layers=layers, kl_max=p.kl_max, max_layer_frac=p.max_layer_frac,
                              progress=progress, checkpoint=store.checkpoint("direction_candidates", key))
    choice.params = key
    store.save("direction_scores", key, choice.scores)
    chosen = choice.scores.set_index(["layer", "position"]).loc[(choice.layer, choice.position)]
    store.save_tensor("refusal_direction", key, choice.direction, layer=choice.layer, position=choice.position,
                      model=model.name, baseline_harmful=choice.baseline_harmful,
                      baseline_harmless=choice.baseline_harmless, norm=float(choice.direction.norm()),
                      **{k: float(chosen[k]) for k in ("bypass", "induce", "kl")})
    return choice


@dataclass(frozen=True)
class TransferParams:
    """Canonical parameters of the transfer stage.

    Residual denoising on ``n_pairs`` toy pairs at every layer and every position from one before the
    subject to the last. A position *carries* the harmful information at a layer when patching it
    alone restores at least ``high`` of the harmful metric; the head-class window is the layers whose
    output raises the last position's restoration from ``low`` to ``high`` (the heads that move the
    information), widened downwards to ``min_width`` layers."""

    n_pairs: int = 8
    low: float = 0.1
    high: float = 0.5
    min_width: int = 3
    max_batch: int = 64

    def __post_init__(self):
        if not 0 <= self.low < self.high <= 1:
            raise ValueError(f"TransferParams needs 0 <= low < high <= 1, got low={self.low}, high={self.high}.")
        _require_positive(self, ("n_pairs", "min_width", "max_batch"))


@dataclass
class Transfer:
    """Where a model moves the subject's information to the last position, and the windows that follow.

    Attributes:
        table: residual denoising summarised per ``(layer, position)``: ``fraction`` of the harmful
            metric restored (bootstrap ``lo``/``hi``), positions counted from the end.
        subject_position: the subject's position from the end (the most common one among the pairs).
        subject_until: the last layer at which patching the subject position alone restores >= high
            (None: never).
        last_from: the first layer at which patching the last position alone restores >= high (None:
            never): from here on the last position carries the information.
        window: the head-class window: layers ``[first layer where the last position restores >= low,
            last_from)`` shifted down by one (a layer's output first shows in the next ``resid_pre``),
            widened downwards to ``min_width``; the middle third when ``last_from`` is None.
        clamp_layer: where clamping the last position's refusal component can act alone: ``last_from``
            (the direction's own layer when ``last_from`` is None).
        self_repair_layers: the layers at which the component is zeroed for self-repair: from
            ``clamp_layer`` to the last layer (the component's carrier range); recovery is read at the
            final residual.
        reasons: one sentence per choice, printed by the notebooks.
        params: the stage parameters and data hash (the key of the saved sweep).
    """

    table: pd.DataFrame
    subject_position: int
    subject_until: int | None
    last_from: int | None
    window: list[int]
    clamp_layer: int
    self_repair_layers: list[int]
    reasons: dict[str, str] = field(default_factory=dict)
    params: dict = field(default_factory=dict)


def transfer_windows(table: pd.DataFrame, subject_position: int, n_layers: int, params: TransferParams,
                     fallback_layer: Callable[[], int]) -> dict:
    """The choices of :class:`Transfer` from a summarised residual-denoising ``table`` (pure: tested on
    tables whose answer is known). ``fallback_layer()`` gives the clamp layer when the last position
    never carries the information (it is called only then)."""
    grid = table.pivot_table(index="layer", columns="position", values="fraction")
    last = grid[-1] if -1 in grid.columns else pd.Series(dtype=float)
    subj = grid[subject_position] if subject_position in grid.columns else pd.Series(dtype=float)
    subject_until = int(subj[subj >= params.high].index.max()) if (subj >= params.high).any() else None
    last_from = int(last[last >= params.high].index.min()) if (last >= params.high).any() else None
    reasons = {}
    if last_from is None:
        third = list(middle_third(n_layers))
        window = third
        reasons["window"] = (f"the last position never restores >= {params.high:.0%} of the harmful metric, so no "
                             f"transfer layer is found; the middle third L{third[0]}-L{third[-1]} (the write-up's "
                             "choice) is used instead")
        clamp = int(fallback_layer())
        reasons["clamp"] = (f"no layer where the last position alone carries the information; the direction's "
                            f"layer L{clamp} is used")
    else:
        rising = last[(last >= params.low) & (last.index <= last_from)]
        start = int(rising.index.min())
        lo, hi = max(start - 1, 0), max(last_from - 1, 0)
        lo = max(0, min(lo, hi - params.min_width + 1))
        window = list(range(lo, hi + 1))
        reasons["window"] = (f"patching the last position restores >= {params.low:.0%} from resid_pre L{start} and "
                             f">= {params.high:.0%} from L{last_from}, so the heads that move the information sit in "
                             f"layers L{max(start - 1, 0)}-L{hi}" + (f", widened to {params.min_width} layers"
                                                                      if hi - max(start - 1, 0) + 1 < params.min_width else ""))
        clamp = last_from
        reasons["clamp"] = (f"from L{last_from} the last position alone carries the harmful information "
                            f"(restores >= {params.high:.0%}), so a clamp there can act without the subject position"
                            + (f" (the subject position carries it up to L{subject_until})" if subject_until is not None else ""))
    repair = list(range(clamp, n_layers))
    reasons["self_repair"] = (f"the component is zeroed at L{repair[0]}-L{repair[-1]}, where the last position carries "
                              "it, and its recovery is read at the final residual")
    return {"subject_until": subject_until, "last_from": last_from, "window": window, "clamp_layer": clamp,
            "self_repair_layers": repair, "reasons": reasons}


def transfer(model: ChatModel, store: ResultsStore | None = None, params: TransferParams | None = None,
             progress: bool = True, **overrides) -> Transfer:
    """The model's transfer stage: residual denoising of the toy pairs at every layer and position from
    one before the subject to the last (loaded when saved with the same parameters, data and weights;
    a resumable sweep otherwise), and the windows derived from it (:func:`transfer_windows`)."""
    store = store or ResultsStore.for_model(model)
    p = replace(params or TransferParams(), **overrides)
    toy = load_toy_pairs()
    aligned = align_pairs(model, toy).subset(p.n_pairs)
    if len(aligned) == 0:
        raise ValueError(f"no toy pair aligns under {model.name}'s tokenizer: the transfer stage needs aligned pairs.")
    first = int(aligned.pairs.subject_from_end.min()) - 1
    positions = list(range(first, 0))
    key = {**asdict(p), "data": data_hash(toy), "pairs": list(aligned.pairs.pair_id), "positions": positions}
    raw = patching.patch_sweep(model, aligned, patching.resid_patches(model, positions), "denoising",
                               max_batch=p.max_batch, progress=progress,
                               checkpoint=store.checkpoint("resid_denoising", key))
    table = patching.summarise(raw, by=("layer", "position"))
    subject = int(aligned.pairs.subject_from_end.mode()[0])
    chosen = transfer_windows(table, subject, model.n_layers, p,
                              lambda: refusal_direction(model, store, progress=progress).layer)
    return Transfer(table=table, subject_position=subject, params=key, **chosen)


#: every stage by name: ``STAGES["refusal_direction"](model)``
STAGES: dict[str, Callable[..., object]] = {"baseline": baseline, "refusal_direction": refusal_direction,
                                            "transfer": transfer}
