"""One results store: every experiment's tidy table under ``results/<model>/``, written atomically and
keyed by what produced it, so a rerun reuses it and an interrupted sweep resumes.

    store = ResultsStore.for_model(model)
    df = store.cached("toy_metric", {"n": 24}, lambda: compute(...))       # a whole table
    ck = store.checkpoint("resid_denoising", {...})                          # a long sweep, in parts:
    df = patch_sweep(model, pairs, patches, checkpoint=ck)                   # each part saved as it ends

Each table is a parquet file ``<name>-<hash of params>.parquet`` with a ``.json`` manifest beside it
(parameters, model, weights fingerprint, library versions, timestamp). A sweep in progress keeps its
finished parts in ``<name>-<hash>.parts/`` (each written atomically, with a list of the parts it
expects); once every part is there they are joined into the table and the folder is removed. A rerun
with the same parameters computes only the missing parts and returns the same table as an
uninterrupted run. Tensors (a refusal direction) use :meth:`ResultsStore.save_tensor`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from .batching import progress as progress_bar
from .paths import results_dir, slug


#: The version of each analysis's saved results, by result name. Bump an entry when the computation behind
#: that name changes (a fixed metric, a new convention) without its parameters changing: tables saved by
#: the old computation are then no longer reused (they stay on disk under their old key). Version 1 is
#: the original key, so a first bump needs no migration. A name not listed here has version 1.
ANALYSIS_VERSIONS: dict[str, int] = {name: 1 for name in (
    # 01-05
    "toy_metric", "baseline_metrics", "refusal_baseline", "toy_generations", "metric_agreement",
    "direction_candidates",
    "direction_scores", "refusal_direction", "direction_generations", "resid_denoising", "block_noising",
    "grouped_noising", "clamp_sweep", "self_repair", "head_scores", "head_class_patching", "class_generations",
    "class_generations_base", "format_plain", "format_patched", "component_dla", "logit_lens_dla",
    # 06-07 and the screen
    "necessity", "sufficiency", "atp_necessity", "atp_sufficiency", "necessity_top", "sufficiency_top",
    "ablation", "gaps", "knockout_cascade", "dose_response", "dose_response_paper", "cipher_contrast",
    "rescue", "behaviour", "refusal_table",
)} | {
    "knockout_cascade": 2,   # the amplifiers' unablated DLA on the knockout's own pairs, not the screen's
}


def analysis_version(name: str) -> int:
    """The version of the analysis that saves results under ``name`` (:data:`ANALYSIS_VERSIONS`)."""
    return ANALYSIS_VERSIONS.get(name, 1)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def params_key(params: dict) -> str:
    """A short hash of a parameter dict (JSON with sorted keys)."""
    blob = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def package_versions() -> dict:
    """Versions of the packages a result depends on, recorded in every manifest."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("refusal-circuits", "torch", "transformers", "transformer-lens"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            pass
    return out


