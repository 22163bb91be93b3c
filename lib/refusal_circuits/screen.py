"""The ``screen`` stage: the gate of one model, written as a folder that panels and scripts read.

    refusal-circuits screen --model NAME --pairs FILE.csv --out DIR [--n-pairs N] [--positions prompt|last|paper|answer] ...

:func:`screen` computes, for every head, interchange necessity and sufficiency (NLL metric,
:mod:`refusal_circuits.gate`) -- ``method="exact"``: the exact batched interchange of every head;
``method="attribution"``: the attribution estimate for every head, then the exact interchange of the
``top_k`` heads it ranks highest, its ``bottom_k`` most negative heads and its ``n_band`` best in the paper's 25-65% depth band (the gate
is chosen among the exactly confirmed heads; ``band_gate`` in the manifest is the best confirmed head
in that band, where the paper looked) -- output DLA,
and per-head directional ablation of the candidate heads (:mod:`refusal_circuits.routing`: the top 20 by
|DLA| in the 25-65% depth band, as the paper screened, and the top heads by interchange), and writes

* ``DIR/interchange.csv`` -- one row per head: ``layer, head, necessity, sufficiency, necessity_pct,
  sufficiency_pct, gap, method, p_fwer`` (the family-wise permutation p over the exact heads);
* ``DIR/head_dla.csv`` -- ``layer, head, dla, ci_lo, ci_hi``;
* ``DIR/ablation.csv`` -- ``layer, head, reduction, reduction_pct, rank`` for the candidate heads;
* ``DIR/ablation_pairs.csv`` -- every (candidate head, pair) NLL ``baseline, ablated, reduction``;
* ``DIR/interchange_pairs.csv`` -- every (head, pair, direction) effect, with its ``method``;
* ``DIR/attribution.csv`` (``method="attribution"``) -- every head's estimated ``necessity_pct,
  sufficiency_pct, combined`` and its rank by the estimate, the confirmed heads included;
* ``DIR/pairs.csv`` -- the pairs used, their target tokens and NLL gaps;
* ``DIR/manifest.json`` -- model, weights fingerprint, pairs-file hash, ``n_pairs``, ``positions``,
  ``method``, seed, package versions, timings, the gate and its ``statistics``
  (:func:`refusal_circuits.gate.gate_statistics`: family-wise p, top-set Jaccard stability, the margin over
  the runner-up).

``positions`` (:data:`refusal_circuits.engine.POSITIONS`) says which positions the interchange swaps:
``prompt`` (default), ``last``, ``paper`` (alias ``start``) or the ``answer`` diagnostic (alias ``end``).

Long sweeps save their parts under ``DIR/checkpoints/`` as they finish, so a killed screen restarted
with the same arguments resumes where it stopped. A panel of models is one screen per model (one
process, one folder each): independent jobs on a cluster. :func:`read_screens` gathers the folders.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pandas as pd

from . import engine as E
from . import gate as G
from .models import ChatModel
from .paths import slug
from .results import ResultsStore, atomic_write, package_versions

METHODS = ("exact", "attribution")


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def screen(model: ChatModel, pairs_file: str | Path, out_dir: str | Path, n_pairs: int | None = None,
           positions: str = "prompt", method: str = "exact", top_k: int = 10, bottom_k: int = 5, seed: int = 0,
           max_batch: int = 64, ablation: bool = True, n_dla_candidates: int = 20, n_band: int = 3,
           n_perm: int = 10_000, n_boot: int = 2_000, stable_k: int = 5, progress: bool = True, log=print) -> dict:
    """Screen every head of ``model`` on the pairs of ``pairs_file`` and write ``out_dir`` (see the
    module docstring). Returns the manifest. A model whose sensitive prompts are not less likely to be
    answered than the controls (mean gap <= 0) is reported, and the tables are still written."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    positions = E.resolve_positions(positions)
    if int(top_k) < 1 or int(bottom_k) < 0:
        raise ValueError(f"top_k must be >= 1 and bottom_k >= 0, got {top_k} and {bottom_k}.")
    out = Path(out_dir)
    t0 = time.time()
    df = G.load_pairs(pairs_file)
    gp = G.prepare_pairs(model, df, n_pairs=n_pairs, seed=seed)
    key = {"pairs": _file_hash(Path(pairs_file)), "n_pairs": len(gp), "positions": positions, "seed": seed,
           "pair_ids": list(map(str, gp.pairs.pair_id))}
    store = ResultsStore(slug(model.name), root=out / "checkpoints", fingerprint=model.meta.get("fingerprint", ""))
    gap = store.cached("gaps", key, lambda: G.gaps(model, gp))
    mean_gap = float(gap.gap.mean())
    if mean_gap <= 0:
        log(f"warning: mean NLL gap is {mean_gap:.3f} <= 0: {model.name} does not refuse these sensitive prompts "
            "more than the controls, so necessity and sufficiency percentages are not meaningful (tables written anyway).")
    t1 = time.time()
    kw = dict(positions=positions, progress=progress)
    if method == "exact":
        nec = G.interchange(model, gp, "necessity", checkpoint=store.checkpoint("necessity", key), max_batch=max_batch, **kw)
        suf = G.interchange(model, gp, "sufficiency", checkpoint=store.checkpoint("sufficiency", key), max_batch=max_batch, **kw)
        nec, suf = nec.assign(method="exact"), suf.assign(method="exact")
        t_atp = 0.0
    else:
        nec = G.attribution(model, gp, "necessity", checkpoint=store.checkpoint("atp_necessity", key), **kw)
        suf = G.attribution(model, gp, "sufficiency", checkpoint=store.checkpoint("atp_sufficiency", key), **kw)
        t_atp = time.time() - t1
        est = G.summarise(nec, suf, gap)
        estimates = est[["layer", "head", "necessity_pct", "sufficiency_pct", "combined", "rank"]]
        band = G.depth_band(model.n_layers)
        in_band = est[est.layer.isin(band)].head(n_band)
        top = [(int(l), int(h)) for l, h in zip(est.layer[:top_k], est["head"][:top_k])]
        if bottom_k:                                           # the most negative heads matter too
            low = est.tail(int(bottom_k))
            top += [(int(l), int(h)) for l, h in zip(low.layer, low["head"]) if (int(l), int(h)) not in top]
        top += [(int(l), int(h)) for l, h in zip(in_band.layer, in_band["head"]) if (int(l), int(h)) not in top]
        ck = {**key, "heads": top}
        nec_x = G.interchange(model, gp, "necessity", heads=top, checkpoint=store.checkpoint("necessity_top", ck),
                              max_batch=max_batch, **kw)
        suf_x = G.interchange(model, gp, "sufficiency", heads=top, checkpoint=store.checkpoint("sufficiency_top", ck),
                              max_batch=max_batch, **kw)
        nec = _replace(nec.assign(method="attribution"), nec_x.assign(method="exact"))
        suf = _replace(suf.assign(method="attribution"), suf_x.assign(method="exact"))
    t2 = time.time()
    summary = G.summarise(nec, suf, gap)
    methods = nec.groupby(["layer", "head"]).method.first()
    summary["method"] = [methods.loc[(l, h)] for l, h in zip(summary.layer, summary["head"])]
    dla, dla_pairs = G.head_dla(model, gp, seed=seed)
    t3 = time.time()
    confirmed = summary[summary.method == "exact"]
    gate = G.gate_of(confirmed)
    ex_n, ex_s = nec[nec.method == "exact"], suf[suf.method == "exact"]
    per_head_p, statistics = G.gate_statistics(ex_n, ex_s, gap, n_perm, n_boot, stable_k, seed)
    p_of = per_head_p.set_index(["layer", "head"]).p_fwer
    summary["p_fwer"] = [p_of.get((l, h), float("nan")) for l, h in zip(summary.layer, summary["head"])]
    band_rows = confirmed[confirmed.layer.isin(G.depth_band(model.n_layers))]
    band_gate = G.gate_of(band_rows) if len(band_rows) else None
    dla_rank = dla.assign(a=dla.dla.abs()).sort_values("a", ascending=False).reset_index(drop=True)
    rank = int(dla_rank.index[(dla_rank.layer == gate.layer) & (dla_rank["head"] == gate["head"])][0]) + 1
    table = summary.sort_values(["layer", "head"])[["layer", "head", "necessity", "sufficiency", "necessity_pct",
                                                    "sufficiency_pct", "gap", "method", "p_fwer"]]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "interchange.csv", lambda p: table.to_csv(p, index=False))
    atomic_write(out / "head_dla.csv", lambda p: dla[["layer", "head", "dla", "ci_lo", "ci_hi"]].to_csv(p, index=False))
    pairs_out = gp.pairs.merge(gap, on="pair_id")
    atomic_write(out / "pairs.csv", lambda p: pairs_out.to_csv(p, index=False))
    per_pair = pd.concat([nec, suf], ignore_index=True)
    atomic_write(out / "interchange_pairs.csv", lambda p: per_pair.to_csv(p, index=False))
    if method == "attribution":
        atomic_write(out / "attribution.csv", lambda p: estimates.sort_values(["layer", "head"]).to_csv(p, index=False))
    abl_info, det = None, None
    if ablation:
        from . import routing as R

        band = G.depth_band(model.n_layers)
        in_band = dla_rank[dla_rank.layer.isin(band)].head(n_dla_candidates)
        cands = sorted({(int(l), int(h)) for l, h in zip(in_band.layer, in_band["head"])}
                       | {(int(l), int(h)) for l, h in zip(summary.layer[:top_k], summary["head"][:top_k])}
                       | {(int(gate.layer), int(gate["head"]))})
        try:
            det = R.detection_direction(model, gp)
        except ValueError as err:
            log(f"warning: per-head ablation skipped: {err}")
            det, abl_info = None, {"skipped": str(err)}
    if ablation and det is not None:
        abl = R.directional_ablation(model, gp, det.direction, heads=cands, max_batch=max_batch, progress=progress,
                                     checkpoint=store.checkpoint("ablation", {**key, "heads": cands}))
        abl_sum = R.summarise_ablation(abl, mean_gap)
        atomic_write(out / "ablation.csv", lambda p: abl_sum.to_csv(p, index=False))
        atomic_write(out / "ablation_pairs.csv", lambda p: abl.to_csv(p, index=False))
        best = abl_sum.iloc[0]
        g_abl = abl_sum[(abl_sum.layer == gate.layer) & (abl_sum["head"] == gate["head"])].iloc[0]
        abl_info = {"detection_layer": det.layer, "alpha": 5.0, "n_heads": len(cands),
                    "top_head": f"L{int(best.layer)}H{int(best['head'])}", "top_reduction": float(best.reduction),
                    "gate_reduction": float(g_abl.reduction)}
    t4 = time.time()
    manifest = {
        "model": model.name, "weights": model.meta.get("fingerprint", ""), "source": model.meta.get("source", ""),
        "n_layers": model.n_layers, "n_heads": model.n_heads, "d_model": model.d_model,
        "n_params": int(sum(p.numel() for p in model.hf_model.parameters())),
        "pairs_file": str(pairs_file), "pairs_hash": key["pairs"], "n_pairs": len(gp), "positions": positions,
        "method": method, "top_k": int(top_k) if method == "attribution" else None,
        "bottom_k": int(bottom_k) if method == "attribution" else None,
        "n_exact_heads": int((summary.method == "exact").sum()), "seed": seed, "versions": package_versions(),
        "timings_s": {"pairs_and_gaps": round(t1 - t0, 1), "attribution": round(t_atp, 1),
                      "interchange": round(t2 - t1 - t_atp, 1), "dla": round(t3 - t2, 1),
                      "ablation": round(t4 - t3, 1), "total": round(time.time() - t0, 1)},
        "mean_gap": mean_gap,
        "gate": {"layer": int(gate.layer), "head": int(gate["head"]), "necessity_pct": float(gate.necessity_pct),
                 "sufficiency_pct": float(gate.sufficiency_pct), "dla_rank": rank},
        "band_gate": None if band_gate is None else {
            "layer": int(band_gate.layer), "head": int(band_gate["head"]),
            "necessity_pct": float(band_gate.necessity_pct), "sufficiency_pct": float(band_gate.sufficiency_pct),
            "band": [G.depth_band(model.n_layers).start, G.depth_band(model.n_layers).stop - 1]},
        "statistics": statistics,
        "ablation": abl_info,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    text = json.dumps(manifest, indent=2)
    atomic_write(out / "manifest.json", lambda p: Path(p).write_text(text))
    return manifest


def _replace(estimates: pd.DataFrame, exact: pd.DataFrame) -> pd.DataFrame:
    """The estimate rows, with those of the heads in ``exact`` replaced by the exact ones."""
    keys = set(map(tuple, exact[["layer", "head"]].values.tolist()))
    keep = [(l, h) not in keys for l, h in zip(estimates.layer, estimates["head"])]
    out = pd.concat([estimates[keep], exact], ignore_index=True)
    return out.sort_values(["layer", "head"], kind="stable").reset_index(drop=True)


def gate_line(manifest: dict) -> str:
    """The screen's last output line: ``gate=L<l>H<h> necessity_pct=<x> sufficiency_pct=<y> dla_rank=<k> n_heads=<n>``."""
    g = manifest["gate"]
    return (f"gate=L{g['layer']}H{g['head']} necessity_pct={g['necessity_pct']:.2f} "
            f"sufficiency_pct={g['sufficiency_pct']:.2f} dla_rank={g['dla_rank']} "
            f"n_heads={manifest['n_layers'] * manifest['n_heads']}")


def _screen_folders(roots, include_random: bool):
    """``(folder, manifest)`` of every screen folder below ``roots`` (one folder or several)."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    for root in roots:
        for m in sorted(Path(root).rglob("manifest.json")):
            if not (m.parent / "interchange.csv").exists():
                continue
            info = json.loads(m.read_text())
            if "gate" not in info or "n_layers" not in info or "screen" in info:   # a cipher stage's folder is not a screen
                continue
            if "random weights" in str(info.get("source", "")) and not include_random:
                continue
            yield m.parent, info


def read_screens(roots, include_random: bool = False) -> pd.DataFrame:
    """One row per screen folder (a ``manifest.json`` beside an ``interchange.csv``) below ``roots`` (a
    folder or a list of them): model, weights fingerprint, layers, heads, parameters, the gate, its depth as
    a fraction of the layers, necessity %, its family-wise p, the strongest per-head directional
    ablation (head and NLL reduction), and the gate's cipher collapse % where ``cipher`` ran on the folder.
    A model screened under several roots (the same name and weights) keeps the row of the last root, e.g. a notebook's own screen over a committed one. Screens of
    random-weight test models (``tiny-<arch>``) are left out unless ``include_random``: they are not
    refusal models."""
    rows = []
    for folder, info in _screen_folders(roots, include_random):
        g = info["gate"]
        cipher = folder / "cipher" / "manifest.json"
        collapse = json.loads(cipher.read_text())["gate"]["collapse_abs"] if cipher.exists() else None
        rows.append({"model": info["model"], "weights": info.get("weights", ""), "folder": str(folder),
                     "layers": info["n_layers"], "heads": info["n_heads"], "params_b": info["n_params"] / 1e9,
                     "positions": info.get("positions", E.ALIASES.get(info.get("align"), info.get("align"))),
                     "n_pairs": info["n_pairs"], "gate": f"L{g['layer']}H{g['head']}", "gate_layer": g["layer"],
                     "gate_depth": g["layer"] / max(info["n_layers"] - 1, 1), "necessity_pct": g["necessity_pct"],
                     "sufficiency_pct": g["sufficiency_pct"], "dla_rank": g["dla_rank"],
                     "gate_p_fwer": (info.get("statistics") or {}).get("gate_p_fwer"),
                     "method": info.get("method", "exact"), "n_exact_heads": info.get("n_exact_heads"),
                     "ablation_top_head": (info.get("ablation") or {}).get("top_head"),
                     "ablation_top_reduction": (info.get("ablation") or {}).get("top_reduction"),
                     "collapse_pct": None if collapse is None else 100 * collapse})
    df = pd.DataFrame(rows)
    return df.drop_duplicates(["model", "weights"], keep="last").reset_index(drop=True) if len(df) else df


def scaling_pair(small_dir: str | Path, large_dir: str | Path, n_boot: int = 2000, seed: int = 0) -> dict:
    """The paper's scaling claim on two screened models of one family: per-head directional ablation
    weakens with size while interchange still finds the gate. From each folder's ``ablation_pairs.csv``,
    the strongest head's mean NLL reduction and the ratio small / large with a bootstrap interval
    (:func:`refusal_circuits.stats.strongest_ratio`: the strongest head re-chosen in every resample, each
    model's pairs resampled on their own); and from each manifest, the gate, its necessity % and its
    family-wise p. Raises ``FileNotFoundError`` naming the screen to run when a folder lacks the tables."""
    from . import stats as S

    out, mats = {}, []
    for key, d in (("small", Path(small_dir)), ("large", Path(large_dir))):
        row = read_screens(d, include_random=True)
        if len(row) != 1 or not (d / "ablation_pairs.csv").exists():
            raise FileNotFoundError(f"{d} has no screen with per-pair ablation rows: run `refusal-circuits screen "
                                    f"--model ... --out {d}` (without --no-ablation).")
        abl = pd.read_csv(d / "ablation_pairs.csv")
        mats.append(abl.pivot_table(index=["layer", "head"], columns="pair_id", values="reduction").to_numpy())
        out[key] = row.iloc[0][["model", "params_b", "gate", "necessity_pct", "gate_p_fwer", "n_exact_heads",
                                "ablation_top_head"]].to_dict()
    r = S.strongest_ratio(mats[0], mats[1], n_boot=n_boot, seed=seed)
    out["small"]["ablation_top_reduction"], out["large"]["ablation_top_reduction"] = r["small"], r["large"]
    out["ratio"], out["ratio_lo"], out["ratio_hi"] = r["ratio"], r["lo"], r["hi"]
    return out


def read_sparsity(roots, n_boot: int = 2000, seed: int = 0, include_random: bool = False) -> pd.DataFrame:
    """The routing sparsity (:func:`refusal_circuits.gate.routing_sparsity`) of every screen folder below
    ``roots`` (one model's row from the last root that holds it, as in :func:`read_screens`), from its
    per-pair necessity rows: one row per (model, statistic), with ``method`` saying whether every head was
    exact ("exact") or some are attribution estimates ("attribution + exact top-k")."""
    frames = []
    for _, row in read_screens(roots, include_random).iterrows():
        pairs = Path(row.folder) / "interchange_pairs.csv"
        if not pairs.exists():
            continue
        nec = pd.read_csv(pairs).query("direction == 'necessity'")
        sp = G.routing_sparsity(nec, n_boot=n_boot, seed=seed)
        exact = bool((sp.n_exact_heads == sp.n_heads).all())
        frames.append(sp.assign(model=row.model, weights=row.weights, params_b=row.params_b,
                                method="exact" if exact else "attribution + exact top-k"))
    cols = ["model", "weights", "params_b", "method", "statistic", "estimate", "lo", "hi", "n_heads", "n_pairs", "n_exact_heads"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def cipher_screen(model: ChatModel, pairs_file: str | Path, screen_dir: str | Path, n_pairs: int | None = None,
                  positions: str | None = None, also_positions: tuple[str, ...] = ("paper",), top_k: int = 5, max_new_tokens: int = 64, n_random: int = 10,
                  seed: int = 0, progress: bool = True, log=print) -> dict:
    """The cipher stage of one model, written next to its screen: ``screen_dir/cipher/``.

    Reads the gate (and the top heads, and the best head of the paper's depth band) of the screen in
    ``screen_dir``; on the same pairs with the
    sensitive prompt encoded (:mod:`refusal_circuits.cipher`) it measures each head's necessity and
    sufficiency plain and cipher and the collapse, and the rescue: greedy generations on the cipher
    prompts with the gate's plain last-position ``z`` written in, against ``n_random`` random heads'.
    Three arms, each a set of pairs with the same target tokens: ``plain``, ``cipher`` (the sensitive
    prompt encoded, the paper's) and ``cipher_control`` (both prompts encoded behind the same preamble:
    does the model refuse the request, or the format?). The heads' interchange runs on every arm under
    ``positions`` and, for the gate, under each of ``also_positions``; collapse against the plain arm is
    given as % and in raw NLL. Greedy completions of the plain and the encoded controls (``behaviour``)
    sit beside the rescue's plain and cipher sensitive prompts.
    Writes ``interchange.csv`` (per positions, arm and head), ``interchange_pairs.csv``, ``collapse.csv``,
    ``rescue.csv``, ``behaviour.csv`` and ``manifest.json``; parts are checkpointed, so a rerun resumes."""
    from . import cipher as C

    screen_dir = Path(screen_dir)
    mpath = screen_dir / "manifest.json"
    if not mpath.exists() or not (screen_dir / "interchange.csv").exists():
        raise FileNotFoundError(f"No screen in {screen_dir}: run `refusal-circuits screen --model ... --out {screen_dir}` "
                                "first (the cipher stage tests that screen's gate).")
    info = json.loads(mpath.read_text())
    positions = E.resolve_positions(positions or info.get("positions") or info.get("align") or "prompt")
    n_pairs = n_pairs if n_pairs is not None else info["n_pairs"]
    gate = (int(info["gate"]["layer"]), int(info["gate"]["head"]))
    table = pd.read_csv(screen_dir / "interchange.csv")
    table = table[table.method == "exact"].assign(c=lambda t: t.necessity_pct + t.sufficiency_pct)
    top = [(int(l), int(h)) for l, h in zip(*table.sort_values("c", ascending=False)[["layer", "head"]].values.T)]
    band = info.get("band_gate")
    band_gate = (int(band["layer"]), int(band["head"])) if band else None
    heads = [gate] + [h for h in top if h != gate][: max(0, top_k - 1)]
    if band_gate is not None and band_gate not in heads:
        heads.append(band_gate)
    out = screen_dir / "cipher"
    t0 = time.time()
    cipher = C.load_cipher()
    plain, cip = C.cipher_pairs(model, G.load_pairs(pairs_file), cipher, n_pairs=n_pairs, seed=seed)
    key = {"pairs": _file_hash(Path(pairs_file)), "pair_ids": list(map(str, plain.pairs.pair_id)), "positions": positions,
           "heads": heads, "cipher": cipher.key}
    store = ResultsStore(slug(model.name), root=out / "checkpoints", fingerprint=model.meta.get("fingerprint", ""))
    both = C.cipher_control_pairs(model, plain, cipher)
    arms = {"plain": plain, "cipher": cip, "cipher_control": both}
    modes = [positions] + [E.resolve_positions(p) for p in also_positions if E.resolve_positions(p) != positions]
    frames = []
    for mode in modes:
        hs = heads if mode == positions else [gate]        # the other position modes: the gate only
        for kind, gp in arms.items():
            for d in ("necessity", "sufficiency"):
                df = G.interchange(model, gp, d, mode, heads=hs, progress=progress,
                                   checkpoint=store.checkpoint(f"{kind}_{d}_{mode}", key))
                frames.append(df.assign(prompt=kind, positions=mode))
    per_pair = pd.concat(frames, ignore_index=True)
    gaps = {k: store.cached(f"{k}_gaps", key, lambda gp=gp: G.gaps(model, gp)) for k, gp in arms.items()}
    rows, coll = [], []
    for (mode, kind), sub in per_pair.groupby(["positions", "prompt"], sort=False):
        s = G.summarise(sub[sub.direction == "necessity"], sub[sub.direction == "sufficiency"], gaps[kind])
        rows.append(s.assign(prompt=kind, positions=mode))
    summary = pd.concat(rows, ignore_index=True)[["positions", "prompt", "layer", "head", "necessity", "sufficiency",
                                                  "gap", "necessity_pct", "sufficiency_pct"]]
    for (mode, l, h, d), sub in per_pair.groupby(["positions", "layer", "head", "direction"], sort=False):
        p = sub[sub.prompt == "plain"].effect.values
        for arm in ("cipher", "cipher_control"):
            r = C.collapse(p, sub[sub.prompt == arm].effect.values, seed=seed)
            coll.append({"positions": mode, "direction": d, "arm": arm, "layer": int(l), "head": int(h),
                         "is_gate": (l, h) == gate, "plain_nll": r["plain_nll"], "arm_nll": r["cipher_nll"],
                         "change_nll": r["change_nll"], "change_nll_lo": r["change_nll_ci"][0],
                         "change_nll_hi": r["change_nll_ci"][1], "collapse_abs": r["absolute"],
                         "collapse_abs_lo": r["absolute_ci"][0], "collapse_abs_hi": r["absolute_ci"][1],
                         "collapse_signed": r["signed"], "collapse_signed_lo": r["signed_ci"][0],
                         "collapse_signed_hi": r["signed_ci"][1]})
    coll = pd.DataFrame(coll)
    t1 = time.time()
    import numpy as np

    pool = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads) if (l, h) != gate]
    rand = [pool[i] for i in sorted(np.random.default_rng(seed).permutation(len(pool))[: min(n_random, len(pool))])]
    rescuers = [gate] + ([band_gate] if band_gate not in (None, gate) else [])
    rand = [h for h in rand if h not in rescuers]
    resc = C.rescue(model, list(plain.pairs.sensitive), list(cip.pairs.sensitive), rescuers + rand, max_new_tokens,
                    progress=progress, controls=list(plain.pairs.control), control_heads=[gate],
                    checkpoint=store.checkpoint("rescue", {**key, "random": rand, "tokens": max_new_tokens,
                                                           "control_heads": [gate]}))
    resc["condition_kind"] = ["plain" if c == "plain" else "cipher" if c == "cipher" else
                              "gate with control z" if c.endswith("(control z)") else
                              "rescued (gate)" if c == f"L{gate[0]}H{gate[1]}" else
                              "rescued (band gate)" if band_gate and c == f"L{band_gate[0]}H{band_gate[1]}" else
                              "random head" for c in resc.condition]
    ctrl = C.behaviour(model, {"plain control": list(plain.pairs.control), "cipher control": list(both.pairs.control)},
                       max_new_tokens, progress=progress,
                       checkpoint=store.checkpoint("behaviour", {**key, "tokens": max_new_tokens}))
    sens = resc[resc.condition.isin(["plain", "cipher"])].assign(
        kind=lambda t: t.condition.map({"plain": "plain sensitive", "cipher": "cipher sensitive"}))
    beh = pd.concat([sens[ctrl.columns], ctrl], ignore_index=True)
    t2 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    for name, df in (("interchange.csv", summary), ("interchange_pairs.csv", per_pair), ("collapse.csv", coll),
                     ("rescue.csv", resc), ("behaviour.csv", beh)):
        atomic_write(out / name, lambda p, df=df: df.to_csv(p, index=False))
    n = len(plain)
    counts = resc.groupby("condition_kind").refused.sum()
    rand_rates = resc[resc.condition_kind == "random head"].groupby("condition").refused.mean()
    gsel = coll[coll.is_gate & (coll.positions == positions) & (coll.direction == "necessity")].set_index("arm")
    g, gc = gsel.loc["cipher"], gsel.loc["cipher_control"]
    manifest = {
        "model": model.name, "weights": model.meta.get("fingerprint", ""), "screen": str(screen_dir),
        "pairs_file": str(pairs_file), "pairs_hash": key["pairs"], "n_pairs": n, "positions": positions,
        "seed": seed, "cipher_seed": cipher.seed, "heads": [f"L{l}H{h}" for l, h in heads],
        "also_positions": [m for m in modes if m != positions],
        "gate": {"layer": gate[0], "head": gate[1], "collapse_abs": float(g.collapse_abs),
                 "collapse_signed": float(g.collapse_signed), "necessity_plain_nll": float(g.plain_nll),
                 "necessity_cipher_nll": float(g.arm_nll), "control_arm_collapse_abs": float(gc.collapse_abs),
                 "necessity_cipher_control_nll": float(gc.arm_nll)},
        "behaviour": {k: {"refused": int(v.refused.sum()), "refused_paper": int((v.response_paper == "refusal").sum()),
                          "n": len(v)} for k, v in beh.groupby("kind")},
        "mean_gap": {k: float(v.gap.mean()) for k, v in gaps.items()},
        "rescue": {"n": n, "max_new_tokens": max_new_tokens, "plain_refused": int(counts.get("plain", 0)),
                   "cipher_refused": int(counts.get("cipher", 0)), "rescued_refused": int(counts.get("rescued (gate)", 0)),
                   "control_z_refused": int(counts.get("gate with control z", 0)),
                   "band_gate": None if band_gate in (None, gate) else f"L{band_gate[0]}H{band_gate[1]}",
                   "band_gate_rescued_refused": int(counts["rescued (band gate)"]) if "rescued (band gate)" in counts else None,
                   "random_heads": [f"L{l}H{h}" for l, h in rand],
                   "random_refused_mean": float(rand_rates.mean() * n) if len(rand_rates) else None},
        "versions": package_versions(),
        "timings_s": {"interchange": round(t1 - t0, 1), "rescue": round(t2 - t1, 1), "total": round(time.time() - t0, 1)},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    text = json.dumps(manifest, indent=2)
    atomic_write(out / "manifest.json", lambda p: Path(p).write_text(text))
    return manifest


def cipher_line(manifest: dict) -> str:
    """The cipher stage's last output line."""
    g, r = manifest["gate"], manifest["rescue"]
    return (f"gate=L{g['layer']}H{g['head']} collapse_abs={g['collapse_abs']:.3f} collapse_signed={g['collapse_signed']:.3f} "
            f"plain_refused={r['plain_refused']}/{r['n']} cipher_refused={r['cipher_refused']}/{r['n']} "
            f"rescued_refused={r['rescued_refused']}/{r['n']} random_refused_mean="
            + ("na" if r["random_refused_mean"] is None else f"{r['random_refused_mean']:.2f}"))
