"""How well the attribution screen's estimate ranks the heads, against an exact screen of every head.

    refusal-circuits screen --model M --pairs data/safety_pairs.csv --n-pairs 48 --method exact \
        --no-ablation --out results/screen-exact/M
    python bench/screen_agreement.py --exact results/screen-exact/M --attribution results/screen/M

Reads only the two screen folders (the exact one's ``interchange.csv``, the attribution one's
``attribution.csv`` and ``interchange.csv``; same pairs, same positions) and prints, over every head:
the Spearman correlation of estimate and exact combined score, the overlap of their top 10 and bottom 5,
whether the exact gate is among the heads the attribution screen confirmed, and the largest exact combined
score of a head it did not confirm. Last lines: ``key=value``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exact", required=True, help="a screen folder written with --method exact")
    ap.add_argument("--attribution", required=True, help="a screen folder written with --method attribution")
    args = ap.parse_args(argv)
    ex_dir, at_dir = Path(args.exact), Path(args.attribution)
    m_ex, m_at = (json.loads((d / "manifest.json").read_text()) for d in (ex_dir, at_dir))
    for k in ("pairs_hash", "n_pairs", "positions", "seed"):
        if m_ex.get(k) != m_at.get(k):
            raise SystemExit(f"error: the two screens differ in {k}: {m_ex.get(k)!r} vs {m_at.get(k)!r}.")
    exact = pd.read_csv(ex_dir / "interchange.csv").assign(combined=lambda t: t.necessity_pct + t.sufficiency_pct)
    if (exact.method != "exact").any():
        raise SystemExit(f"error: {ex_dir} is not an exact screen of every head.")
    est = pd.read_csv(at_dir / "attribution.csv")
    confirmed = pd.read_csv(at_dir / "interchange.csv")
    confirmed = set(map(tuple, confirmed[confirmed.method == "exact"][["layer", "head"]].values.tolist()))
    m = exact.merge(est, on=["layer", "head"], suffixes=("", "_estimate"))
    rho = float(m[["combined", "combined_estimate"]].corr(method="spearman").iloc[0, 1])
    key = lambda t: set(zip(t.layer, t["head"]))  # noqa: E731
    top = len(key(m.nlargest(10, "combined")) & key(m.nlargest(10, "combined_estimate")))
    bottom = len(key(m.nsmallest(5, "combined")) & key(m.nsmallest(5, "combined_estimate")))
    gate = m.loc[m.combined.idxmax()]
    missed = m[[(l, h) not in confirmed for l, h in zip(m.layer, m["head"])]]
    print(f"{m_ex['model']}: {len(m)} heads, {m_ex['n_pairs']} pairs, positions={m_ex['positions']}; exact screen "
          f"{m_ex['timings_s']['interchange']:.0f} s of interchange, attribution {m_at['timings_s']['attribution']:.0f} s "
          f"+ {m_at['timings_s']['interchange']:.0f} s confirming {len(confirmed)} heads")
    print(f"exact gate L{int(gate.layer)}H{int(gate['head'])} ({gate.combined:.2f}%); attribution screen's gate "
          f"L{m_at['gate']['layer']}H{m_at['gate']['head']}")
    print(f"spearman={rho:.3f}")
    print(f"top10_overlap={top}")
    print(f"bottom5_overlap={bottom}")
    print(f"gate_confirmed={(int(gate.layer), int(gate['head'])) in confirmed}")
    print(f"best_unconfirmed_combined={missed.combined.max():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
