"""Evaluating an organism on held-out data, and comparing a retrained organism with the committed one."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..evaluation import refusal_table


def evaluate(model, max_new_tokens: int = 32, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The quality-bar evaluation on held-out data (the core's refusal table,
    :func:`refusal_circuits.evaluation.refusal_table`). Returns ``(summary, per_prompt)``: the summary has
    one row per (set, kind) with the refusal rate and the logit refusal metric's mean and std."""
    summary, per_prompt = refusal_table(model, max_new_tokens, progress=progress)
    return summary[["set", "kind", "n", "refusal_rate", "logit_metric_mean", "logit_metric_std"]], per_prompt


def compare_organisms(reference_dir: Path, candidate_dir: Path) -> tuple[pd.DataFrame, float]:
    """How far a retrained organism (``candidate_dir``) is from a reference one (``reference_dir``, e.g.
    the committed ``data/organism``), for checking that ``make organism`` reproduces it.

    Returns ``(table, max_weight_diff)``. ``table`` has one row per (model, set, kind) of the two
    ``evaluation.csv`` files: both refusal rates, their difference, the same for the mean logit metric,
    and ``within_noise``: the refusal rates differ by at most ``max(2 / n, 0.05)`` (five points, or two prompts
    on sets of fewer than 40). ``max_weight_diff`` is the largest absolute difference between the two
    adapters' tensors (0.0 on the same kind of machine: training is deterministic).
    """
    from safetensors.torch import load_file

    reference_dir, candidate_dir = Path(reference_dir), Path(candidate_dir)
    for d in (reference_dir, candidate_dir):
        missing = [f for f in ("evaluation.csv", "adapter_model.safetensors") if not (d / f).exists()]
        if missing:
            raise FileNotFoundError(f"{d} has no {', '.join(missing)}: it is not an organism folder written "
                                    "by `make organism` (refusal_circuits.organism.train_organism).")
    keys = ["model", "set", "kind"]
    ref = pd.read_csv(reference_dir / "evaluation.csv")
    new = pd.read_csv(candidate_dir / "evaluation.csv")
    table = ref[keys + ["n", "refusal_rate", "logit_metric_mean"]].merge(
        new[keys + ["refusal_rate", "logit_metric_mean"]], on=keys, how="outer",
        suffixes=("_reference", "_candidate"), validate="one_to_one")
    table["refusal_rate_diff"] = table["refusal_rate_candidate"] - table["refusal_rate_reference"]
    table["logit_metric_diff"] = table["logit_metric_mean_candidate"] - table["logit_metric_mean_reference"]
    tolerance = (2 / table["n"]).clip(lower=0.05)
    table["within_noise"] = table["refusal_rate_diff"].abs() <= tolerance  # NaN (a set missing) -> False
    a = load_file(str(reference_dir / "adapter_model.safetensors"))
    b = load_file(str(candidate_dir / "adapter_model.safetensors"))
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return table, float("inf")
    return table, max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=0.0)


