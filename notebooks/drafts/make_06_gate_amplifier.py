"""DRAFT of notebook 06 (gate-amplifier), not yet executed or committed as a notebook.

`python notebooks/drafts/make_06_gate_amplifier.py` writes notebooks/06_gate_amplifier.ipynb from the cells
below; `make figures NOTEBOOK=06` then executes it. It is not landed because, on 2 CPU cores, exact
interchange of all 270 organism heads over 32 pairs takes about 20 minutes per alignment (measured start of
a run: ~35 s per (8-pair batch, layer) part while another job shared the cores). The next step is the
attribution screen (`--method attribution`: every head by gradient, the top-k confirmed exactly), then the
knockout cascade, per-head ablation and dose-response sections.
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from nbtools import SETUP, build

cells = [
("md", '''
# 06 — The gate: interchange over every head, and what output DLA misses

"How Alignment Routes" (Frank 2026, arXiv 2604.04385) finds refusal routed through a sparse circuit: a
mid-depth **gate** head, found by per-head *interchange*, feeds later **amplifier** heads, and the gate is
nearly invisible to output-level DLA. This notebook runs the interchange screen on **every** head of the
model (the paper screened about ten DLA candidates per model), on structurally matched pairs, with the
paper's NLL metric (`docs/methods.md`, "06_gate_amplifier"):

* **target tokens**: the control prompt's first ≤ 5 greedy reply tokens (special tokens dropped);
  **NLL(prompt)** = their mean teacher-forced NLL after the prompt; **gap** = NLL(sensitive) − NLL(control);
* **necessity** = NLL(sensitive) − NLL(sensitive with the head's `z` from the control run); **sufficiency**
  = NLL(control with `z` from the sensitive run) − NLL(control); both as % of the mean gap;
* **gate** = the head with the largest necessity % + sufficiency %.

The two prompts of a pair have different lengths. Positions line up from the **end** by default (the
source run carries the same target tokens, so the template suffix, the last prompt position and the target
tokens line up) or from the **start** (the paper's code: the source prompt's positions copied onto the
target run's first positions, so a longer source overwrites the target's last positions and a shorter one
leaves them alone). We report the gate under both.

This is the first slice of the notebook: the knockout cascade, per-head directional ablation, the
dose–response and the attribution screen are not in it yet.
'''),
("params", '''
MODEL = "smollm2-135m-refusal"
DEVICE = "cpu"
DTYPE = "float32"
PAIRS = "../data/safety_pairs.csv"   # any CSV with sensitive / control columns
N_PAIRS = 32            # pairs, in a seeded order (the paper used 120)
ALIGN = "end"           # "end" (default) or "start" (the paper's code); the other is reported too
MAX_BATCH = 64
N_PERM = 10_000
N_BOOT = 1_000
TOP_K = 5
SEED = 0
'''),
("code", SETUP),
("md", '''
## The screen

`rc.screen.screen` is what `refusal-circuits screen` runs: it writes this model's screen folder
(`interchange.csv`, `head_dla.csv`, `pairs.csv`, `manifest.json`) under `results/screen/<model>/`, saving
the sweeps' parts as they finish, so the panel below and any script read the same files.
'''),
("code", '''
G = rc.gate
screen_dir = rc.paths.results_dir() / "screen" / model.slug
manifest = rc.screen.screen(model, PAIRS, screen_dir, n_pairs=N_PAIRS, align=ALIGN, seed=SEED,
                            max_batch=MAX_BATCH, progress=False)
table = pd.read_csv(screen_dir / "interchange.csv")
per_pair = pd.read_csv(screen_dir / "interchange_pairs.csv")
pairs = pd.read_csv(screen_dir / "pairs.csv")
head_dla = pd.read_csv(screen_dir / "head_dla.csv")
pairs[["pair_id", "category", "sensitive", "control", "target", "gap"]].head(3)
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
diff_len = int((pairs.n_sensitive != pairs.n_control).sum())
print(f"{len(pairs)} pairs ({diff_len} with prompts of different token lengths); target tokens per pair: "
      f"{pairs.n_target.min()}–{pairs.n_target.max()}")
print(f"NLL gap (sensitive − control): mean {pairs.gap.mean():.2f}, positive for {(pairs.gap > 0).mean():.0%} of pairs")
'''),
("code", '''
fig = rc.plotting.distribution_figure(pairs.assign(kind="all pairs"), "gap", "kind", hover="sensitive",
        title=f"NLL gap per pair: the control's answer is less likely after the sensitive prompt — {model.name}",
        value_label="NLL(sensitive) − NLL(control)")
show(fig, "06_nll_gap", model.slug)
'''),
("md", '''
## Necessity and sufficiency of every head
'''),
("code", '''
for col, label in (("necessity_pct", "necessity"), ("sufficiency_pct", "sufficiency")):
    fig = rc.plotting.heatmap(table, "head", "layer", col, colorbar="% of gap",
            title=f"Interchange {label} per head (% of the mean NLL gap, align={ALIGN}) — {model.name}",
            x_label="query head", y_label="layer")
    show(fig, f"06_interchange_{label}", model.slug).show()
'''),
("code", '''
other = "start" if ALIGN == "end" else "end"
gp = G.prepare_pairs(model, G.load_pairs(PAIRS), n_pairs=N_PAIRS, seed=SEED)
key = {"pairs": list(map(str, gp.pairs.pair_id)), "align": other}
nec_o = G.interchange(model, gp, "necessity", other, max_batch=MAX_BATCH, progress=False,
                      checkpoint=store.checkpoint("gate_necessity", key))
suf_o = G.interchange(model, gp, "sufficiency", other, max_batch=MAX_BATCH, progress=False,
                      checkpoint=store.checkpoint("gate_sufficiency", key))
summaries = {ALIGN: table.assign(combined=table.necessity_pct + table.sufficiency_pct),
             other: G.summarise(nec_o, suf_o, pairs[["pair_id", "gap"]])}
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
tops = {}
for align, s in summaries.items():
    s = s.sort_values("combined", ascending=False)
    tops[align] = [f"L{l}H{h}" for l, h in zip(s.layer, s["head"])]
    g = s.iloc[0]
    print(f"align={align:5s} gate L{g.layer}H{g['head']}: necessity {g.necessity_pct:.2f}%, sufficiency "
          f"{g.sufficiency_pct:.2f}%; top {TOP_K}: " + ", ".join(
              f"L{r.layer}H{r.head} ({r.necessity_pct:.1f}+{r.sufficiency_pct:.1f})" for r in s.head(TOP_K).itertuples()))
print(f"top-10 overlap between the two alignments: {len(set(tops[ALIGN][:10]) & set(tops[other][:10]))} of 10")
gate = manifest["gate"]
gate_label = f"L{gate['layer']}H{gate['head']}"
rc.reference.show("gate", {"gate": gate_label, "necessity %": gate["necessity_pct"]}, model.name,
                  model="google/gemma-2-2b-it");
'''),
("md", '''
## Is the gate real? Permutation test and bootstrap stability

A one-sided sign-flip permutation test of the gate's per-pair necessity (10,000 draws), and the share of
1,000 bootstrap resamples of the pairs in which the same head is the gate (and in the top 3). Note the
selection effect: the gate is the best of every head, so its permutation p-value is a per-head test.
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
nec = per_pair[per_pair.direction == "necessity"]
suf = per_pair[per_pair.direction == "sufficiency"]
gate_nec = nec[(nec.layer == gate["layer"]) & (nec["head"] == gate["head"])].effect.values
p = G.permutation_p(gate_nec, N_PERM, SEED)
stab = G.bootstrap_stability(nec, suf, pairs[["pair_id", "gap"]], (gate["layer"], gate["head"]), N_BOOT, SEED)
print(f"gate {gate_label}: necessity > 0 in {(gate_nec > 0).mean():.0%} of pairs; sign-flip permutation p = {p:.4f}")
print(f"bootstrap ({N_BOOT} resamples of the pairs): gate again {stab['gate_share']:.1%}, in the top 3 {stab['top3_share']:.1%}")
'''),
("md", '''
## What output DLA sees

Each head's output at the last prompt position, through the final norm linearised with that run's scale,
dotted with `mean(W_U[refusal tokens]) − W_U[answer]` (answer = the pair's first target token); score =
mean over pairs of DLA(sensitive) − DLA(control), bootstrap 95% intervals. The paper screened the top 20
heads by |DLA| in the 25–65% depth band; we rank every head, and place the gate's rank by |DLA| against its
rank by interchange.
'''),
("code", '''
ranks = table.assign(combined=table.necessity_pct + table.sufficiency_pct).merge(head_dla, on=["layer", "head"])
ranks["label"] = [f"L{l}H{h}" for l, h in zip(ranks.layer, ranks["head"])]
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
                  model.name);
'''),
("md", '''
## The panel

Every screen folder under `results/` (this notebook's, and any written by `refusal-circuits screen`),
beside the paper's twelve published gates (layer counts, sizes and gates from `data/reference_numbers.csv`).
To add a model, run one screen per model — independent jobs, e.g. on a cluster:

    refusal-circuits screen --model Qwen/Qwen2.5-7B-Instruct --pairs data/safety_pairs.csv \\
        --out results/screen/Qwen--Qwen2.5-7B-Instruct --device cuda --dtype bfloat16
    refusal-circuits screen --model meta-llama/Llama-3.3-70B-Instruct ... --device auto   # several GPUs

and rerun this cell. (The paper's necessity % comes from ~10 candidate heads per model and the
`start` alignment; ours from every head.)
'''),
("code", '''
ours = rc.screen.read_screens(rc.paths.results_dir()).assign(source="ours (every head)")
ref = rc.reference.reference_table()
paper = ref[ref.experiment == "panel"].pivot_table(index="model", columns="quantity", values="value", aggfunc="first")
gates = ref[(ref.experiment == "gate")].pivot_table(index="model", columns="quantity", values="value", aggfunc="first")
paper = paper.join(gates).reset_index()
paper = pd.DataFrame({"model": paper.model, "layers": paper.layers.astype(int), "heads": paper.heads.astype(int),
                      "params_b": paper["params (B)"].astype(float), "gate": paper.gate,
                      "gate_layer": paper.gate.str.extract(r"L(\\d+)H")[0].astype(int),
                      "necessity_pct": paper["necessity %"].astype(float), "source": "paper (arXiv 2604.04385)"})
paper["gate_depth"] = paper.gate_layer / (paper.layers - 1)
panel = pd.concat([paper, ours[paper.columns.intersection(ours.columns)]], ignore_index=True)
fig = rc.plotting.panel_figure(panel, "gate_depth", title="Gate depth as a fraction of the layers, by model size",
                               y_label="gate layer / (layers − 1)")
show(fig, "06_panel_gate_depth", model.slug).show()
fig = rc.plotting.panel_figure(panel, "necessity_pct", title="The gate's interchange necessity, by model size",
                               y_label="necessity (% of the NLL gap)")
show(fig, "06_panel_necessity", model.slug)
'''),
("code", '''
# NBVAL_CHECK_OUTPUT
print(panel[["source", "model", "layers", "heads", "gate", "necessity_pct"]].round(2).to_string(index=False))
'''),
("md", '''
## What the organism reproduces (so far)
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
'''),
]
build(Path(__file__).parents[1] / "06_gate_amplifier.ipynb", cells)
print("built")
