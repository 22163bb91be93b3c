"""Execute the numbered notebooks with papermill (``make figures``).

Each notebook is a pair: ``notebooks/NN_name.py`` (the source, jupytext percent format) and
``NN_name.ipynb`` (the executed write-up). The runner builds the notebook from the ``.py`` source and
executes that, so the committed ``.ipynb`` is only ever written by executing its source;
:func:`source_mismatches` is the check ``make test`` runs on every pair.

On the default model the committed notebooks are refreshed in place (their outputs are the write-up a
reader sees); with another model, executed copies go to ``figures/<model>/notebooks/`` and the committed
notebooks are left alone. Per-notebook wall times are printed and saved to ``figures/<model>/timings.csv``.

Before papermill starts, the model is checked (:func:`refusal_circuits.models.check_model`): a model
that is not here, or a device this torch does not have, ends the run with one line and exit status 2.
Every notebook executes into ``build/notebooks/<model>/`` first and replaces its target only when it ran
to the end; a notebook that fails leaves the target as it was and the run prints the notebook, the cell,
the error's last line and where the partial notebook is (exit status 1). Progress bars are off in the
executed notebooks (``REFUSAL_PROGRESS=0``), so no bar text is stored in their outputs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from .models import DEFAULT_MODEL, ModelLoadError, check_model
from .paths import NOTEBOOK_DIR, REPO_ROOT, figures_dir, slug


KERNELSPEC = {"display_name": "Python 3 (refusal-circuits)", "language": "python", "name": "python3"}


def notebooks(only: str | None = None) -> list[Path]:
    """The executed notebooks (``.ipynb``) whose ``.py`` sources exist, in order."""
    found = [p.with_suffix(".ipynb") for p in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))]
    if only:
        found = [p for p in found if p.name.startswith(only) or p.stem == only]
        if not found:
            raise SystemExit(f"error: no notebook matches {only!r} in {NOTEBOOK_DIR}.")
    return found


def source_notebook(source: Path):
    """The unexecuted notebook built from a ``.py`` source (jupytext percent format)."""
    import jupytext

    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def _cell_key(cell) -> tuple[str, str, tuple[str, ...]]:
    return cell.cell_type, cell.source.strip("\n"), tuple(cell.metadata.get("tags", []))


def source_mismatches(notebook: Path, source: Path | None = None) -> list[str]:
    """Where the executed ``notebook`` and its ``.py`` source (default: beside it) disagree (kind, text
    or tags of a cell); papermill's injected-parameters cell is skipped. Empty when they agree."""
    import nbformat

    source = source or notebook.with_suffix(".py")
    if not source.exists():
        return [f"{notebook.name}: no source {source.name}"]
    if not notebook.exists():
        return [f"{notebook.name}: not executed yet (make figures NOTEBOOK={notebook.name[:2]})"]
    src = [_cell_key(c) for c in source_notebook(source).cells]
    ran = [_cell_key(c) for c in nbformat.read(notebook, as_version=4).cells
           if "injected-parameters" not in c.metadata.get("tags", [])]
    problems = []
    if len(src) != len(ran):
        problems.append(f"{notebook.name}: {len(ran)} cells, its source has {len(src)}")
    for i, (a, b) in enumerate(zip(src, ran)):
        if a != b:
            what = "kind" if a[0] != b[0] else "tags" if a[2] != b[2] else "text"
            first = next((ln for ln in a[1].splitlines() if ln.strip()), "")[:60]
            problems.append(f"{notebook.name}: cell {i} ({first!r}) differs from its source in {what}")
    return problems


def _last_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--only", default=None, help="run only the notebook whose name starts with this")
    args = ap.parse_args(argv)

    nbs = notebooks(args.only)
    try:
        what = check_model(args.model, args.device, args.dtype)
    except (ModelLoadError, ValueError) as err:
        print("error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip()),
              file=sys.stderr)
        return 2

    import nbformat
    import pandas as pd
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    os.environ["REFUSAL_PROGRESS"] = "0"  # the kernels inherit it: no progress-bar text in the outputs
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    default = args.model == DEFAULT_MODEL and args.device == "cpu" and args.dtype == "float32"
    params = {} if default else {"MODEL": args.model, "DEVICE": args.device, "DTYPE": args.dtype}
    name = slug(args.model)
    out_dir = figures_dir() / name
    staging = REPO_ROOT / "build" / "notebooks" / name
    staging.mkdir(parents=True, exist_ok=True)
    print(f"[figures] {what}", flush=True)
    rows = []
    for nb in nbs:
        target = nb if default else out_dir / "notebooks" / nb.name
        partial = staging / nb.name
        shown = target.relative_to(REPO_ROOT) if target.is_relative_to(REPO_ROOT) else target
        print(f"[figures] {nb.name} on {args.model} ({args.device}) -> {shown}", flush=True)
        t0 = time.time()
        source = staging / f"{nb.stem}.source.ipynb"
        nbformat.write(source_notebook(nb.with_suffix(".py")), source)
        try:
            pm.execute_notebook(str(source), str(partial), parameters=params, cwd=str(NOTEBOOK_DIR),
                                progress_bar=False, log_output=False, kernel_name="python3")
        except PapermillExecutionError as err:
            # papermill inserts its "injected-parameters" cell after the parameters cell: count without it
            cell = err.cell_index - (1 if params else 0)
            print(f"error: {nb.name} failed in cell {cell} ({_last_line(err.source.splitlines()[0] if err.source else '')!r}): "
                  f"{err.ename}: {_last_line(err.evalue)}", file=sys.stderr)
            print(f"       the partly executed notebook is {partial}; {target.name} was left as it was.",
                  file=sys.stderr)
            return 1
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(partial, target)
        dt = time.time() - t0
        rows.append({"notebook": nb.name, "seconds": round(dt, 1)})
        print(f"[figures] {nb.name}: {dt / 60:.1f} min", flush=True)
    timings = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.only:
        timings.to_csv(out_dir / "timings.csv", index=False)
    total = timings["seconds"].sum() / 60
    print(f"[figures] done: {len(rows)} notebooks, figures in {out_dir}")
    print(f"figures_minutes={total:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
