"""Execute the numbered notebooks with papermill (``make figures``).

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


def notebooks(only: str | None = None) -> list[Path]:
    found = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if p.name.startswith(only) or p.stem == only]
        if not found:
            raise SystemExit(f"error: no notebook matches {only!r} in {NOTEBOOK_DIR}.")
    return found


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
        try:
            pm.execute_notebook(str(nb), str(partial), parameters=params, cwd=str(NOTEBOOK_DIR),
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
