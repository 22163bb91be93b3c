"""How often a model refuses, on every prompt set the companion uses: the refusal table.

One table per model (:func:`refusal_table`): greedy generations for the held-out harmful and harmless
*test* prompts, both halves of the toy pairs and both halves of the safety pairs, scored by the substring
flag, with the logit refusal metric beside them. The substring score has known false positives (a
disclaimer such as "As an AI language model, I don't have the capability to ..." on a harmless
request): every refusal records the phrase that flagged it, and the summary counts the refusals that
only a disclaimer phrase flagged (:data:`DISCLAIMER_PHRASES`) instead of hiding them.

``refusal-circuits refusal-table --model NAME`` writes ``data/refusal/<model>/`` (summary, per-prompt
table, manifest); :func:`refusal_report` turns the saved folders into the table in ``docs/refusal.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from .data import data_hash, load_instructions, load_safety_pairs, load_toy_pairs
from .generation import refusal_scores
from .metrics import refusal_phrases
from .results import ResultsStore, atomic_write, package_versions
from .scoring import refusal_metrics

#: phrases that flag a disclaimer rather than a refusal when nothing else matches
DISCLAIMER_PHRASES: tuple[str, ...] = ("As an AI", "As a language model", "As an assistant")

#: the order of the sets in every table: (set, kind)
SETS: tuple[tuple[str, str], ...] = (
    ("test split", "harmful"), ("test split", "harmless"), ("toy pairs", "harmful"), ("toy pairs", "harmless"),
    ("safety pairs", "sensitive"), ("safety pairs", "control"),
)


def eval_prompts() -> dict[tuple[str, str], list[str]]:
    """The prompts of each ``(set, kind)`` in :data:`SETS`."""
    toy, sp = load_toy_pairs(), load_safety_pairs()
    return {
        ("test split", "harmful"): load_instructions("harmful", "test")["instruction"].tolist(),
        ("test split", "harmless"): load_instructions("harmless", "test")["instruction"].tolist(),
        ("toy pairs", "harmful"): toy["harmful"].tolist(),
        ("toy pairs", "harmless"): toy["harmless"].tolist(),
        ("safety pairs", "sensitive"): sp["sensitive"].tolist(),
        ("safety pairs", "control"): sp["control"].tolist(),
    }


def summarise(per_prompt: pd.DataFrame) -> pd.DataFrame:
    """One row per ``(set, kind)``: ``n, refused, refusal_rate, disclaimer_only`` (refusals that only a
    :data:`DISCLAIMER_PHRASES` phrase flagged), ``logit_metric_mean, logit_metric_std``."""
    df = per_prompt.assign(disclaimer_only=per_prompt.refused & per_prompt.phrases.fillna("").map(
        lambda s: bool(s) and all(p in DISCLAIMER_PHRASES for p in s.split("|"))))
    return (df.groupby(["set", "kind"], sort=False)
            .agg(n=("refused", "size"), refused=("refused", "sum"), refusal_rate=("refused", "mean"),
                 disclaimer_only=("disclaimer_only", "sum"), logit_metric_mean=("logit_metric", "mean"),
                 logit_metric_std=("logit_metric", "std"))
            .reset_index())


def refusal_table(model, max_new_tokens: int = 32, store: ResultsStore | None = None, progress: bool = True,
                  sets: dict[tuple[str, str], list[str]] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(summary, per_prompt)`` for ``model`` on every set of :data:`SETS` (or ``sets``).

    ``per_prompt``: ``set, kind, instruction, completion, refused, phrases`` (the substrings that flagged
    it, ``|``-joined), ``logit_metric, log_odds``. With ``store`` the generations of each set are saved
    batch by batch and a rerun resumes."""
    sets = eval_prompts() if sets is None else sets
    if not sets or not any(sets.values()):
        raise ValueError("refusal_table needs at least one non-empty prompt set.")
    frames = []
    for (set_name, kind), prompts in sets.items():
        if not prompts:
            continue
        ckpt = None if store is None else store.checkpoint(
            "refusal_table", {"set": set_name, "kind": kind, "max_new_tokens": max_new_tokens,
                              "data": data_hash(pd.DataFrame({"p": prompts}))})
        scores = refusal_scores(model, prompts, max_new_tokens=max_new_tokens, progress=progress, checkpoint=ckpt)
        metr = refusal_metrics(model, prompts)
        scores["phrases"] = ["|".join(refusal_phrases(c)) for c in scores.completion]
        scores["logit_metric"] = metr["logit_metric"].values
        scores["log_odds"] = metr["log_odds"].values
        scores.insert(0, "kind", kind)
        scores.insert(0, "set", set_name)
        frames.append(scores)
    per_prompt = pd.concat(frames, ignore_index=True)
    return summarise(per_prompt), per_prompt


def write_refusal_table(model, out: Path, max_new_tokens: int = 32, store: ResultsStore | None = None,
                        progress: bool = True) -> pd.DataFrame:
    """Compute :func:`refusal_table` and write ``out/summary.csv``, ``out/per_prompt.csv`` and
    ``out/manifest.json`` (model, source, fingerprint, token budget, data hash, seconds). Returns the summary."""
    t0 = time.time()
    sets = eval_prompts()
    summary, per_prompt = refusal_table(model, max_new_tokens, store, progress, sets)
    out = Path(out)
    atomic_write(out / "per_prompt.csv", lambda tmp: per_prompt.to_csv(tmp, index=False))
    atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    manifest = {"model": model.name, "source": model.meta.get("source", ""),
                "fingerprint": model.meta.get("fingerprint", ""), "dtype": model.meta.get("dtype", ""),
                "max_new_tokens": max_new_tokens, "greedy": True, "score": "substring (metrics.REFUSAL_SUBSTRINGS)",
                "disclaimer_phrases": list(DISCLAIMER_PHRASES),
                "data": data_hash(*(pd.DataFrame({"p": v}) for v in sets.values())),
                "seconds": round(time.time() - t0, 1), "packages": package_versions()}
    atomic_write(out / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
    return summary


def refusal_report(folders: list[Path]) -> str:
    """A markdown table of saved refusal tables, one column per model: ``refused/n (rate)`` per set, and
    the refusals that only a disclaimer flagged in brackets where there are any."""
    cols, rows = [], {}
    for folder in folders:
        folder = Path(folder)
        summary = pd.read_csv(folder / "summary.csv")
        name = json.loads((folder / "manifest.json").read_text())["model"]
        cols.append(name)
        for r in summary.itertuples():
            cell = f"{int(r.refused)}/{int(r.n)} ({r.refusal_rate:.0%})"
            if int(r.disclaimer_only):
                cell += f" [{int(r.disclaimer_only)} disclaimer only]"
            rows.setdefault(f"{r.set}: {r.kind}", {})[name] = cell
    lines = ["| set | " + " | ".join(f"`{c}`" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, cells in rows.items():
        lines.append(f"| {label} | " + " | ".join(cells.get(c, "—") for c in cols) + " |")
    return "\n".join(lines)
