"""Does the batched exact screen hold its speed on a shared machine? The same exact interchange (every
head, necessity and sufficiency, NLL metric) run in a fresh process under four conditions, side by side:

1. ``alone``: torch's default threads, nothing else running;
2. ``shared``: the same with one single-thread busy job on the machine (what a shared or cluster node
   looks like);
3. ``shared, threads=cores-1``: the screen given its share (``--threads`` / ``REFUSAL_THREADS``);
4. ``shared, passive``: default threads with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep instead of
   spinning at every barrier).

    python bench/bench_threads.py [--model smollm2-135m-refusal] [--n-pairs 2]

The last lines are ``key=value``: the seconds of each condition and ``threads_shared_slowdown`` (shared /
alone) and ``threads_share_slowdown`` (shared with its share / alone).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time
sys.path.insert(0, {lib!r})
import refusal_circuits as rc
from refusal_circuits import gate as G
from refusal_circuits.models import set_threads
n = set_threads({threads})
model = rc.load_model({model!r}, device="cpu")
gp = G.prepare_pairs(model, G.load_pairs(rc.paths.DATA_DIR / "safety_pairs.csv"), n_pairs={n_pairs}, seed=0)
t0 = time.perf_counter()
for d in ("necessity", "sufficiency"):
    G.interchange(model, gp, d, "prompt", progress=False)
print(f"RESULT {{time.perf_counter() - t0:.2f}} {{n}}")
"""


def run(model: str, n_pairs: int, threads: int | None, env_extra: dict, busy: bool) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "REFUSAL_THREADS")}
    env.update(env_extra)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        code = CHILD.format(lib=str(ROOT / "lib"), threads=threads, model=model, n_pairs=n_pairs)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    secs, n = out.strip().splitlines()[-1].split()[1:]
    return float(secs), int(n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-refusal")
    ap.add_argument("--n-pairs", type=int, default=2)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "lib"))
    from refusal_circuits.models import available_cores

    cores = available_cores()
    print(f"{args.model}, exact interchange of every head on {args.n_pairs} pairs, {cores} cores", flush=True)
    conditions = {
        "alone": (None, {}, False),
        "shared": (None, {}, True),
        "shared_share": (max(1, cores - 1), {}, True),
        "shared_passive": (None, {"OMP_WAIT_POLICY": "PASSIVE"}, True),
    }
    secs = {}
    for name, (threads, env, busy) in conditions.items():
        t0 = time.time()
        secs[name], n = run(args.model, args.n_pairs, threads, env, busy)
        print(f"  {name:15s} {n} threads  {secs[name]:7.1f} s  (wall {time.time() - t0:.0f} s)", flush=True)
    for name, s in secs.items():
        print(f"threads_{name}_s={s:.1f}")
    print(f"threads_shared_slowdown={secs['shared'] / secs['alone']:.2f}")
    print(f"threads_share_slowdown={secs['shared_share'] / secs['alone']:.2f}")
    print(f"threads_passive_slowdown={secs['shared_passive'] / secs['alone']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
