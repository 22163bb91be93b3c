"""The original authors' numbers, as data: ``data/reference_numbers.csv``.

One row per reported quantity: ``paper`` (``writeup`` = "Analysing the Refusal Circuit in Gemma 2b
IT", ``arditi`` = Arditi et al. 2024, ``routes`` = "How Alignment Routes", arXiv 2604.04385),
``experiment`` (the notebook section that reproduces it), ``quantity``, ``model`` (theirs), ``value``
(a number, or a short statement for qualitative findings) and ``source`` (where they report it;
``docs/methods.md`` describes each experiment).

Notebooks print our numbers beside theirs with :func:`show`; the printed reference values come from
the table, never from a string in a notebook.
"""

from __future__ import annotations

from functools import lru_cache
from numbers import Integral, Real
from pathlib import Path

import pandas as pd

from .paths import REFERENCE_TABLE

COLUMNS = ("paper", "experiment", "quantity", "model", "value", "source")


@lru_cache(maxsize=4)
def _read(path: str, mtime: float) -> pd.DataFrame:
    df = pd.read_csv(path, keep_default_na=False, dtype=str)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it needs {list(COLUMNS)}.")
    dup = df.duplicated(["experiment", "quantity", "model"], keep=False)
    if dup.any():
        raise ValueError(f"{path} lists a quantity twice: {df[dup][['experiment', 'quantity', 'model']].values.tolist()}")
    return df


def reference_table(path: Path = REFERENCE_TABLE) -> pd.DataFrame:
    """The whole table (values as text: numbers and findings alike)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"The reference table {path} is missing; it ships with the repository.")
    return _read(str(path), path.stat().st_mtime).copy()


def lookup(experiment: str, model: str | None = None, path: Path = REFERENCE_TABLE) -> pd.DataFrame:
    """The reference rows of one experiment (of one of their models, if given)."""
    df = reference_table(path)
    rows = df[df.experiment == experiment]
    if rows.empty:
        raise ValueError(f"No reference numbers for experiment {experiment!r}; the table has: "
                         f"{sorted(df.experiment.unique())}.")
    if model is not None:
        rows = rows[rows.model == model]
        if rows.empty:
            raise ValueError(f"No reference numbers for {experiment!r} on {model!r}.")
    return rows.reset_index(drop=True)


def value(experiment: str, quantity: str, model: str | None = None, path: Path = REFERENCE_TABLE):
    """One reference value, as a float when it is a number (else the text)."""
    rows = lookup(experiment, model, path)
    rows = rows[rows.quantity == quantity]
    if len(rows) != 1:
        raise ValueError(f"Reference table: {experiment!r} / {quantity!r} matches {len(rows)} rows"
                         + ("" if model else "; pass model=") + ".")
    return _as_number(rows.value.iloc[0])


def _as_number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def fmt(v) -> str:
    """How our values are printed: 2 decimals (3 below 0.1), integers and text as they are."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, Integral):
        return str(int(v))
    if isinstance(v, Real):
        v = float(v)
        if v != v:
            return "nan"
        return f"{v:.3f}" if 0 < abs(v) < 0.1 else f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v) if v else "none"
    return str(v)


def beside(experiment: str, ours: dict, model: str | None = None, path: Path = REFERENCE_TABLE
           ) -> pd.DataFrame:
    """Our values next to the reference ones: one row per reference quantity of ``experiment`` (for
    their ``model``; default: the first model the table lists for it), columns ``quantity, ours,
    reference, source``. Every key of ``ours`` must be a quantity of the table, so a notebook and the
    table cannot drift apart; quantities we do not measure show ``—``."""
    rows = lookup(experiment, None, path)
    model = model or rows.model.iloc[0]
    rows = rows[rows.model == model]
    unknown = sorted(set(ours) - set(rows.quantity))
    if unknown:
        raise ValueError(f"Reference table has no {unknown} for {experiment!r} on {model!r}; it has "
                         f"{list(rows.quantity)}.")
    return pd.DataFrame({"quantity": rows.quantity.values,
                         "ours": [fmt(ours.get(q)) for q in rows.quantity],
                         "reference": rows.value.values, "source": rows.source.values})


def show(experiment: str, ours: dict, our_model: str, model: str | None = None) -> None:
    """Print :func:`beside` under a one-line header naming both models (it returns nothing, so a
    notebook cell shows only the printed lines; :func:`beside` gives the table)."""
    table = beside(experiment, ours, model)
    ref_model = model or lookup(experiment).model.iloc[0]
    print(f"{experiment} — ours: {our_model} · reference: {ref_model}")
    width = max(len(q) for q in table.quantity)
    w_ours = max(4, max(len(o) for o in table.ours))
    for q, o, r, s in table.itertuples(index=False):
        print(f"  {q:<{width}}  {o:<{w_ours}}  | {r}   [{s}]")


# ------------------------------------------------------------------------------------------------
# Conclusions: claim by claim, each a stated test that can fail
# ------------------------------------------------------------------------------------------------

HOLDS, FAILS, UNTESTABLE, INCONCLUSIVE = "holds", "does not hold", "not testable here", "inconclusive"


class Conclusion:
    """The claims a notebook tests, printed as its conclusion.

    ``add(claim, ours, criterion, ok)`` records one claim: ``ours`` is our number (with the reference
    beside it, from the table), ``criterion`` the test stated before the number, ``ok`` its outcome.
    ``precondition=(holds, why)`` turns the verdict into "not testable here (why)" when the claim cannot
    be asked of this model (``ok`` is then not consulted, so it may be None). ``ok="inconclusive"`` is a
    testable claim whose data decide neither way (an interval that straddles the criterion's threshold).

    ``requires=(holds, why)`` is the notebook's precondition, shared by every claim: the write-ups'
    claims are about how a model refuses, so on a model that does not refuse (a random-weight tiny
    model, an untuned base model) each is "not testable here" (``stages.baseline(...).precondition``)."""

    def __init__(self, requires: tuple[bool, str] = (True, "")):
        self.requires = (bool(requires[0]), str(requires[1]))
        self.rows: list[dict] = []

    def add(self, claim: str, ours: str, criterion: str, ok: bool | str | None,
            precondition: tuple[bool, str] = (True, "")) -> str:
        testable, why = precondition
        if not self.requires[0]:  # the reason is printed once, above the claims
            testable, why = False, "the notebook's precondition above fails"
        if not testable:
            verdict = f"{UNTESTABLE} ({why})" if why else UNTESTABLE
        elif ok is None:
            raise ValueError(f"claim {claim!r} is testable but has no outcome: pass ok=True/False or a failing precondition.")
        elif isinstance(ok, str):
            if ok != INCONCLUSIVE:
                raise ValueError(f"claim {claim!r}: ok must be True, False or {INCONCLUSIVE!r}, got {ok!r}.")
            verdict = INCONCLUSIVE
        else:
            verdict = HOLDS if bool(ok) else FAILS
        self.rows.append({"claim": claim, "ours": ours, "criterion": criterion, "verdict": verdict})
        return verdict

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["claim", "ours", "criterion", "verdict"])

    def show(self) -> None:
        """Print one line per claim: the claim, our number, the criterion, the verdict."""
        if not self.requires[0]:
            print(f"Every claim below is about how a model refuses; none is testable here: {self.requires[1]}.")
        for r in self.rows:
            print(f"- {r['claim']}: {r['ours']}. Criterion: {r['criterion']}. → {r['verdict']}")