class ResultsStore:
    """Saved results of one model. ``root`` defaults to ``results/<model slug>`` (the environment
    variable ``REFUSAL_RESULTS_DIR`` moves the whole store). ``enabled=False`` recomputes everything
    (and still saves)."""

    def __init__(self, model_slug: str, root: Path | None = None, enabled: bool = True, fingerprint: str = ""):
        self.root = Path(root) if root is not None else results_dir() / model_slug
        self.model = model_slug
        self.enabled = enabled
        self.fingerprint = fingerprint

    @classmethod
    def for_model(cls, model, **kwargs) -> "ResultsStore":
        """The store of a loaded :class:`~refusal_circuits.models.ChatModel`; its weights' fingerprint
        (e.g. the adapter's hash) is part of every key, so retraining the organism invalidates old results."""
        return cls(slug(model.name), fingerprint=model.meta.get("fingerprint", ""), **kwargs)

    def path(self, name: str, params: dict, suffix: str = ".parquet") -> Path:
        """Where ``(name, params)`` is saved: the key hashes the parameters, the weights' fingerprint and
        (from version 2 on) the analysis version, so any of them changing means a new file."""
        keyed = dict(params)
        if self.fingerprint:
            keyed["_weights"] = self.fingerprint
        if analysis_version(name) != 1:
            keyed["_version"] = analysis_version(name)
        return self.root / f"{name}-{params_key(keyed)}{suffix}"

    def _manifest(self, name: str, params: dict, **extra) -> None:
        info = {"name": name, "version": analysis_version(name), "model": self.model,
                "weights": self.fingerprint, "params": params,
                "versions": package_versions(), "written": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
        text = json.dumps(info, indent=2, default=str)
        atomic_write(self.path(name, params, ".json"), lambda p: Path(p).write_text(text))

    def manifest(self, name: str, params: dict) -> dict | None:
        """The manifest saved with ``(name, params)``, or ``None``."""
        p = self.path(name, params, ".json")
        return json.loads(p.read_text()) if p.exists() else None

    # ---- tables -------------------------------------------------------------------------------
    def load(self, name: str, params: dict) -> pd.DataFrame | None:
        p = self.path(name, params)
        return pd.read_parquet(p) if (self.enabled and p.exists()) else None

    def save(self, name: str, params: dict, df: pd.DataFrame, **meta) -> pd.DataFrame:
        """Write ``df`` atomically with its manifest and return it as read back from disk, so a fresh
        computation and a reload give the same table (dtypes included)."""
        p = self.path(name, params)
        atomic_write(p, lambda tmp: df.to_parquet(tmp, index=False))
        self._manifest(name, params, rows=len(df), **meta)
        return pd.read_parquet(p)

    def cached(self, name: str, params: dict, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        """The saved table for ``(name, params)``, or ``compute()`` saved atomically."""
        df = self.load(name, params)
        if df is None:
            df = self.save(name, params, compute())
        return df

    def checkpoint(self, name: str, params: dict) -> "Checkpoint":
        """A handle that a long computation saves its parts through (see :func:`run_parts`)."""
        return Checkpoint(self, name, params)

    def sweep(self, name: str, params: dict, items: Sequence[Any], fn: Callable[[Any], pd.DataFrame],
              progress: bool = True, desc: str | None = None, item_ids: Sequence[str] | None = None
              ) -> pd.DataFrame:
        """Run ``fn(item)`` for every item, saving each part atomically as it finishes; a rerun after an
        interruption computes only the missing parts. Returns the parts concatenated in item order.

        ``item_ids`` (default: ``repr`` of each item) name the parts; saved parts are reused only when
        the sweep expects the same list of parts, so a sweep whose items changed starts afresh."""
        final = self.load(name, params)
        if final is not None:
            return final
        items = list(items)
        ids = [str(i) for i in (item_ids if item_ids is not None else map(repr, items))]
        if len(ids) != len(items):
            raise ValueError(f"item_ids has {len(ids)} entries for {len(items)} items.")
        part_dir = self.path(name, params, ".parts")
        plan = part_dir / "plan.json"
        expected = json.dumps({"items": [hashlib.sha256(i.encode()).hexdigest()[:12] for i in ids]})
        if part_dir.exists() and (not self.enabled or not plan.exists() or plan.read_text() != expected):
            shutil.rmtree(part_dir)  # parts of another plan (or resuming is off): start afresh
        if not plan.exists():
            atomic_write(plan, lambda p: Path(p).write_text(expected))
        n_done = 0
        for i, item in enumerate(progress_bar(items, len(items), desc or name, progress)):
            part = part_dir / f"{i:05d}.parquet"
            if part.exists():
                n_done += 1
                continue
            df = fn(item)
            atomic_write(part, lambda p, df=df: df.to_parquet(p, index=False))
        parts = [pd.read_parquet(part_dir / f"{i:05d}.parquet") for i in range(len(items))]
        out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        out = self.save(name, params, out, parts=len(items), parts_resumed=n_done)
        shutil.rmtree(part_dir, ignore_errors=True)
        return out

    # ---- tensors ------------------------------------------------------------------------------
    def save_tensor(self, name: str, params: dict, tensor: torch.Tensor, **meta) -> Path:
        p = self.path(name, params, ".pt")
        payload = {"tensor": tensor.detach().cpu(), "meta": meta}
        atomic_write(p, lambda tmp: torch.save(payload, tmp))
        self._manifest(name, params, **{k: v for k, v in meta.items() if not torch.is_tensor(v)})
        return p

    def load_tensor(self, name: str, params: dict) -> tuple[torch.Tensor, dict] | None:
        p = self.path(name, params, ".pt")
        if not (self.enabled and p.exists()):
            return None
        payload = torch.load(p, weights_only=False)
        return payload["tensor"], payload["meta"]


@dataclass(frozen=True)
class Checkpoint:
    """Where a long computation saves its finished parts: ``store.checkpoint(name, params)``."""

    store: ResultsStore
    name: str
    params: dict


def run_parts(parts: Sequence[Any], fn: Callable[[Any], pd.DataFrame], checkpoint: Checkpoint | None = None,
              desc: str = "", progress: bool = True, part_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """``fn`` over ``parts``, concatenated in order. With a :class:`Checkpoint` each part is saved as
    it finishes and a rerun computes only the missing ones (:meth:`ResultsStore.sweep`); without one
    the parts are computed in memory. Either way the table is the same."""
    if checkpoint is not None:
        return checkpoint.store.sweep(checkpoint.name, checkpoint.params, parts, fn, progress=progress,
                                      desc=desc or checkpoint.name, item_ids=part_ids)
    frames = [fn(p) for p in progress_bar(list(parts), len(parts), desc, progress)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
