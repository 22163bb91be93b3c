"""The project's datasets (``data/``) and the token-aligned pair loader.

* :func:`load_instructions` -- harmful / harmless instruction sets with fixed train/val/test splits.
* :func:`load_toy_pairs` -- harmful/harmless pairs that differ in one word (the seed write-up's toy set).
* :func:`load_safety_pairs` -- sensitive/control pairs in the style of the gate-amplifier paper.
* :func:`align_pairs` -- tokenises pairs with the model's chat template, checks that the two halves
  differ at exactly one token, and returns the subject and last positions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import pandas as pd
import torch

from .models import ChatModel
from .paths import DATA_DIR
SPLITS = ("train", "val", "test")


class PairAlignmentError(ValueError):
    """Pairs that do not align token for token under a model's tokenizer."""


def read_table(path: str | Path, what: str = "CSV file", columns: Sequence[str] = (),
               hint: str = "") -> pd.DataFrame:
    """Read a user's CSV (all cells as written, no NaN for empty cells). Every way it can be unusable
    raises one readable error naming the file: ``FileNotFoundError`` when it is missing, ``ValueError``
    when it is not UTF-8 text, not a CSV, empty, or lacks one of ``columns`` (``hint`` says the fix)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a CSV file.")
    try:
        df = pd.read_csv(path, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                         f"{err.start}); save it as a UTF-8 CSV.") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{what} {path} is empty.") from None
    except pd.errors.ParserError as err:
        raise ValueError(f"{what} {path} is not a readable CSV ({str(err).strip().splitlines()[-1]}).") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} {path} has no column(s) {missing}; its columns are {list(df.columns)}."
                         + (f" {hint}" if hint else ""))
    if len(df) == 0:
        raise ValueError(f"{what} {path} has no rows.")
    return df


def _dataset(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"Dataset {path} is missing; it ships with the repository (git checkout).")
    return read_table(path, "dataset", columns)


def load_instructions(kind: Literal["harmful", "harmless"], split: str | None = None,
                      n: int | None = None, data_dir: Path = DATA_DIR) -> pd.DataFrame:
    """Instructions of one set (``instruction, category, split``), optionally one split and the first
    ``n`` rows of it (the order in the file is a fixed seeded shuffle)."""
    if kind not in ("harmful", "harmless"):
        raise ValueError(f"kind must be 'harmful' or 'harmless', got {kind!r}.")
    df = _dataset(Path(data_dir) / f"{kind}.csv", ["instruction", "category", "split"])
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        df = df[df["split"] == split]
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        df = df.head(n)
    return df.reset_index(drop=True)


def load_toy_pairs(data_dir: Path = DATA_DIR) -> pd.DataFrame:
    """Toy pairs: ``pair_id, harmful, harmless, category``."""
    return _dataset(Path(data_dir) / "toy_pairs.csv", ["pair_id", "harmful", "harmless", "category"])


def load_safety_pairs(data_dir: Path = DATA_DIR) -> pd.DataFrame:
    """Gate-amplifier style matched pairs: ``pair_id, sensitive, control, category``."""
    return _dataset(Path(data_dir) / "safety_pairs.csv", ["pair_id", "sensitive", "control", "category"])


def data_hash(*frames: pd.DataFrame) -> str:
    """A short content hash of some tables, recorded with every saved artifact."""
    h = hashlib.sha256()
    for f in frames:
        h.update(pd.util.hash_pandas_object(f, index=False).values.tobytes())
    return h.hexdigest()[:12]


@dataclass
class AlignedPairs:
    """Pairs of prompts of equal token length that differ at exactly one position.

    Attributes:
        pairs: the rows that aligned, with extra columns ``n_tokens``, ``subject_pos`` (index of the
            differing token, counted from the start) and ``subject_from_end`` (the same, counted from
            the end, negative).
        dropped: the rows that did not align, with the reason.
        tokens_a / tokens_b: one ``[pos]`` tensor of ids per aligned pair (``a`` = harmful/sensitive).
    """

    pairs: pd.DataFrame
    dropped: pd.DataFrame
    tokens_a: list[torch.Tensor]
    tokens_b: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, n: int | None) -> "AlignedPairs":
        """``n`` pairs spread evenly over the table (all of them when ``n`` is None or too large)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        idx = [round(i * (len(self) - 1) / max(n - 1, 1)) for i in range(n)] if n > 1 else [0]
        return AlignedPairs(self.pairs.iloc[idx].reset_index(drop=True), self.dropped,
                            [self.tokens_a[i] for i in idx], [self.tokens_b[i] for i in idx])

    def length_groups(self) -> dict[int, list[int]]:
        """Indices of aligned pairs grouped by token length: each group stacks into one batch
        without padding."""
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(self.pairs["n_tokens"]):
            groups.setdefault(int(n), []).append(i)
        return groups

    def batch(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens_a, tokens_b)`` each ``[len(idx), pos]`` for pairs of one length group."""
        lengths = {len(self.tokens_a[i]) for i in idx}
        if len(lengths) != 1:
            raise ValueError("batch() needs pairs of one token length; use length_groups().")
        return (torch.stack([self.tokens_a[i] for i in idx]),
                torch.stack([self.tokens_b[i] for i in idx]))


def align_pairs(model: ChatModel, pairs: pd.DataFrame, col_a: str = "harmful", col_b: str = "harmless",
                on_misaligned: Literal["drop", "raise"] = "drop", name_col: str = "pair_id",
                require_single_diff: bool = True) -> AlignedPairs:
    """Tokenise both halves of every pair with the model's chat template and check the alignment.

    A pair aligns when both halves have the same number of tokens and (``require_single_diff``) differ
    at exactly one position, the *subject*. Pairs that do not align are listed by name with both token
    counts; ``on_misaligned="raise"`` turns that list into a :class:`PairAlignmentError`.
    """
    if len(pairs) == 0:
        raise ValueError("No pairs given: the pair table is empty.")
    if on_misaligned not in ("drop", "raise"):
        raise ValueError(f"on_misaligned must be 'drop' or 'raise', got {on_misaligned!r}.")
    tok = model.tokenizer
    keep, dropped, ta, tb = [], [], [], []
    for _, row in pairs.iterrows():
        ids_a = tok(model.format_prompt(row[col_a]), add_special_tokens=False)["input_ids"]
        ids_b = tok(model.format_prompt(row[col_b]), add_special_tokens=False)["input_ids"]
        name = row.get(name_col, row.name)
        if len(ids_a) != len(ids_b):
            dropped.append({name_col: name, "reason": f"token counts differ: {len(ids_a)} vs {len(ids_b)}",
                            "n_tokens_a": len(ids_a), "n_tokens_b": len(ids_b)})
            continue
        diff = [i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y]
        if require_single_diff and len(diff) != 1:
            dropped.append({name_col: name, "reason": f"{len(diff)} positions differ (need exactly 1)",
                            "n_tokens_a": len(ids_a), "n_tokens_b": len(ids_b)})
            continue
        rec = row.to_dict()
        rec.update(n_tokens=len(ids_a), subject_pos=diff[0] if diff else -1,
                   subject_from_end=(diff[0] - len(ids_a)) if diff else 0,
                   subject_a=tok.decode([ids_a[diff[0]]]) if diff else "",
                   subject_b=tok.decode([ids_b[diff[0]]]) if diff else "")
        keep.append(rec)
        ta.append(torch.tensor(ids_a))
        tb.append(torch.tensor(ids_b))
    dropped_df = pd.DataFrame(dropped, columns=[name_col, "reason", "n_tokens_a", "n_tokens_b"])
    if len(dropped_df) and on_misaligned == "raise":
        lines = "\n".join(f"  {r[name_col]}: {r['reason']}" for _, r in dropped_df.iterrows())
        raise PairAlignmentError(
            f"{len(dropped_df)} of {len(pairs)} pairs do not align token for token for {model.name}:\n"
            f"{lines}\nPass on_misaligned='drop' to analyse the others, or reword these pairs.")
    if not keep:
        raise PairAlignmentError(
            f"None of the {len(pairs)} pairs aligns token for token for {model.name}; "
            f"first problem: {dropped[0]['reason'] if dropped else '?'}.")
    device = model.device
    return AlignedPairs(pd.DataFrame(keep).reset_index(drop=True), dropped_df,
                        [t.to(device) for t in ta], [t.to(device) for t in tb])


def datasets_overview(data_dir: Path = DATA_DIR) -> pd.DataFrame:
    """Row counts of every dataset by split (instruction sets) or category (pair sets)."""
    rows = []
    for kind in ("harmful", "harmless"):
        df = load_instructions(kind, data_dir=data_dir)
        for split, n in df["split"].value_counts().reindex(SPLITS).items():
            rows.append({"dataset": f"{kind}.csv", "part": split, "rows": int(n),
                         "categories": df.loc[df.split == split, "category"].nunique()})
    for fname, loader in (("toy_pairs.csv", load_toy_pairs), ("safety_pairs.csv", load_safety_pairs)):
        df = loader(data_dir)
        rows.append({"dataset": fname, "part": "pairs", "rows": len(df), "categories": df["category"].nunique()})
    return pd.DataFrame(rows)
