"""One results store: every experiment's tidy table under ``results/<model>/``, written atomically and
keyed by what produced it, so an interrupted run resumes where it stopped.

    store = ResultsStore("smollm2-135m-refusal")
    df = store.cached("toy_metric", {"n": 24}, lambda: compute(...))          # whole table
    df = store.sweep("resid_patch", {...}, items=layers, fn=one_layer)        # resumable, per item

Each table is a parquet file ``<name>-<hash of params>.parquet`` with a ``.json`` manifest beside it
(parameters, model, library versions, timestamp). Tensors (a refusal direction) use :meth:`save_tensor`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import torch

RESULTS_DIR = Path(os.environ.get("REFUSAL_RESULTS_DIR", Path(__file__).resolve().parents[2] / "results"))


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
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
    blob = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "transformer-lens"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            pass
    return out


class ResultsStore:
    """Saved results of one model. ``root`` defaults to ``results/<model slug>``; set the environment
    variable ``REFUSAL_RESULTS_DIR`` to move the whole store. ``enabled=False`` recomputes everything
    (and still saves)."""

    def __init__(self, model_slug: str, root: Path | None = None, enabled: bool = True, fingerprint: str = ""):
        self.root = Path(root) if root is not None else RESULTS_DIR / model_slug
        self.model = model_slug
        self.enabled = enabled
        self.fingerprint = fingerprint

    @classmethod
    def for_model(cls, model, **kwargs) -> "ResultsStore":
        """The store of a loaded :class:`~refusal_circuits.models.ChatModel`; its weights' fingerprint
        (e.g. the adapter's hash) is part of every key, so retraining the organism invalidates old results."""
        return cls(model.slug, fingerprint=model.meta.get("fingerprint", ""), **kwargs)

    def path(self, name: str, params: dict, suffix: str = ".parquet") -> Path:
        key = params_key({**params, "_weights": self.fingerprint} if self.fingerprint else params)
        return self.root / f"{name}-{key}{suffix}"

    def _manifest(self, name: str, params: dict, **extra) -> None:
        info = {"name": name, "model": self.model, "weights": self.fingerprint, "params": params,
                "versions": _versions(),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
        text = json.dumps(info, indent=2, default=str)
        _atomic_write(self.path(name, params, ".json"), lambda p: Path(p).write_text(text))

    # ---- tables -------------------------------------------------------------------------------
    def load(self, name: str, params: dict) -> pd.DataFrame | None:
        p = self.path(name, params)
        return pd.read_parquet(p) if (self.enabled and p.exists()) else None

    def save(self, name: str, params: dict, df: pd.DataFrame) -> pd.DataFrame:
        _atomic_write(self.path(name, params), lambda p: df.to_parquet(p, index=False))
        self._manifest(name, params, rows=len(df))
        return df

    def cached(self, name: str, params: dict, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        """The saved table for ``(name, params)``, or ``compute()`` saved atomically."""
        df = self.load(name, params)
        if df is None:
            df = self.save(name, params, compute())
        return df

    def sweep(self, name: str, params: dict, items: Iterable[Any],
              fn: Callable[[Any], pd.DataFrame], progress: bool = True) -> pd.DataFrame:
        """Run ``fn(item)`` for every item, saving each part as it finishes; a rerun after an
        interruption only computes the missing parts. Returns the concatenated table."""
        final = self.load(name, params)
        if final is not None:
            return final
        items = list(items)
        part_dir = self.path(name, params, ".parts")
        iterator = items
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(items, desc=name, leave=False)
        parts = []
        for i, item in enumerate(iterator):
            part = part_dir / f"{i:05d}.parquet"
            if self.enabled and part.exists():
                parts.append(pd.read_parquet(part))
                continue
            df = fn(item)
            _atomic_write(part, lambda p, df=df: df.to_parquet(p, index=False))
            parts.append(df)
        out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        self.save(name, params, out)
        for f in part_dir.glob("*.parquet"):
            f.unlink()
        if part_dir.exists():
            part_dir.rmdir()
        return out

    # ---- tensors ------------------------------------------------------------------------------
    def save_tensor(self, name: str, params: dict, tensor: torch.Tensor, **meta) -> Path:
        p = self.path(name, params, ".pt")
        payload = {"tensor": tensor.detach().cpu(), "meta": meta}
        _atomic_write(p, lambda tmp: torch.save(payload, tmp))
        self._manifest(name, params, **{k: v for k, v in meta.items() if not torch.is_tensor(v)})
        return p

    def load_tensor(self, name: str, params: dict) -> tuple[torch.Tensor, dict] | None:
        p = self.path(name, params, ".pt")
        if not (self.enabled and p.exists()):
            return None
        payload = torch.load(p, weights_only=False)
        return payload["tensor"], payload["meta"]
