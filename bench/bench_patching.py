"""Patching benchmark: our sweep engine vs TransformerLens's per-index loop, measured side by side.

    python bench/bench_patching.py [--model smollm2-135m-refusal] [--gemma-shape] [--device cpu]

For each model it times, on the same pairs and device, in one process:

1. per-head interchange (every head, all positions, noising = necessity):
   ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` (one forward per head per pair)
   vs :func:`refusal_circuits.patching.head_interchange` (patches packed into the batch, each forward
   starting at the patched layer);
2. residual patching over every (layer, position): ``get_act_patch_resid_pre`` vs ``patch_sweep``;
3. the attribution screen (one forward + backward) vs the exact engine, with the agreement of the two
   rankings (Spearman over all heads, overlap of the top 10 by |effect|).

Reported per method: wall seconds, forward-equivalents (layer evaluations / n_layers, the compute
actually done) and peak memory (CUDA: max allocated; CPU: peak RSS growth sampled every 5 ms). The
last lines are machine-readable ``key=value`` figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

import refusal_circuits as rc  # noqa: E402
from refusal_circuits import patching as P  # noqa: E402


class Peak:
    """Peak memory during a block: CUDA max-allocated, or sampled process RSS growth on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.proc = psutil.Process(os.getpid())
            self.base = self.proc.memory_info().rss
            self.peak = self.base
            self.stop = False
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.stop = True
            self.thread.join()
            self.mb = (self.peak - self.base) / 2**20
        self.seconds = time.perf_counter() - self.t0


