"""Builds notebooks/06_gate_amplifier.ipynb from the cells below (``python notebooks/drafts/make_06_gate_amplifier.py``);
``make figures NOTEBOOK=06`` then executes it. Edit the cells here, rebuild, re-execute."""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from nbtools import SETUP, build

cells = [
("md", '''
# 06 — The gate and its amplifiers: interchange over every head, and what output DLA misses

"How Alignment Routes" (Frank 2026, arXiv 2604.04385) finds refusal routed through a sparse circuit: a
mid-depth **gate** head, found by per-head *interchange*, feeds later **amplifier** heads, and the gate is
nearly invisible to output-level DLA. This notebook runs every experiment of that paper except the cipher
(notebook 07) on matched pairs, with the paper's NLL metric (`docs/methods.md`, "06_gate_amplifier"):

* **target tokens**: the control prompt's first ≤ 5 greedy reply tokens (special tokens dropped);
  **NLL(prompt)** = their mean teacher-forced NLL after the prompt; **gap** = NLL(sensitive) − NLL(control);
* **necessity** = NLL(sensitive) − NLL(sensitive with the head's `z` from the control run); **sufficiency**
  = NLL(control with `z` from the sensitive run) − NLL(control); both as % of the mean gap;
* **gate** = the head with the largest necessity % + sufficiency %.

The paper screened about ten DLA candidates per model; we screen **every** head. The exact interchange of
all 270 organism heads takes about ten minutes per alignment on two CPU cores, so by default the screen is
`method="attribution"`: a gradient (attribution-patching) estimate of necessity and sufficiency for every
head, one forward and backward per batch of pairs, then the exact interchange of its `TOP_K` best heads;
the gate is chosen among those confirmed heads. `make bench` runs both over all heads side by side and
records how well the estimate ranks them (`bench/RESULTS.md`). Set `METHOD = "exact"` to screen every head
exactly.

The two prompts of a pair have different lengths. Positions line up from the **end** by default (the
source run carries the same target tokens, so the template suffix, the last prompt position and the target
tokens line up) or from the **start** (the paper's code: the source prompt's positions copied onto the
target run's first positions, so a longer source overwrites the target's last positions and a shorter one
leaves them alone). We report the gate under both.
'''),
("params", '''
MODEL = "smollm2-135m-refusal"
DEVICE = "cpu"
DTYPE = "float32"
PAIRS = "../data/safety_pairs.csv"   # any CSV with sensitive / control columns
N_PAIRS = 16            # pairs, in a seeded order (the paper used 120)
ALIGN = "end"           # "end" (default) or "start" (the paper's code); the other is reported too
METHOD = "attribution"  # "attribution" (every head estimated, TOP_K confirmed exactly) or "exact"
TOP_K = 10
MAX_BATCH = 64
N_PERM = 10_000
N_BOOT = 1_000
N_AMPLIFIERS = 5        # knockout cascade: amplifiers = the top heads by |DLA| after the gate's layer
N_RANDOM = 20           # ... and the null: random heads from layers within +-2 of the gate
DOSE_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.5)   # alpha as a fraction of the residual norm
DOSE_TOKENS = 24
SEED = 0
'''),
("code", SETUP),
("md", '''
## The screen

`rc.screen.screen` is what `refusal-circuits screen` runs: it writes this model's screen folder under
`results/screen/<model>/` — `interchange.csv` (one row per head, with the `method` that produced it),
`attribution.csv` (the estimate for every head), `head_dla.csv`, `ablation.csv`, `pairs.csv`,
`manifest.json` — saving each sweep's parts as they finish, so the panel below and any script read the same
files, and a killed run resumes.
'''),
("code", '''
G, R = rc.gate, rc.routing
screen_dir = rc.paths.results_dir() / "screen" / model.slug
manifest = rc.screen.screen(model, PAIRS, screen_dir, n_pairs=N_PAIRS, align=ALIGN, method=METHOD, top_k=TOP_K,
                            seed=SEED, max_batch=MAX_BATCH, progress=False)
table = pd.read_csv(screen_dir / "interchange.csv").assign(
    combined=lambda t: t.necessity_pct + t.sufficiency_pct,
    label=lambda t: "L" + t.layer.astype(str) + "H" + t["head"].astype(str))
per_pair = pd.read_csv(screen_dir / "interchange_pairs.csv")
pairs = pd.read_csv(screen_dir / "pairs.csv")
head_dla = pd.read_csv(screen_dir / "head_dla.csv")
gp = G.prepare_pairs(model, G.load_pairs(PAIRS), n_pairs=N_PAIRS, seed=SEED)
gate = manifest["gate"]
gate_head = (gate["layer"], gate["head"])
gate_label = f"L{gate['layer']}H{gate['head']}"
pairs[["pair_id", "category", "sensitive", "control", "target", "gap"]].head(3)
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
diff_len = int((pairs.n_sensitive != pairs.n_control).sum())
print(f"{len(pairs)} pairs ({diff_len} with prompts of different token lengths); target tokens per pair: "
      f"{pairs.n_target.min()}–{pairs.n_target.max()}")
print(f"NLL gap (sensitive − control): mean {pairs.gap.mean():.2f}, positive for {(pairs.gap > 0).mean():.0%} of pairs")
print(f"screen: method={manifest['method']}, {manifest['n_exact_heads']} of {len(table)} heads by exact interchange")
'''),
("code", '''
fig = rc.plotting.distribution_figure(pairs.assign(kind="all pairs"), "gap", "kind", hover="sensitive",
        title=f"NLL gap per pair: the control's answer is less likely after the sensitive prompt — {model.name}",
        value_label="NLL(sensitive) − NLL(control)")
show(fig, "06_nll_gap", model.slug)
'''),
("md", '''
## Necessity and sufficiency of every head

Each cell is one query head (the slice of `hook_z`, the input of the output projection, that belongs to it:
SmolLM2's 9 query heads share 3 key/value heads). Exact values for the confirmed heads, the attribution
estimate elsewhere.
'''),
("code", '''
for col, label in (("necessity_pct", "necessity"), ("sufficiency_pct", "sufficiency")):
    fig = rc.plotting.heatmap(table, "head", "layer", col, colorbar="% of gap",
            title=f"Interchange {label} per head (% of the mean NLL gap, align={ALIGN}) — {model.name}",
            x_label="query head", y_label="layer")
    show(fig, f"06_interchange_{label}", model.slug).show()
'''),
("md", '''
### The estimate against the exact interchange, on the heads it picked

Attribution patching linearises each head's interchange around the run it patches. A single head's
interchange moves the NLL a little, so the linear estimate is usually close; where it is not (a head whose
effect is strongly non-linear), the exact confirmation decides.
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
if METHOD == "attribution":
    est = pd.read_csv(screen_dir / "attribution.csv")
    conf = table[table.method == "exact"].merge(est, on=["layer", "head"], suffixes=("", "_estimate"))
    conf = conf.sort_values("combined", ascending=False)
    print(f"the {len(conf)} heads the estimate ranked first, confirmed exactly (% of the gap, necessity + sufficiency):")
    for r in conf.itertuples():
        print(f"  {r.label:7s} estimate rank {r.rank:3d}: estimate {r.combined_estimate:6.2f}  exact {r.combined:6.2f}")
g = table[table.label == gate_label].iloc[0]
print(f"gate {gate_label}: necessity {g.necessity_pct:.2f}%, sufficiency {g.sufficiency_pct:.2f}% of the gap")
'''),
("md", '''
### Both alignments

The same screen with the other alignment (written to `results/screen-align/`, so the panel reads only the
default).
'''),
("code", '''
other = "start" if ALIGN == "end" else "end"
other_dir = rc.paths.results_dir() / "screen-align" / f"{model.slug}-{other}"
m_other = rc.screen.screen(model, PAIRS, other_dir, n_pairs=N_PAIRS, align=other, method=METHOD, top_k=TOP_K,
                           seed=SEED, max_batch=MAX_BATCH, ablation=False, progress=False)
t_other = pd.read_csv(other_dir / "interchange.csv").assign(combined=lambda t: t.necessity_pct + t.sufficiency_pct)
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
tops = {}
for align, t in ((ALIGN, table), (other, t_other)):
    t = t[t.method == "exact"].sort_values("combined", ascending=False)
    tops[align] = [f"L{l}H{h}" for l, h in zip(t.layer, t["head"])]
    print(f"align={align:5s} gate {tops[align][0]}: necessity {t.necessity_pct.iloc[0]:.2f}%, sufficiency "
          f"{t.sufficiency_pct.iloc[0]:.2f}%; next: " + ", ".join(
              f"{lab} ({n:.1f}+{s:.1f})" for lab, n, s in zip(tops[align][1:5], t.necessity_pct[1:5], t.sufficiency_pct[1:5])))
print(f"confirmed heads shared by the two alignments: {len(set(tops[ALIGN]) & set(tops[other]))} of {len(tops[ALIGN])}")
rc.reference.show("gate", {"gate": gate_label, "necessity %": gate["necessity_pct"]}, model.name,
                  model="google/gemma-2-2b-it")
'''),
("md", '''
## Is the gate real? Permutation test and bootstrap stability

A one-sided sign-flip permutation test of the gate's per-pair necessity (10,000 draws), and the share of
1,000 bootstrap resamples of the pairs in which the same head is the gate (and in the top 3) among the
exactly measured heads. The gate is the best of many heads, so its p-value is a per-head test, not
corrected for that selection.
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
exact_rows = per_pair[per_pair.method == "exact"]
nec = exact_rows[exact_rows.direction == "necessity"]
suf = exact_rows[exact_rows.direction == "sufficiency"]
gate_nec = nec[(nec.layer == gate["layer"]) & (nec["head"] == gate["head"])].effect.values
p = G.permutation_p(gate_nec, N_PERM, SEED)
stab = G.bootstrap_stability(nec, suf, pairs[["pair_id", "gap"]], gate_head, N_BOOT, SEED)
print(f"gate {gate_label}: necessity > 0 in {(gate_nec > 0).mean():.0%} of pairs; sign-flip permutation p = {p:.4f}")
print(f"bootstrap ({N_BOOT} resamples of the pairs, among {nec[['layer', 'head']].drop_duplicates().shape[0]} heads): "
      f"gate again {stab['gate_share']:.1%}, in the top 3 {stab['top3_share']:.1%}")
'''),
("md", '''
## What output DLA sees

Each head's output at the last prompt position, through the final norm linearised with that run's scale,
dotted with `mean(W_U[refusal tokens]) − W_U[answer]` (answer = the pair's first target token); score =
mean over pairs of DLA(sensitive) − DLA(control), bootstrap 95% intervals. The paper screened the top 20
heads by |DLA| in the 25–65% depth band; we rank every head and place each head's rank by |DLA| against its
rank by interchange — the paper's central figure.
'''),
("code", '''
ranks = table.merge(head_dla, on=["layer", "head"])
ranks["dla_rank"] = ranks.dla.abs().rank(ascending=False, method="first").astype(int)
ranks["interchange_rank"] = ranks.combined.rank(ascending=False, method="first").astype(int)
fig = rc.plotting.rank_scatter(ranks, "dla_rank", "interchange_rank", "label", gate_label,
        title=f"Rank by |output DLA| vs rank by interchange, every head (gate starred) — {model.name}",
        x_label="rank by |output DLA| (1 = largest)", y_label="rank by necessity % + sufficiency %")
show(fig, "06_dla_vs_interchange_rank", model.slug)
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
band = G.depth_band(model.n_layers)
in_band = ranks[ranks.layer.isin(band)].sort_values("dla_rank").head(20)
g_row = ranks[ranks.label == gate_label].iloc[0]
print(f"the paper's view: top 20 heads by |DLA| in layers L{band.start}–L{band.stop - 1} (25–65% depth): "
      + ", ".join(in_band.label.head(10)) + " …")
print(f"gate {gate_label}: rank {g_row.dla_rank} of {len(ranks)} by |DLA| (DLA {g_row.dla:+.3f}, 95% CI "
      f"{g_row.ci_lo:+.3f}…{g_row.ci_hi:+.3f}); in the paper's DLA candidate list: {gate_label in set(in_band.label)}")
print(f"Spearman correlation of the two rankings over all heads: "
      f"{ranks[['dla_rank', 'interchange_rank']].corr(method='spearman').iloc[0, 1]:.2f}")
rc.reference.show("gate_dla_rank", {"gate rank by |output DLA|": int(g_row.dla_rank), "n_heads": len(ranks)},
                  model.name)
'''),
("md", '''
## Per-head directional ablation

`d` = the mean difference (sensitive − control) of the residual stream entering layer `L // 2` at the last
prompt position (Hugging Face's `hidden_states[L // 2]`). For each head, `u_h = lstsq(W_O[h], d)`
normalised — the direction in that head's `z` space whose write best matches `d` — and
`z_h ← z_h − 5 (z_h · u_h) u_h` at every position: the component is removed and reversed fourfold.
Score = the NLL reduction of the control's answer after the sensitive prompt. The screen ablates the
paper's candidates (top 20 |DLA| heads in the depth band) and the confirmed interchange heads.
'''),
("code", '''
abl = pd.read_csv(screen_dir / "ablation.csv")
abl["label"] = "L" + abl.layer.astype(str) + "H" + abl["head"].astype(str)
fig = rc.plotting.bars(abl.head(15).assign(kind=np.where(abl.head(15).label == gate_label, "gate", "other head")),
        "label", "reduction", "kind",
        title=f"Per-head directional ablation along d (α = 5, all positions): NLL reduction — {model.name}",
        x_label="head (strongest 15 of the candidates)", y_label="NLL reduction on the sensitive prompts")
show(fig, "06_head_ablation", model.slug)
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
a_gate = abl[abl.label == gate_label].iloc[0]
print(f"{len(abl)} candidate heads; strongest ablation {abl.label[0]}: NLL reduction {abl.reduction[0]:.3f} "
      f"({abl.reduction_pct[0]:.1f}% of the gap)")
print(f"the gate {gate_label}: reduction {a_gate.reduction:.3f} ({a_gate.reduction_pct:.1f}% of the gap), rank {a_gate['rank']}")
rc.reference.show("ablation", {"top head": abl.label[0], "top NLL reduction": float(abl.reduction[0])}, model.name)
'''),
("md", '''
## Knockout cascade: does the gate feed the amplifiers?

Zero the gate's `z` at every position of both prompts and recompute the output DLA (sensitive − control)
of the **amplifiers** — the `N_AMPLIFIERS` heads with the largest |DLA| after the gate's layer; change % =
(KO − normal) / |normal|. The null knocks out instead each of `N_RANDOM` random heads from layers within
±2 of the gate (the amplifiers excluded). Statistic: the mean |change %| over the amplifiers.

A gate in the last layer has no heads after it to amplify it; then the cascade is run on the best
confirmed head of the paper's 25–65% depth band (the screen's `band_gate`, where the paper's gates lie).
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
band_gate = manifest["band_gate"]
if gate["layer"] < model.n_layers - 1:
    ko_head = gate_head
    print(f"knockout cascade on the gate {gate_label}")
else:
    ko_head = (band_gate["layer"], band_gate["head"])
    print(f"the gate {gate_label} is in the last layer, so the cascade runs on the best head of the paper's band "
          f"(L{band_gate['band'][0]}–L{band_gate['band'][1]}): L{ko_head[0]}H{ko_head[1]} (necessity "
          f"{band_gate['necessity_pct']:.2f}%, sufficiency {band_gate['sufficiency_pct']:.2f}%)")
ko_label = f"L{ko_head[0]}H{ko_head[1]}"
'''),
("code", '''
ko_key = {"pairs": list(map(str, gp.pairs.pair_id)), "gate": list(ko_head), "k": N_AMPLIFIERS,
          "n_random": N_RANDOM, "seed": SEED}
cascade = R.knockout_cascade(model, gp, ko_head, head_dla, k=N_AMPLIFIERS, n_random=N_RANDOM, seed=SEED,
                             checkpoint=store.checkpoint("knockout_cascade", ko_key), progress=False)
ko = R.cascade_summary(cascade)
fig = rc.plotting.bars(cascade[cascade.kind == "gate"].assign(kind="gate knocked out"), "amplifier", "change_pct",
        "kind", title=f"Amplifier DLA after knocking out {ko_label} — {model.name}",
        x_label="amplifier (top |DLA| after the gate's layer)", y_label="change in DLA (%)", hline=0)
show(fig, "06_knockout_amplifiers", model.slug).show()
null = cascade[cascade.kind == "random"].groupby("knocked").change_pct.apply(lambda x: x.abs().mean())
fig = rc.plotting.null_histogram(null, ko["gate_change_pct"], ko_label,
        title=f"Mean |change| of the amplifiers' DLA: {ko_label} vs {len(null)} random nearby heads — {model.name}",
        x_label="mean |change %| over the amplifiers", unit="random heads", nbins=20)
show(fig, "06_knockout_null", model.slug)
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
g_rows = cascade[cascade.kind == "gate"]
print("amplifiers: " + ", ".join(f"{a} ({c:+.1f}%)" for a, c in zip(g_rows.amplifier, g_rows.change_pct)))
print(f"{ko_label} knockout: mean |change| {ko['gate_change_pct']:.1f}%; {ko['suppressed']} of {ko['n_amplifiers']} "
      f"amplifiers suppressed; random heads {ko['random_mean_pct']:.1f} ± {ko['random_sd_pct']:.1f}% "
      f"(n = {ko['n_random']}); share of random heads at least as large: p = {ko['p_random_ge_gate']:.3f}")
rc.reference.show("knockout_cascade", {
    "amplifiers suppressed": f"{ko['suppressed']} of {ko['n_amplifiers']}",
    "amplifier suppression range %": "–".join(f"{v:.0f}" for v in ko["suppression_range_pct"]),
    "gate knockout change %": ko["gate_change_pct"], "random knockout change % (mean)": ko["random_mean_pct"],
    "random knockout change % (sd)": ko["random_sd_pct"]}, model.name, model="Qwen/Qwen3-8B")
rc.reference.show("knockout_cascade", {"gate knockout change %": ko["gate_change_pct"],
                                       "amplifiers": ", ".join(g_rows.amplifier)}, model.name, model="google/gemma-2-2b-it")
'''),
("md", '''
## Dose–response at the detection layer

Steer along the detection direction `d` (unit length) at `resid_pre[L // 2]`, every position, generated
tokens included: `−α·d` on the sensitive prompts (attenuation), `+α·d` on the controls (amplification).
The paper's grid is α ∈ {0, 5, …, 50} in its models' units; ours is α = fraction × the mean residual norm
at that layer and position, so the same fractions mean the same push on any model. Greedy generations,
scored by the substring rule; the raw text is kept.
'''),
("code", '''
det = R.detection_direction(model, gp)
dose_key = {"pairs": list(map(str, gp.pairs.pair_id)), "layer": det.layer, "fractions": list(DOSE_FRACTIONS),
            "tokens": DOSE_TOKENS}
dose = R.dose_response(model, gp, det, DOSE_FRACTIONS, DOSE_TOKENS,
                       checkpoint=store.checkpoint("dose_response", dose_key), progress=False)
rates = R.dose_summary(dose)
fig = rc.plotting.lines_with_band(dose.assign(refused=dose.refused.astype(float),
                                              arm=np.where(dose.kind == "sensitive", "sensitive − α·d", "control + α·d")),
        "fraction", "refused", "arm", band="sem",
        title=f"Dose–response at layer {det.layer}: refusal rate as d is removed or added — {model.name}",
        x_label="α / mean residual norm", y_label="refusal rate (substring score)")
show(fig, "06_dose_response", model.slug)
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
print(f"detection layer {det.layer}: mean residual norm {det.resid_norm:.1f}, |mean difference| {det.diff_norm:.1f}")
print(rates.pivot(index="fraction", columns="kind", values="refusal_rate").rename(
    columns={"sensitive": "sensitive − α·d", "control": "control + α·d"}).round(2).to_string())
n = rates.set_index(["kind", "fraction"])
count = lambda kind, f: f"{int(round(n.refusal_rate[kind, f] * n.n[kind, f]))}/{n.n[kind, f]}"
print(f"(the paper's α = 50 beside our largest fraction, {max(DOSE_FRACTIONS)} × the residual norm)")
rc.reference.show("dose_response", {
    "attenuation refused at α=0": count("sensitive", 0.0), "attenuation refused at α=50": count("sensitive", max(DOSE_FRACTIONS)),
    "amplification refused at α=0": count("control", 0.0), "amplification refused at α=50": count("control", max(DOSE_FRACTIONS))},
    model.name, model="Qwen/Qwen3-8B")
'''),
("code", '''
dose[(dose.fraction == max(DOSE_FRACTIONS))][["kind", "instruction", "completion", "refused"]].head(4)
'''),
("md", '''
## The panel

Every screen folder under `results/screen/` (this notebook's, and any written by `refusal-circuits screen`),
beside the paper's twelve published gates (layer counts, sizes and gates from `data/reference_numbers.csv`).
To add a model, run one screen per model — independent jobs, e.g. on a cluster:

    refusal-circuits screen --model Qwen/Qwen2.5-7B-Instruct --pairs data/safety_pairs.csv \\
        --out results/screen/Qwen--Qwen2.5-7B-Instruct --device cuda --dtype bfloat16
    refusal-circuits screen --model meta-llama/Llama-3.3-70B-Instruct ... --device auto   # several GPUs

and rerun this section. (The paper's necessity % comes from ~10 candidate heads per model and the `start`
alignment; ours from every head.)
'''),
("code", '''
ours = rc.screen.read_screens(rc.paths.results_dir() / "screen").assign(source="ours (every head)")
ref = rc.reference.reference_table()
wide = lambda exp: ref[ref.experiment == exp].pivot_table(index="model", columns="quantity", values="value", aggfunc="first")
paper = wide("panel").join(wide("gate")).join(wide("ablation")).reset_index()
paper = pd.DataFrame({"model": paper.model, "layers": paper.layers.astype(int), "heads": paper.heads.astype(int),
                      "params_b": paper["params (B)"].astype(float), "gate": paper.gate,
                      "gate_layer": paper.gate.str.extract(r"L(\\d+)H")[0].astype(int),
                      "necessity_pct": paper["necessity %"].astype(float),
                      "ablation_top_reduction": pd.to_numeric(paper["top NLL reduction"]),
                      "source": "paper (arXiv 2604.04385)"})
paper["gate_depth"] = paper.gate_layer / (paper.layers - 1)
panel = pd.concat([paper, ours[paper.columns.intersection(ours.columns)]], ignore_index=True)
for col, title, label in (
        ("gate_depth", "Gate depth as a fraction of the layers, by model size", "gate layer / (layers − 1)"),
        ("necessity_pct", "The gate's interchange necessity, by model size", "necessity (% of the NLL gap)"),
        ("ablation_top_reduction", "Strongest per-head directional ablation, by model size",
         "NLL reduction (strongest head)")):
    fig = rc.plotting.panel_figure(panel.dropna(subset=[col]), col, title=title, y_label=label)
    show(fig, f"06_panel_{col}", model.slug).show()
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
print(panel[["source", "model", "layers", "heads", "gate", "necessity_pct", "ablation_top_reduction"]]
      .round(3).fillna("—").to_string(index=False))
'''),
("md", '''
## What the organism reproduces

Point by point, our numbers beside the paper's. The organism is a 135M model fine-tuned to refuse, so
"not reproduced" is a finding about it, not a failure of the method.
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
def verdict(ok): return "reproduced" if ok else "not reproduced"
ref_nec = [float(v) for v in ref[(ref.experiment == "gate") & (ref.quantity == "necessity %")].value]
print(f"- one head stands out as the gate (bootstrap: the same gate in {stab['gate_share']:.0%} of resamples): "
      f"{verdict(stab['gate_share'] >= 0.5)}")
print(f"- its necessity is a few % of the gap (ours {gate['necessity_pct']:.1f}%; paper {min(ref_nec):.1f}–{max(ref_nec):.1f}%): "
      f"{verdict(0.5 <= gate['necessity_pct'] <= 20)}")
print(f"- the gate sits at mid depth or later (L{gate['layer']} of {model.n_layers}; the paper's gates at "
      f"{paper.gate_depth.min():.0%}–{paper.gate_depth.max():.0%} of the depth): {verdict(gate['layer'] / (model.n_layers - 1) >= 0.3)}")
print(f"- the gate is not a top output-DLA head (rank {g_row.dla_rank} of {len(ranks)}; Qwen3-8B's ~"
      f"{rc.reference.value('gate_dla_rank', 'gate rank by |output DLA|'):.0f} of "
      f"{rc.reference.value('gate_dla_rank', 'n_heads'):.0f}): {verdict(g_row.dla_rank > 20)}")
print(f"- the same gate under both alignments: {verdict(tops[ALIGN][0] == tops[other][0])}")
print(f"- knocking out {ko_label} suppresses most amplifiers ({ko['suppressed']} of {ko['n_amplifiers']}; Qwen3-8B "
      f"{rc.reference.value('knockout_cascade', 'amplifiers suppressed')}): {verdict(ko['suppressed'] > ko['n_amplifiers'] / 2)}")
print(f"- more than random nearby heads do (gate {ko['gate_change_pct']:.1f}% vs {ko['random_mean_pct']:.1f} ± "
      f"{ko['random_sd_pct']:.1f}%, p = {ko['p_random_ge_gate']:.3f}; Qwen3-8B 10.5% vs 3.9 ± 2.1%): "
      f"{verdict(ko['p_random_ge_gate'] <= 0.05)}")
r = rates.set_index(["kind", "fraction"]).refusal_rate
lo, hi = min(DOSE_FRACTIONS), max(DOSE_FRACTIONS)
peak = r["control"].idxmax()
print(f"- removing d lowers refusal on sensitive prompts ({r['sensitive', lo]:.0%} → {r['sensitive', hi]:.0%}): "
      f"{verdict(r['sensitive', hi] < r['sensitive', lo])}")
print(f"- adding d raises refusal on controls (α = 0: {r['control', lo]:.0%}; peak {r['control', peak]:.0%} at "
      f"{peak:g} × the norm; {r['control', hi]:.0%} at {hi:g}, where the text degrades): {verdict(r['control', peak] > r['control', lo])}")
'''),
]
build(Path(__file__).parents[1] / "06_gate_amplifier.ipynb", cells)
print("built")
