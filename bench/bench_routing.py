"""Routing and cipher benchmark: the three shortcuts notebooks 06 and 07 rely on, each timed side by side
with the plain computation it replaces, in one process, on the same prompts.

    python bench/bench_routing.py [--model smollm2-135m-refusal] [--n-pairs 16] [--device cpu]

1. **rescue** -- greedy generation on the cipher prompts under ``--n-conditions`` conditions (unpatched
   and one head's plain last-position ``z`` written in, as :func:`refusal_circuits.cipher.rescue`):
   one :func:`~refusal_circuits.generation.generate` per condition vs
   :func:`~refusal_circuits.generation.generate_conditions` (the prompt prefix run once, 3 conditions
   stacked per batch);
2. **dose** -- the dose-response's steering fractions on the sensitive prompts: one ``generate`` per
   fraction vs ``generate_conditions(share_prefix=False)``;
3. **knockout** -- every head's DLA with one head zeroed, for ``--n-knockouts`` heads around the band
   gate's depth: :func:`refusal_circuits.gate.head_dla_pairs` with the zeroing hook (a full forward
   per knockout) vs :func:`refusal_circuits.routing.knockout_dla`.

The last lines are ``key=value``: ``rescue_speedup``, ``rescue_identical`` (every completion equal),
``dose_speedup``, ``dose_identical``, ``knockout_speedup`` and ``knockout_max_abs_diff``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

import refusal_circuits as rc  # noqa: E402
from refusal_circuits import cipher as C  # noqa: E402
from refusal_circuits import engine as E  # noqa: E402
from refusal_circuits import gate as G  # noqa: E402
from refusal_circuits import hooks  # noqa: E402
from refusal_circuits import routing as R  # noqa: E402
from refusal_circuits.generation import generate, generate_conditions  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-refusal")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-pairs", type=int, default=16)
    ap.add_argument("--n-conditions", type=int, default=7)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--n-knockouts", type=int, default=8)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = rc.load_model(args.model, device=args.device)
    plain, cip = C.cipher_pairs(model, G.load_pairs(ROOT / "data" / "safety_pairs.csv"), C.load_cipher(),
                                n_pairs=args.n_pairs, seed=0)
    L, H = model.n_layers, model.n_heads
    print(f"{model.name}: {args.n_pairs} pairs, cipher prompts up to {max(cip.pairs.n_sensitive)} tokens")

    # 1. rescue-style conditions on the cipher prompts
    rng = torch.Generator().manual_seed(0)
    heads = [(int(l), int(h)) for l, h in zip(torch.randint(0, L, (args.n_conditions - 1,), generator=rng),
                                              torch.randint(0, H, (args.n_conditions - 1,), generator=rng))]
    zs = C.last_z(model, list(plain.pairs.sensitive), heads)

    def writer(l, h):
        return lambda rows: [(hooks.z(l), C._last_position_writer(h, zs[(l, h)][rows]))]

    conds = {"cipher": [], **{f"L{l}H{h}#{i}": writer(l, h) for i, (l, h) in enumerate(heads)}}
    prompts = list(cip.pairs.sensitive)
    n, bs, T = len(prompts), 16, args.max_new_tokens
    slow, t_slow = timed(lambda: {k: generate(model, prompts, T, bs, c(list(range(n))) if callable(c) else c,
                                              progress=False) for k, c in conds.items()})
    fast, t_fast = timed(lambda: generate_conditions(model, prompts, conds, T, bs, conditions_per_batch=3,
                                                     progress=False))
    print(f"rescue ({len(conds)} conditions x {n} prompts, {T} tokens): generate per condition {t_slow:.1f} s, "
          f"generate_conditions {t_fast:.1f} s")
    rescue = (t_slow / t_fast, all(slow[k] == fast[k] for k in conds))

    # 2. dose-response fractions on the sensitive prompts
    det = R.detection_direction(model, plain)
    fr = (0.0, 0.1, 0.2, 0.3, 0.5)
    steer = {f: R.addition_hooks(model, det.direction, det.layer, -f * det.resid_norm) if f else [] for f in fr}
    sens = list(plain.pairs.sensitive)
    slow, t_slow = timed(lambda: {f: generate(model, sens, T, bs, c, progress=False) for f, c in steer.items()})
    fast, t_fast = timed(lambda: generate_conditions(model, sens, steer, T, bs, share_prefix=False, progress=False))
    print(f"dose ({len(fr)} fractions x {len(sens)} prompts): generate per fraction {t_slow:.1f} s, stacked {t_fast:.1f} s")
    dose = (t_slow / t_fast, all(slow[f] == fast[f] for f in fr))

    # 3. knockouts around the middle of the model (where the band gate sits)
    mid = L // 2
    knocked = [((mid - 2 + i % 5) % L, (i * 7) % H) for i in range(args.n_knockouts)]
    slow, t_slow = timed(lambda: {k: (lambda s, c: s - c)(*G.head_dla_pairs(model, plain, 8, E.zero_head_hooks(*k)))
                                  for k in knocked})
    fast, t_fast = timed(lambda: R.knockout_dla(model, plain, knocked))
    diff = max(float((slow[k] - fast[k]).abs().max()) for k in knocked)
    print(f"knockout ({len(knocked)} heads x {2 * len(plain)} prompts): full runs {t_slow:.1f} s, knockout_dla {t_fast:.1f} s")

    print(f"rescue_speedup={rescue[0]:.2f}")
    print(f"rescue_identical={rescue[1]}")
    print(f"dose_speedup={dose[0]:.2f}")
    print(f"dose_identical={dose[1]}")
    print(f"knockout_speedup={t_slow / t_fast:.2f}")
    print(f"knockout_max_abs_diff={diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