def gemma2_2b_shaped(device: str):
    """A random-weight model with gemma-2-2b's shape (26 layers, d_model 2304, 8 heads), no download."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    from refusal_circuits.models import ChatModel, _boot_bridge, derive_refusal_tokens, smollm2_tokenizer

    tok = smollm2_tokenizer()
    cfg = Gemma2Config(num_hidden_layers=26, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=256, vocab_size=len(tok), sliding_window=4096,
                       pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).to(device).eval()
    tok.padding_side = "left"
    bridge = _boot_bridge(hf, tok, "gemma-2-2b-shaped")
    ids, top = derive_refusal_tokens(tok)
    return ChatModel("gemma-2-2b-shaped (random)", bridge, tok, ids, top)


def forward_equivalents_engine(model, pairs, patches, max_batch):
    """Layer evaluations our engine performs / n_layers (+ the 2 cached runs per length group)."""
    L = model.n_layers
    total = 0.0
    for _, idx in pairs.length_groups().items():
        B = len(idx)
        total += 2 * B
        for p in patches:
            total += B * (L - P.start_layer(p)) / L
    return total


def bench_model(model, n_pairs: int, max_batch: int, device: str, heads_limit: int | None,
                resid: bool = True) -> dict:
    from transformer_lens import patching as tlp

    pairs = rc.align_pairs(model, rc.load_toy_pairs()).subset(n_pairs)
    # TL's sweeps take one token batch: use the largest group of equal-length pairs for both methods
    n, idx = max(pairs.length_groups().items(), key=lambda kv: len(kv[1]))
    pairs = rc.data.AlignedPairs(pairs.pairs.iloc[idx].reset_index(drop=True), pairs.dropped,
                                 [pairs.tokens_a[i] for i in idx], [pairs.tokens_b[i] for i in idx])
    harmful, harmless = pairs.batch(range(len(pairs)))
    r = model.refusal_token_id
    L, H = model.n_layers, model.n_heads
    heads = P.all_heads(model)
    if heads_limit and heads_limit < len(heads):  # evenly spread over the depth, so skipping is typical
        heads = [heads[round(i * (len(heads) - 1) / (heads_limit - 1))] for i in range(heads_limit)]
    print(f"\n== {model.name}: {L} layers x {H} heads, {len(pairs)} pairs of {n} tokens, device {device}")

    def tl_metric(logits):  # per-prompt-mean logit metric, what TL's sweeps record per index
        return rc.logit_refusal_metric(logits[:, -1], r).mean()

    rows, out = [], {}
    with torch.no_grad():
        _, clean_cache = model.bridge.run_with_cache(harmless, names_filter=lambda k: "hook_z" in k or "resid_pre" in k)

    # 1. per-head interchange (noising: run harmful, take each head's z from harmless)
    with torch.no_grad(), Peak(device) as t_naive:
        if heads_limit:
            naive = []
            for l, h in heads:
                def hook(z, hook, h=h, l=l):
                    z[:, :, h] = clean_cache[rc.hooks.z(l)][:, :, h]
                    return z
                naive.append(tl_metric(model.bridge.run_with_hooks(harmful, fwd_hooks=[(rc.hooks.z(l), hook)])).item())
            naive = torch.tensor(naive)
        else:
            naive = tlp.get_act_patch_attn_head_out_all_pos(model.bridge, harmful, clean_cache, tl_metric).flatten()
    with torch.no_grad(), Peak(device) as t_ours:
        ours_df = P.head_interchange(model, pairs, "noising", heads=heads, max_batch=max_batch, progress=False)
    ours = torch.tensor(ours_df.groupby("label", sort=False).patched.mean().values)
    err = (ours - naive[: len(ours)].cpu()).abs().max().item()
    naive_fe = len(heads) * len(pairs)
    patches = [P.Patch(f"L{l}H{h}", (P.Site(rc.hooks.z(l), "all", h),)) for l, h in heads]
    ours_fe = forward_equivalents_engine(model, pairs, patches, max_batch)
    rows += [dict(task="head interchange", method="TL per-index loop" if not heads_limit else "hook loop",
                  seconds=t_naive.seconds, fwd_equiv=naive_fe, peak_mb=t_naive.mb),
             dict(task="head interchange", method="ours (batched, layer-skipping)", seconds=t_ours.seconds,
                  fwd_equiv=ours_fe, peak_mb=t_ours.mb, max_abs_diff=err)]
    out["interchange_speedup"] = t_naive.seconds / t_ours.seconds

    # 2. residual patching over every (layer, position)
    T = harmful.shape[1]
    if not resid:
        rows.append(dict(task="resid patching", method="skipped (--gemma-resid to run)"))
    else:
        with torch.no_grad(), Peak(device) as t_naive_r:
            naive_r = tlp.get_act_patch_resid_pre(model.bridge, harmful, clean_cache, tl_metric)  # [layer, pos]
        with torch.no_grad(), Peak(device) as t_ours_r:
            df_r = P.patch_sweep(model, pairs, P.resid_patches(model, list(range(-T, 0))), "noising",
                                 max_batch=max_batch, progress=False)
        ours_r = torch.tensor(df_r.groupby("label", sort=False).patched.mean().values).view(L, T)
        err_r = (ours_r - naive_r.cpu()).abs().max().item()
        rpatches = P.resid_patches(model, list(range(-T, 0)))
        rows += [dict(task="resid patching", method="TL per-index loop", seconds=t_naive_r.seconds,
                      fwd_equiv=L * T * len(pairs), peak_mb=t_naive_r.mb),
                 dict(task="resid patching", method="ours (batched, layer-skipping)", seconds=t_ours_r.seconds,
                      fwd_equiv=forward_equivalents_engine(model, pairs, rpatches, max_batch), peak_mb=t_ours_r.mb,
                      max_abs_diff=err_r)]
        out["resid_patch_speedup"] = t_naive_r.seconds / t_ours_r.seconds

    # 3. attribution screen vs the exact engine (all heads), agreement of the rankings
    with Peak(device) as t_atp:
        atp = P.attribution_head_scores(model, pairs, "noising", progress=False)
    est = atp.groupby("label", sort=False).estimate.mean()
    exact = (ours_df.assign(effect=ours_df.patched - ours_df.target).groupby("label", sort=False).effect.mean())
    est = est.loc[exact.index]
    spearman = est.rank().corr(exact.rank())
    top_exact = set(exact.abs().sort_values(ascending=False).index[:10])
    top_atp = set(est.abs().sort_values(ascending=False).index[:10])
    rows.append(dict(task="head screen", method="attribution patching (1 fwd+bwd)", seconds=t_atp.seconds,
                     fwd_equiv=3 * len(pairs), peak_mb=t_atp.mb))
    out["atp_speedup"] = t_naive.seconds / t_atp.seconds
    out["atp_vs_engine_speedup"] = t_ours.seconds / t_atp.seconds
    out["atp_spearman"] = spearman
    out["atp_top10_overlap"] = len(top_exact & top_atp)
    table = pd.DataFrame(rows)
    table.insert(0, "model", model.name)
    return {"table": table, "figures": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=rc.DEFAULT_MODEL)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=8, help="toy pairs (the largest equal-length group is used)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--gemma-shape", action="store_true", help="also run a random model with gemma-2-2b's shape")
    ap.add_argument("--gemma-heads", type=int, default=None,
                    help="limit the gemma-shaped interchange to the first N heads (CPU time)")
    ap.add_argument("--gemma-resid", action="store_true", help="also run resid patching on the gemma shape")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = [bench_model(rc.load_model(args.model, device=args.device), args.pairs, args.max_batch, args.device, None)]
    if args.gemma_shape:
        results.append(bench_model(gemma2_2b_shaped(args.device), min(args.pairs, 4), args.max_batch // 4,
                                   args.device, args.gemma_heads, resid=args.gemma_resid))
    table = pd.concat([r["table"] for r in results], ignore_index=True)
    pd.set_option("display.width", 200)
    print("\n" + table.round(3).to_string(index=False))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(args.out) / f"bench-{args.device.replace(':', '')}.csv", index=False)
    figs = results[0]["figures"]
    timings = ROOT / "figures" / rc.DEFAULT_MODEL / "timings.csv"
    if timings.exists():
        t = pd.read_csv(timings)
        print("\nper-notebook minutes (last make figures): "
              + ", ".join(f"{r.notebook} {r.seconds / 60:.1f}" for r in t.itertuples()))
        figs["figures_minutes"] = t.seconds.sum() / 60
    for r in results[1:]:
        for k, v in r["figures"].items():
            figs[f"gemma_shape_{k}"] = v
    print()
    for k, v in figs.items():
        print(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
