"""Execute the numbered notebooks with papermill (``make figures``).

On the default model the committed notebooks are refreshed in place (their outputs are the write-up a
reader sees); with another model, executed copies go to ``figures/<model>/notebooks/`` and the committed
notebooks are left alone. Per-notebook wall times are printed and saved to ``figures/<model>/timings.csv``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"


def notebooks(only: str | None = None) -> list[Path]:
    found = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if p.name.startswith(only) or p.stem == only]
        if not found:
            raise SystemExit(f"error: no notebook matches {only!r} in {NOTEBOOK_DIR}.")
    return found


def main(argv: list[str] | None = None) -> int:
    import pandas as pd
    import papermill as pm

    from .models import DEFAULT_MODEL
    from .plotting import FIGURES_DIR

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--only", default=None, help="run only the notebook whose name starts with this")
    args = ap.parse_args(argv)

    default = args.model == DEFAULT_MODEL and args.device == "cpu" and args.dtype == "float32"
    params = {} if default else {"MODEL": args.model, "DEVICE": args.device, "DTYPE": args.dtype}
    slug = args.model.strip("/").replace("/", "--")
    out_dir = FIGURES_DIR / slug / "notebooks"
    rows = []
    for nb in notebooks(args.only):
        target = nb if default else out_dir / nb.name
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"[figures] {nb.name} on {args.model} ({args.device}) -> {target}", flush=True)
        t0 = time.time()
        pm.execute_notebook(str(nb), str(target), parameters=params, cwd=str(NOTEBOOK_DIR),
                            progress_bar=False, log_output=False, kernel_name="python3")
        dt = time.time() - t0
        rows.append({"notebook": nb.name, "seconds": round(dt, 1)})
        print(f"[figures] {nb.name}: {dt / 60:.1f} min", flush=True)
    timings = pd.DataFrame(rows)
    (FIGURES_DIR / slug).mkdir(parents=True, exist_ok=True)
    if not args.only:
        timings.to_csv(FIGURES_DIR / slug / "timings.csv", index=False)
    total = timings["seconds"].sum() / 60
    print(f"[figures] done: {len(rows)} notebooks, figures in {FIGURES_DIR / slug}")
    print(f"figures_minutes={total:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
