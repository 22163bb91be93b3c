"""The first code cell of every notebook: one call that seeds, loads the model and opens its results store."""

from __future__ import annotations

import warnings

import pandas as pd
import torch

from .models import ChatModel, load_model, set_threads
from .results import ResultsStore


def open_notebook(model: str, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                  quiet: bool = False) -> tuple[ChatModel, ResultsStore]:
    """Seed torch, quiet library warnings, load ``model`` and open its results store; print one line
    describing the model (layers, heads, width, the refusal tokens derived from its tokenizer)."""
    warnings.filterwarnings("ignore")
    set_threads()  # $REFUSAL_THREADS, else the cores this process may use
    torch.manual_seed(seed)
    pd.set_option("display.max_colwidth", 90)
    loaded = load_model(model, device=device, dtype=dtype)
    store = ResultsStore.for_model(loaded)
    if not quiet:
        print(f"{loaded.name}: {loaded.n_layers} layers, {loaded.n_heads} heads, d_model {loaded.d_model}; "
              f"refusal tokens {[loaded.tokenizer.decode([t]) for t in loaded.refusal_token_ids]}")
    return loaded, store
