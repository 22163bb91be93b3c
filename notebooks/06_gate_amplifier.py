# %% [markdown]
# # 06 — The gate and its amplifiers: interchange over every head, and what output DLA misses
#
# "How Alignment Routes" (Frank 2026, arXiv 2604.04385) finds refusal routed through a sparse circuit: a
# mid-depth **gate** head, found by per-head *interchange*, feeds later **amplifier** heads, and the gate is
# nearly invisible to output-level DLA. This notebook runs every experiment of that paper except the cipher
# (notebook 07) on matched pairs, with the paper's NLL metric (`docs/methods.md`, "06_gate_amplifier"):
#
# * **target tokens**: the control prompt's first ≤ 5 greedy reply tokens (special tokens dropped);
#   **NLL(prompt)** = their mean teacher-forced NLL after the prompt; **gap** = NLL(sensitive) − NLL(control);
# * **necessity** = NLL(sensitive) − NLL(sensitive with the head's `z` from the control run); **sufficiency**
#   = NLL(control with `z` from the sensitive run) − NLL(control); both as % of the mean gap;
# * **gate** = the head with the largest necessity % + sufficiency %.
#
# **Which positions are swapped** is a named choice (`rc.engine.POSITIONS`). By default (`prompt`) the two
# prompts are aligned from their ends and only *prompt* positions are swapped: both runs read the same target
# tokens with their own activations, so a head is credited only for what it carries out of the prompt. We
# also report `last` (only the last prompt position, where the decision is read), `paper` (the paper's code:
# the source prompt copied onto the first positions of the target run, counted from the start) and, as a
# diagnostic, `answer` (target-token positions swapped too — our old default, which credits heads that merely
# continue the answer in progress).
#
# The paper screened about ten DLA candidates per model; we screen **every** head: an attribution-patching
# estimate for all of them, then the exact interchange of every head that could matter — the estimate's
# `TOP_K` best *and* its `BOTTOM_K` most negative — on `N_PAIRS` pairs. The gate is chosen among the exact
# heads; `refusal-circuits screen --method exact` gives every head exactly.

# %% tags=["parameters"]
MODEL = "smollm2-135m-refusal"
DEVICE = "cpu"
DTYPE = "float32"
PAIRS = "../data/safety_pairs.csv"   # any CSV with sensitive / control columns
N_PAIRS = 48            # pairs, in a seeded order (the paper used 120)
POSITIONS = "prompt"    # which positions the interchange swaps: prompt (default), last, paper, answer
COMPARE = ("last", "paper")   # the other position modes reported beside it (top TOP_K exact each)
METHOD = "attribution"  # "attribution" (every head estimated, the top and bottom confirmed exactly) or "exact"
TOP_K = 10
BOTTOM_K = 5
MAX_BATCH = 64
N_PERM = 10_000         # sign flips of the family-wise permutation test
N_BOOT = 2_000          # bootstrap resamples (stability, margins)
STABLE_K = 5            # size of the top set whose stability is reported
N_AMPLIFIERS = 5        # knockout cascade: amplifiers per rule
N_RANDOM = 100          # ... and the null: random heads from layers near the gate
N_KO_PAIRS = 16         # pairs for the knockout (the paper's null used 20)
DOSE_FRACTIONS = (0.0, 0.1, 0.2, 0.3)   # alpha as a fraction of the residual norm
DOSE_PAPER_FRACTION = 0.2               # the paper's steering site, at one fraction
DOSE_PAIRS = 16
DOSE_TOKENS = 64
SEED = 0

# %%
# %load_ext autoreload
# %autoreload 2
from pathlib import Path
import numpy as np, pandas as pd, torch
import refusal_circuits as rc
from refusal_circuits.plotting import show
model, store = rc.open_notebook(MODEL, DEVICE, DTYPE, SEED)

# %% [markdown]
# ## The screen
#
# `rc.screen.screen` is what `refusal-circuits screen` runs: it writes this model's screen folder under
# `results/screen/<model>/` — `interchange.csv` (one row per head, with the `method` that produced it and the
# family-wise p of the exact heads), `attribution.csv`, `head_dla.csv`, `ablation.csv`, `pairs.csv`,
# `manifest.json` (with the statistics) — saving each sweep's parts as they finish, so the panel below and
# any script read the same files, and a killed run resumes.

# %%
G, R = rc.gate, rc.routing
screen_dir = rc.paths.results_dir() / "screen" / model.slug
manifest = rc.screen.screen(model, PAIRS, screen_dir, n_pairs=N_PAIRS, positions=POSITIONS, method=METHOD,
                            top_k=TOP_K, bottom_k=BOTTOM_K, n_perm=N_PERM, n_boot=N_BOOT, stable_k=STABLE_K,
                            seed=SEED, max_batch=MAX_BATCH, progress=False)
label = lambda t: t.assign(label="L" + t.layer.astype(str) + "H" + t["head"].astype(str))
table = label(pd.read_csv(screen_dir / "interchange.csv").assign(
    combined=lambda t: t.necessity_pct + t.sufficiency_pct, exact=lambda t: t.method == "exact"))
per_pair = pd.read_csv(screen_dir / "interchange_pairs.csv")
pairs = pd.read_csv(screen_dir / "pairs.csv")
head_dla = pd.read_csv(screen_dir / "head_dla.csv")
gp = G.prepare_pairs(model, G.load_pairs(PAIRS), n_pairs=N_PAIRS, seed=SEED)
gate = manifest["gate"]
gate_head = (gate["layer"], gate["head"])
gate_label = f"L{gate['layer']}H{gate['head']}"
pairs[["pair_id", "category", "sensitive", "control", "target", "gap"]].head(3)

# %%
# NBVAL_CHECK_OUTPUT
diff_len = int((pairs.n_sensitive != pairs.n_control).sum())
print(f"{len(pairs)} pairs ({diff_len} with prompts of different token lengths); target tokens per pair: "
      f"{pairs.n_target.min()}–{pairs.n_target.max()}")
print(f"NLL gap (sensitive − control): mean {pairs.gap.mean():.2f}, positive for {(pairs.gap > 0).mean():.0%} of pairs")
print(f"screen: positions={manifest['positions']}, method={manifest['method']}, {manifest['n_exact_heads']} of "
      f"{len(table)} heads by exact interchange (the estimate's top {TOP_K} and bottom {BOTTOM_K}, and the best of the "
      f"paper's depth band)")

# %%
fig = rc.plotting.distribution_figure(pairs.assign(kind="all pairs"), "gap", "kind", hover="sensitive",
        title=f"NLL gap per pair — {model.name}", value_label="NLL(sensitive) − NLL(control)")
show(fig, "06_nll_gap", model.slug)

# %% [markdown]
# ## Necessity and sufficiency of every head
#
# Each cell is one query head (the slice of `hook_z`, the input of the output projection, that belongs to it:
# on a grouped-query model several query heads share one key/value head, and each is scored). Squares mark the exact values; the other cells are the
# attribution estimate.

# %%
for col, name in (("necessity_pct", "necessity"), ("sufficiency_pct", "sufficiency")):
    fig = rc.plotting.heatmap(table, "head", "layer", col, colorbar="% of gap", marked="exact", marked_name="exact interchange",
            title=f"Interchange {name} per head (% of the mean NLL gap, positions={POSITIONS}) — {model.name}",
            x_label="query head", y_label="layer")
    show(fig, f"06_interchange_{name}", model.slug).show()

# %% [markdown]
# ### The estimate against the exact interchange
#
# Attribution patching linearises each head's interchange around the run it patches; the exact confirmation
# decides. The bottom of the estimate is confirmed too: a head whose swap *raises* the refusal NLL matters as
# much to the routing picture as one that lowers it.

# %%
# NBVAL_CHECK_OUTPUT
est = pd.read_csv(screen_dir / "attribution.csv")
conf = label(table[table.exact].merge(est, on=["layer", "head"], suffixes=("", "_estimate"))).sort_values(
    "combined", ascending=False)
print(f"{len(conf)} heads confirmed exactly (% of the gap, necessity + sufficiency; family-wise p):")
for r in conf.itertuples():
    print(f"  {r.label:7s} estimate rank {r.rank:3d}: estimate {r.combined_estimate:6.2f}  exact {r.combined:6.2f}"
          f"  (necessity {r.necessity_pct:6.2f}, sufficiency {r.sufficiency_pct:6.2f})  p_fwer {r.p_fwer:.4f}")
print(f"Spearman correlation of estimate and exact over these heads: "
      f"{conf[['combined', 'combined_estimate']].corr(method='spearman').iloc[0, 1]:.2f}")

# %% [markdown]
# ## Which positions? The gate under `prompt`, `last`, `paper` and the `answer` diagnostic
#
# The same screen with the other position modes (written to `results/screen-positions/`, so the panel reads
# only the default), each with its own estimate and its top `TOP_K` confirmed exactly. For the diagnostic we
# swap the target positions too on the default's confirmed heads (and the diagnostic's own top five) and
# report the share of each head's effect that comes from the target positions.

# %%
modes = {POSITIONS: (manifest, table)}
for pos in COMPARE:
    d = rc.paths.results_dir() / "screen-positions" / f"{model.slug}-{pos}"
    m = rc.screen.screen(model, PAIRS, d, n_pairs=N_PAIRS, positions=pos, method=METHOD, top_k=TOP_K, bottom_k=0,
                         n_perm=N_PERM, n_boot=N_BOOT, stable_k=STABLE_K, seed=SEED, max_batch=MAX_BATCH,
                         ablation=False, progress=False)
    modes[pos] = (m, label(pd.read_csv(d / "interchange.csv").assign(
        combined=lambda t: t.necessity_pct + t.sufficiency_pct)))
gap = pairs[["pair_id", "gap"]]
est_answer = G.summarise(*(G.attribution(model, gp, d, "answer", progress=False) for d in ("necessity", "sufficiency")), gap)
diag_heads = sorted({(int(l), int(h)) for l, h in zip(conf.layer, conf["head"])}
                    | {(int(l), int(h)) for l, h in zip(est_answer.layer[:5], est_answer["head"][:5])})
diag_key = {"pairs": list(map(str, gp.pairs.pair_id)), "heads": diag_heads}
answer = G.summarise(*(G.interchange(model, gp, d, "answer", heads=diag_heads, max_batch=MAX_BATCH, progress=False,
                                     checkpoint=store.checkpoint(f"answer_{d}", diag_key))
                       for d in ("necessity", "sufficiency")), gap)

# %%
# NBVAL_CHECK_OUTPUT
tops = {}
for pos, (m, t) in modes.items():
    t = t[t.method == "exact"].sort_values("combined", ascending=False)
    tops[pos] = list(t.label[:TOP_K])
    st = m["statistics"]
    print(f"positions={pos:6s} gate {tops[pos][0]} (necessity {t.necessity_pct.iloc[0]:.1f}%, sufficiency "
          f"{t.sufficiency_pct.iloc[0]:.1f}%, p_fwer {st['gate_p_fwer']:.4f}); top {TOP_K}: " + ", ".join(tops[pos]))
same = int((pairs.n_sensitive == pairs.n_control).sum())
print(f"(prompt and paper swap exactly the same positions on the {same} of {len(pairs)} pairs whose prompts have equal "
      f"token lengths; they differ only on the other {len(pairs) - same})")
for pos in COMPARE:
    print(f"  {pos}: shares {len(set(tops[pos]) & set(tops[POSITIONS]))} of the top {TOP_K} with {POSITIONS}; "
          f"new: {', '.join(sorted(set(tops[pos]) - set(tops[POSITIONS]))) or 'none'}")
ans = label(answer).sort_values("combined", ascending=False)
print(f"positions=answer (diagnostic) gate among {len(ans)} heads: {ans.label.iloc[0]} ({ans.combined.iloc[0]:.1f}%); "
      f"top 5: " + ", ".join(f"{l} ({c:.1f})" for l, c in zip(ans.label[:5], ans.combined[:5])))

# %%
# NBVAL_CHECK_OUTPUT
have = set(zip(conf.layer, conf["head"]))
missing = [h for h in diag_heads if h not in have]     # the diagnostic's own top heads, not yet exact under POSITIONS
in_diag = np.array([(l, h) in set(diag_heads) for l, h in zip(per_pair.layer, per_pair["head"])])
exact_rows = per_pair[(per_pair.method == "exact").values & in_diag]
more = {d: G.interchange(model, gp, d, POSITIONS, heads=missing, max_batch=MAX_BATCH, progress=False,
                         checkpoint=store.checkpoint(f"prompt_{d}", {**diag_key, "heads": missing}))
        if missing else exact_rows.iloc[:0] for d in ("necessity", "sufficiency")}
exact_prompt = G.summarise(*(pd.concat([exact_rows[exact_rows.direction == d], more[d]], ignore_index=True)
                             for d in ("necessity", "sufficiency")), gap)
share = label(G.target_share(exact_prompt, answer))
print("share of each head's answer-diagnostic effect that comes from swapping the target positions:")
for r in share.head(8).itertuples():
    print(f"  {r.label:7s} answer {r.combined_answer:6.2f}%  prompt only {r.combined_prompt:6.2f}%  "
          f"from target positions {r.target_share:6.0%}  (layer {r.layer} of {model.n_layers})")

# %% [markdown]
# ## Is the gate real, and does it stand out?
#
# Three tests over the exactly measured heads (`rc.gate.gate_statistics`), each of which can fail:
#
# * **family-wise permutation test** (the paper's kind): per pair, the head's combined score; one random sign
#   per pair flips every head's score at once, and a head's p is the share of 10,000 flips whose *largest*
#   head mean reaches it (max-T: corrected for having picked the best of many heads; with 48 pairs the
#   smallest p it can give is 1/10,001);
# * **stability** of the top-5 set: mean Jaccard index against the full-sample set over 2,000 bootstrap
#   resamples of the pairs (the paper: 1.0 for interchange on Qwen3-8B), and how often the gate comes first;
# * **stands out**: the gate's combined score minus the runner-up's, with a paired bootstrap 95% interval; the
#   gate stands out only if the interval excludes zero.

# %%
# NBVAL_CHECK_OUTPUT
st = manifest["statistics"]
print(f"gate {st['gate']} vs runner-up {st['runner_up']} among {st['n_heads']} exact heads, {st['n_pairs']} pairs")
print(f"family-wise permutation p of the gate: {st['gate_p_fwer']:.4f}; heads with p_fwer ≤ 0.05: {st['n_significant_fwer_05']}")
print(f"(uncorrected sign-flip p of the gate's necessity alone: {st['gate_necessity_p_sign_flip']:.4f})")
print(f"top-{st['k']} stability: mean Jaccard {st['jaccard_mean']:.2f} (95% {st['jaccard_lo']:.2f}–{st['jaccard_hi']:.2f}), "
      f"identical set in {st['identical_share']:.0%}, gate first in {st['first_share']:.0%} of {st['n_boot']} resamples")
print(f"margin over the runner-up: {st['margin_pct']:.2f} points of the gap (95% {st['margin_lo']:.2f}…{st['margin_hi']:.2f}): "
      f"{'stands out' if st['stands_out'] else 'does not stand out'}")
rc.reference.show("statistics", {"family-wise permutation p (gate)": st["gate_p_fwer"],
                                 "bootstrap Jaccard (interchange top set)": st["jaccard_mean"],
                                 "n permutations": st["n_perm"], "bootstrap resamples": st["n_boot"]},
                  model.name, model="Qwen/Qwen3-8B")

# %% [markdown]
# ## What output DLA sees
#
# Each head's output at the last prompt position, through the final norm linearised with that run's scale,
# dotted with `mean(W_U[refusal tokens]) − W_U[answer]`; score = mean over pairs of DLA(sensitive) −
# DLA(control), bootstrap 95% intervals. The paper screened the top 20 heads by |DLA| in the 25–65% depth
# band; we rank every head and place each head's rank by |DLA| against its rank by interchange (exact heads
# and estimates together).

# %%
ranks = table.merge(head_dla, on=["layer", "head"])
ranks["dla_rank"] = ranks.dla.abs().rank(ascending=False, method="first").astype(int)
ranks["interchange_rank"] = ranks.combined.rank(ascending=False, method="first").astype(int)
fig = rc.plotting.rank_scatter(ranks, "dla_rank", "interchange_rank", "label", gate_label,
        title=f"Rank by |output DLA| vs rank by interchange (gate starred) — {model.name}",
        x_label="rank by |output DLA| (1 = largest)", y_label="rank by necessity % + sufficiency %")
show(fig, "06_dla_vs_interchange_rank", model.slug)

# %%
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

# %% [markdown]
# ## Per-head directional ablation
#
# `d` = the mean difference (sensitive − control) of the residual stream entering layer `L // 2` at the last
# prompt position. For each head, `u_h = lstsq(W_O[h], d)` normalised, and `z_h ← z_h − 5 (z_h · u_h) u_h` at
# every position; score = the NLL reduction of the control's answer after the sensitive prompt. The screen
# ablates the paper's candidates (top 20 |DLA| heads in the depth band) and the top interchange heads.

# %%
has_ablation = (screen_dir / "ablation.csv").exists()
if has_ablation:
    abl = label(pd.read_csv(screen_dir / "ablation.csv"))
    fig = rc.plotting.bars(abl.head(15).assign(kind=np.where(abl.head(15).label == gate_label, "gate", "other head")),
            "label", "reduction", "kind", title=f"Per-head directional ablation along d (α = 5): NLL reduction — {model.name}",
            x_label="head (strongest 15 of the candidates)", y_label="NLL reduction on the sensitive prompts")
    show(fig, "06_head_ablation", model.slug).show()
else:
    abl = None
    print("not testable here: the screen has no per-head ablation ("
          + ((manifest.get("ablation") or {}).get("skipped") or "it was not run") + ")")

# %%
# NBVAL_CHECK_OUTPUT
if abl is not None:
    a_gate = abl[abl.label == gate_label].iloc[0]
    print(f"{len(abl)} candidate heads; strongest ablation {abl.label[0]}: NLL reduction {abl.reduction[0]:.3f} "
          f"({abl.reduction_pct[0]:.1f}% of the gap)")
    print(f"the gate {gate_label}: reduction {a_gate.reduction:.3f} ({a_gate.reduction_pct:.1f}% of the gap), rank {a_gate['rank']}")
    rc.reference.show("ablation", {"top head": abl.label[0], "top NLL reduction": float(abl.reduction[0])}, model.name)

# %% [markdown]
# ## Knockout cascade: does the declared gate feed the amplifiers?
#
# Zero the gate's `z` at every position of both prompts and recompute the output DLA (sensitive − control) of
# its amplifiers; change % = (KO − normal) / |normal|. Amplifiers by two rules: **ours**, the top |DLA| heads
# *after* the gate's layer, and **the paper's kind**, the top |DLA| heads of its 25–65% depth band either side
# of the gate (its published amplifiers were picked by hand from that band). "Suppressed" is counted both
# ways: change % < 0 (the paper's count) and |DLA| moved toward zero. The null knocks out `N_RANDOM` random
# heads of the layers nearest the gate instead (the window widens until it holds them). Statistic: the mean
# |change %| over the amplifiers; p = (1 + #null ≥ gate) / (1 + #null). A rule with no amplifier (a gate in
# the last layer has nothing after it) is reported as not testable.

# %%
ko_gp = gp.subset(range(min(N_KO_PAIRS, len(gp))))
ko_key = {"pairs": list(map(str, ko_gp.pairs.pair_id)), "gate": list(gate_head), "k": N_AMPLIFIERS,
          "n_random": N_RANDOM, "seed": SEED}
cascade = R.knockout_cascade(model, ko_gp, gate_head, head_dla, k=N_AMPLIFIERS, n_random=N_RANDOM, seed=SEED,
                             checkpoint=store.checkpoint("knockout_cascade", ko_key), progress=False)
ko = {rule: R.cascade_summary(cascade, rule) for rule in R.AMPLIFIER_RULES}
rule = "after_gate" if ko["after_gate"]["testable"] else "paper_band"
g_rows = cascade[(cascade.kind == "gate") & (cascade.rule == rule)]
fig = rc.plotting.bars(g_rows.assign(kind=f"{gate_label} knocked out"), "amplifier", "change_pct", "kind",
        title=f"Amplifier DLA after knocking out the gate {gate_label} ({rule} amplifiers) — {model.name}",
        x_label="amplifier", y_label="change in DLA (%)", hline=0)
show(fig, "06_knockout_amplifiers", model.slug).show()
null = cascade[(cascade.kind == "random") & (cascade.rule == rule)].groupby("knocked").change_pct.apply(lambda x: x.abs().mean())
fig = rc.plotting.null_histogram(null, ko[rule]["gate_change_pct"], gate_label,
        title=f"Mean |change| of the amplifiers' DLA: {gate_label} vs {len(null)} random nearby heads — {model.name}",
        x_label="mean |change %| over the amplifiers", unit="random heads", nbins=25)
show(fig, "06_knockout_null", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
for r, k in ko.items():
    if not k["testable"]:
        print(f"{r}: not testable here (the gate {gate_label} is in layer {gate['layer']} of {model.n_layers}: no amplifier by this rule)")
        continue
    rows = cascade[(cascade.kind == "gate") & (cascade.rule == r)]
    print(f"{r}: amplifiers " + ", ".join(f"{a} ({c:+.1f}%)" for a, c in zip(rows.amplifier, rows.change_pct)))
    print(f"  gate knockout: mean |change| {k['gate_change_pct']:.1f}%; suppressed {k['suppressed_signed']} of "
          f"{k['n_amplifiers']} by sign, {k['suppressed_abs']} by |DLA|; null {k['random_mean_pct']:.1f} ± "
          f"{k['random_sd_pop_pct']:.1f}% (population sd, n = {k['n_random']}); p = {k['p_random_ge_gate']:.3f}")
rc.reference.show("knockout_cascade", {
    "amplifiers suppressed": f"{ko[rule]['suppressed_signed']} of {ko[rule]['n_amplifiers']}",
    "gate knockout change %": ko[rule]["gate_change_pct"], "random knockout change % (mean)": ko[rule]["random_mean_pct"],
    "random knockout change % (sd)": ko[rule]["random_sd_pop_pct"]}, model.name, model="Qwen/Qwen3-8B")

# %% [markdown]
# ## Dose–response along the detection direction
#
# Steer along `d` (unit length): `−α·d` on the sensitive prompts (attenuation), `+α·d` on the controls
# (amplification), at every position, generated tokens included, `DOSE_TOKENS` greedy tokens. Ours adds to
# the residual *entering* `L // 2`, where `d` was measured; the paper's code adds to that layer's *output*
# (`resid_pre[L // 2 + 1]`), which we run at one fraction beside it. α = fraction × the mean residual norm
# there, so the same fractions mean the same push on any model (the paper's grid is α ∈ {0, 5, …, 50} in its
# models' units). Every generation is classed **refusal / compliance / degenerate**
# (`rc.routing.classify_generations`): degenerate = empty, more than half its word 3-grams repeated, or a mean
# per-token NLL above 4 nats under the unsteered model — broken text is never counted as "refusal removed".

# %%
det = R.detection_direction(model, gp)
dose_gp = gp.subset(range(min(DOSE_PAIRS, len(gp))))
dose_key = {"pairs": list(map(str, dose_gp.pairs.pair_id)), "layer": det.layer, "fractions": list(DOSE_FRACTIONS),
            "tokens": DOSE_TOKENS}
dose = R.dose_response(model, dose_gp, det, DOSE_FRACTIONS, DOSE_TOKENS,
                       checkpoint=store.checkpoint("dose_response", dose_key), progress=False)
dose_paper = R.dose_response(model, dose_gp, det, (DOSE_PAPER_FRACTION,), DOSE_TOKENS, at="paper",
                             checkpoint=store.checkpoint("dose_response_paper", {**dose_key, "fractions": [DOSE_PAPER_FRACTION]}),
                             progress=False)
classed = lambda df: pd.concat([df.reset_index(drop=True), R.classify_generations(model, list(df.instruction), list(df.completion))], axis=1)
dose, dose_paper = classed(dose), classed(dose_paper)
rates = R.dose_summary(dose)
fig = rc.plotting.lines_with_band(dose.assign(refused=(dose.response == "refusal").astype(float),
                                              arm=np.where(dose.kind == "sensitive", "sensitive − α·d", "control + α·d")),
        "fraction", "refused", "arm", band="sem",
        title=f"Dose–response at layer {det.layer}: share classed refusal — {model.name}",
        x_label="α / mean residual norm", y_label="share of generations classed refusal")
show(fig, "06_dose_response", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
print(f"detection layer {det.layer}: mean residual norm {det.resid_norm:.1f}, |mean difference| {det.diff_norm:.1f}")
print(rates.set_index(["kind", "fraction"])[["refusal_rate", "refusal", "compliance", "degenerate"]].round(2).to_string())
pr = R.dose_summary(dose_paper).set_index("kind")
print(f"the paper's site (output of layer {det.layer}) at {DOSE_PAPER_FRACTION}: sensitive refusal {pr.refusal['sensitive']:.2f} "
      f"(degenerate {pr.degenerate['sensitive']:.2f}), control refusal {pr.refusal['control']:.2f} (degenerate {pr.degenerate['control']:.2f})")
n = rates.set_index(["kind", "fraction"])
count = lambda kind, f: f"{int(round(n.refusal[kind, f] * n.n[kind, f]))}/{n.n[kind, f]}"
rc.reference.show("dose_response", {
    "attenuation refused at α=0": count("sensitive", 0.0), "attenuation refused at α=50": count("sensitive", max(DOSE_FRACTIONS)),
    "amplification refused at α=0": count("control", 0.0), "amplification refused at α=50": count("control", max(DOSE_FRACTIONS))},
    model.name, model="Qwen/Qwen3-8B")

# %%
dose[(dose.fraction == max(DOSE_FRACTIONS))][["kind", "instruction", "completion", "response", "nll"]].head(4)

# %% [markdown]
# ## Where this notebook meets 02 and 04
#
# Notebook 04 classes heads by their attention on the toy pairs (a **direct** head attends from the last
# position to the subject); notebook 02's `r̂` is a difference of means like the detection direction `d`
# here, but on other prompts and at another layer. Are the gate and the top interchange heads direct heads,
# and how close are the two directions?

# %%
# NBVAL_CHECK_OUTPUT
toy = rc.align_pairs(model, rc.load_toy_pairs())
top_heads = table[table.exact].sort_values("combined", ascending=False).head(5)
meet_layers = sorted({int(l) for l in top_heads.layer} | {gate["layer"]})
meet = rc.heads.classify_heads(rc.heads.summarise_scores(rc.heads.head_scores(model, toy, meet_layers)))
meet = meet.assign(label="L" + meet.layer.astype(str) + "H" + meet["head"].astype(str)).set_index("label")
for lab in dict.fromkeys([gate_label, *top_heads.label]):
    r = meet.loc[lab]
    print(f"{lab}{' (gate)' if lab == gate_label else ''}: notebook 04's class {r['class']} "
          f"(direct {r.direct_mean:.2f}, diagonal {r.diagonal_mean:.2f}, BOS {r.BOS_mean:.2f})")
r_hat = rc.stages.refusal_direction(model, store)
cos_d = float(torch.nn.functional.cosine_similarity(det.direction.float(), r_hat.unit.float().cpu(), dim=0))
print(f"cos(d at L{det.layer}, notebook 02's r̂ at L{r_hat.layer}) = {cos_d:.2f}")

# %% [markdown]
# ## The panel
#
# Our screens beside the paper's twelve published gates (layer counts, sizes and gates from
# `data/reference_numbers.csv`). Ours are the committed screen folders in `data/screens/` (tables and
# manifests, no weights, as the paper ships its saved results: the organism's exact screen of every head and
# the two real Qwen2.5-Coder-Instruct models', each with its `cipher/` stage) and every folder under
# `results/screen/` — this notebook's own screen, which replaces the committed one of the same weights, and
# any written by `refusal-circuits screen`. To add a model, run one screen per model (independent jobs, e.g.
# on a cluster):
#
#     refusal-circuits screen --model Qwen/Qwen2.5-7B-Instruct --pairs data/safety_pairs.csv \\
#         --out results/screen/Qwen--Qwen2.5-7B-Instruct --device cuda --dtype bfloat16
#     refusal-circuits screen --model meta-llama/Llama-3.3-70B-Instruct ... --device auto   # several GPUs
#
# and rerun this section. (The paper's necessity % comes from ~10 candidate heads per model and its `paper`
# positions; ours from every head or from attribution with exact confirmation, `prompt` positions.)

# %%
screens_committed = rc.paths.DATA_DIR / "screens"
ours = rc.screen.read_screens([screens_committed, rc.paths.results_dir() / "screen"])
ours["source"] = ["ours (this notebook)" if Path(f).resolve() == screen_dir.resolve() else
                  "ours (results/screen)" if f.startswith(str(rc.paths.results_dir())) else "ours (committed screens)"
                  for f in ours.folder]
# this model's own cipher collapse is notebook 07's (it may or may not have run before this cell): not read here;
# the committed cipher stage of the same weights is shown where there is one
committed_collapse = rc.screen.read_screens(screens_committed).set_index(["model", "weights"]).collapse_pct
is_own = ours.source == "ours (this notebook)"
ours.loc[is_own, "collapse_pct"] = [committed_collapse.get((m, w), float("nan"))
                                    for m, w in zip(ours.model[is_own], ours.weights[is_own])]
ref = rc.reference.reference_table()
wide = lambda exp: ref[ref.experiment == exp].pivot_table(index="model", columns="quantity", values="value", aggfunc="first")
paper = wide("panel").join(wide("gate")).join(wide("ablation")).join(wide("cipher_collapse")[["collapse %"]]).reset_index()
paper = pd.DataFrame({"model": paper.model, "layers": paper.layers.astype(int), "heads": paper.heads.astype(int),
                      "params_b": paper["params (B)"].astype(float), "gate": paper.gate,
                      "gate_layer": paper.gate.str.extract(r"L(\d+)H")[0].astype(int),
                      "necessity_pct": paper["necessity %"].astype(float),
                      "ablation_top_reduction": pd.to_numeric(paper["top NLL reduction"]),
                      "collapse_pct": pd.to_numeric(paper["collapse %"]),
                      "source": "paper (arXiv 2604.04385)"})
paper["gate_depth"] = paper.gate_layer / (paper.layers - 1)
panel = pd.concat([paper, ours[paper.columns.intersection(ours.columns)]], ignore_index=True)
for col, title, ylab in (
        ("gate_depth", "Gate depth as a fraction of the layers, by model size", "gate layer / (layers − 1)"),
        ("necessity_pct", "The gate's interchange necessity, by model size", "necessity (% of the NLL gap)"),
        ("ablation_top_reduction", "Strongest per-head directional ablation, by model size",
         "NLL reduction (strongest head)"),
        ("collapse_pct", "The gate's necessity lost under the cipher, by model size", "cipher collapse (%)")):
    fig = rc.plotting.panel_figure(panel.dropna(subset=[col]), col, title=title, y_label=ylab)
    show(fig, f"06_panel_{col}", model.slug).show()

# %%
# NBVAL_CHECK_OUTPUT
print(panel[["source", "model", "layers", "heads", "gate", "necessity_pct", "ablation_top_reduction", "collapse_pct"]]
      .round(3).fillna("—").to_string(index=False))

# %% [markdown]
# ### A real scaling pair: Qwen2.5-Coder 0.5B → 1.5B
#
# The paper's scaling claim: per-head directional ablation weakens as models grow (up to 58× from
# Qwen2.5-7B to -72B) while interchange still finds the gate. Its pair is 10× apart in size; ours, the two
# committed Qwen2.5-Coder-Instruct screens, 3×. The criterion, fixed before the numbers: the claim **holds**
# on our pair when the strongest head's NLL reduction is smaller in the 1.5B (the ratio 0.5B / 1.5B has a 95%
# interval above 1, the strongest head re-chosen in every resample of the pairs) **and** the 1.5B's gate
# survives the family-wise test over its exactly confirmed heads (p_fwer ≤ 0.01); it **fails** when the
# ratio's interval is below 1 or the gate does not survive, and is **inconclusive** otherwise.

# %%
# NBVAL_CHECK_OUTPUT
small_dir, large_dir = (screens_committed / m for m in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"))
scaling_ref = rc.reference.value("scaling", "per-head ablation strength drop (max)")
try:
    sc = rc.screen.scaling_pair(small_dir, large_dir, seed=SEED)
except FileNotFoundError as err:
    print(f"the scaling pair: not testable here ({err})")
else:
    for k in ("small", "large"):
        r = sc[k]
        print(f"{r['model']} ({r['params_b']:.2f}B): strongest ablated head {r['ablation_top_head']} reduces the NLL by "
              f"{r['ablation_top_reduction']:.3f}; gate {r['gate']} ({r['necessity_pct']:.1f}% necessity, "
              f"p_fwer {r['gate_p_fwer']:.4f} over {r['n_exact_heads']} exact heads)")
    weaker = sc["ratio_lo"] > 1
    found = sc["large"]["gate_p_fwer"] is not None and sc["large"]["gate_p_fwer"] <= 0.01
    verdict = ("holds" if weaker and found else "fails" if sc["ratio_hi"] < 1 or not found else "inconclusive")
    print(f"ablation strength 0.5B / 1.5B: {sc['ratio']:.2f}× [{sc['ratio_lo']:.2f}, {sc['ratio_hi']:.2f}] "
          f"(paper, Qwen2.5-7B → 72B: {scaling_ref}); the 1.5B's gate survives the family-wise test: "
          f"{'yes' if found else 'no'} → {verdict}")


# ## Sparse gate or dense routing?
#
# The two write-ups disagree: the seed write-up finds refusal computed densely (many components, none
# decisive), the paper a sparse gate. Each screen's per-pair necessity rows answer it for its model: the share
# of the total |necessity| over heads that the top 1, 5 and 10 heads carry, and the Gini coefficient of
# |necessity|, with bootstrap 95% intervals over pairs. Equal heads would give k / (number of heads) and a
# Gini of 0 (the dashes). The committed screens (`data/screens/`) are read beside this notebook's own screen.
# A filled star is a screen whose every head is exact (the organism's 270); an open star one whose heads
# outside the exactly confirmed top are attribution estimates (this notebook's screen, and the Qwen models',
# where an exact screen of every head does not fit these CPUs: `bench/RESULTS.md`). On the organism the
# estimate ranks the heads with Spearman 0.95 against the exact screen, so an open star is an estimate of the
# same quantity, not a different one. The paper's own models cannot be placed here: its saved per-head
# interchange tables hold only its ~10 candidate heads per model, and a share of the total needs every head.
#
# The criterion, fixed before the numbers: the routing is **sparse** when the top 10 heads carry at least
# half of the total |necessity| (the interval's lower end ≥ 0.5), **dense** when the interval's upper end is
# below 0.5, and inconclusive otherwise.

# %%
sparsity = pd.concat([rc.screen.read_sparsity(screens_committed, seed=SEED),
                      rc.screen.read_sparsity(screen_dir, seed=SEED, include_random=True)
                        .assign(model=lambda d: d.model + " (this notebook)")],
                     ignore_index=True)
show(rc.plotting.sparsity_figure(sparsity, "How much of the total |necessity| the top heads carry, per model"),
     "06_sparsity", model.slug).show()

# %%
# NBVAL_CHECK_OUTPUT
top10 = sparsity[sparsity.statistic == "top10"].set_index("model")
picture = lambda r: "sparse" if r.lo >= 0.5 else "dense" if r.hi < 0.5 else "inconclusive"
for m, r in top10.iterrows():
    g = sparsity[(sparsity.model == m) & (sparsity.statistic == "gini")].iloc[0]
    print(f"{m}: top 10 of {r.n_heads} heads carry {r.estimate:.0%} [{r.lo:.0%}, {r.hi:.0%}] of |necessity| "
          f"(equal heads: {10 / r.n_heads:.0%}), Gini {g.estimate:.2f} [{g.lo:.2f}, {g.hi:.2f}], {r.method} → {picture(r)}")


# %% [markdown]
# ## Conclusions
#
# Each claim of the paper, tested on this model: our number beside the paper's (from the reference table),
# the criterion, and the verdict. Every criterion is stated before its number and can come out either way; a
# claim whose precondition fails here is "not testable here". The paper's models are 2B to 72B; a claim that
# fails on a smaller model is a finding about that model, not a failure of the method.

# %%
# NBVAL_CHECK_OUTPUT
C = rc.reference.Conclusion(requires=rc.stages.baseline(model, store).precondition)
ref_nec = [float(v) for v in ref[(ref.experiment == "gate") & (ref.quantity == "necessity %")].value]
depth = gate["layer"] / (model.n_layers - 1)
C.add("a single head stands out as the gate",
    f"gate {gate_label} minus runner-up {st['runner_up']}: {st['margin_pct']:.2f} points, 95% CI {st['margin_lo']:.2f}…{st['margin_hi']:.2f}",
    "the interval excludes 0", st["stands_out"])
C.add("the gate survives a family-wise test",
    f"p_fwer {st['gate_p_fwer']:.4f} over {st['n_heads']} exact heads (Qwen3-8B: {rc.reference.value('statistics', 'family-wise permutation p (gate)'):g})",
    "p_fwer ≤ 0.01", st["gate_p_fwer"] <= 0.01)
C.add("the top set is stable under resampling of the pairs",
    f"top-{st['k']} Jaccard {st['jaccard_mean']:.2f} (Qwen3-8B: {rc.reference.value('statistics', 'bootstrap Jaccard (interchange top set)'):g})",
    "mean Jaccard ≥ 0.8", st["jaccard_mean"] >= 0.8)
C.add("its necessity is a few % of the gap",
    f"{gate['necessity_pct']:.1f}% (paper {min(ref_nec):.1f}–{max(ref_nec):.1f}%)",
    "0.5% ≤ necessity ≤ 20%", 0.5 <= gate["necessity_pct"] <= 20)
C.add("the gate sits at mid depth, not at the output",
    f"L{gate['layer']} of {model.n_layers} = {depth:.0%} of the depth (paper {paper.gate_depth.min():.0%}–{paper.gate_depth.max():.0%})",
    "between 25% and 90% of the depth", 0.25 <= depth <= 0.9)
C.add("the gate is invisible to output DLA",
    f"rank {g_row.dla_rank} of {len(ranks)} by |DLA| (Qwen3-8B's saved table: "
    f"{rc.reference.value('gate_dla_rank', 'gate rank by |output DLA| (saved table)'):.0f} of {rc.reference.value('gate_dla_rank', 'n_heads'):.0f})",
    "outside the top 10% of heads by |DLA|", g_row.dla_rank > 0.1 * len(ranks))
C.add("... and a DLA screen of the paper's kind would miss it",
    (f"rank {list(in_band.label).index(gate_label) + 1} among the top 20 |DLA| heads of the 25–65% band"
     if gate_label in set(in_band.label) else "not among the top 20 |DLA| heads of the 25–65% band"),
    "not among the paper's 20 DLA candidates", gate_label not in set(in_band.label))
old = share.iloc[0]
C.add("the answer diagnostic's top head is an artifact of patching the answer",
    f"{old.label}: {old.combined_answer:.1f}% with target positions swapped, {old.combined_prompt:.1f}% without "
    f"({old.target_share:.0%} from the target positions)", "more than half of its effect from the target positions",
    old.target_share > 0.5)
C.add("the gate does not depend on which positions are swapped",
    ", ".join(f"{p}: {t[0]}" for p, t in tops.items()), "the same gate under prompt, last and paper",
    len({t[0] for t in tops.values()}) == 1)
for r, k in ko.items():
    C.add(f"knocking out the gate suppresses its amplifiers ({r})",
        f"{k['suppressed_signed']} of {k['n_amplifiers']} by sign (Qwen3-8B {rc.reference.value('knockout_cascade', 'amplifiers suppressed', 'Qwen/Qwen3-8B')})",
        "more than half suppressed by sign", k["suppressed_signed"] > k["n_amplifiers"] / 2, precondition=(k["testable"], "no amplifier in the window, or no null heads"))
    C.add(f"... more than random nearby heads do ({r})",
        f"{k['gate_change_pct']:.1f}% vs {k['random_mean_pct']:.1f} ± {k['random_sd_pop_pct']:.1f}%, p = {k['p_random_ge_gate']:.3f}",
        f"p ≤ 0.05 against {k['n_random']} null heads", k["p_random_ge_gate"] <= 0.05, precondition=(k["testable"], "no amplifier in the window, or no null heads"))
r = rates.set_index(["kind", "fraction"])
lo, hi = min(DOSE_FRACTIONS), max(DOSE_FRACTIONS)
C.add("removing d turns refusal into compliance",
    f"sensitive prompts: compliance {r.compliance['sensitive', lo]:.0%} → {r.compliance['sensitive', hi]:.0%}, "
    f"degenerate {r.degenerate['sensitive', lo]:.0%} → {r.degenerate['sensitive', hi]:.0%}",
    "compliance rises and exceeds the degenerate share", r.compliance["sensitive", hi] > r.compliance["sensitive", lo]
                                                                   and r.compliance["sensitive", hi] > r.degenerate["sensitive", hi])
C.add("adding d makes the controls refuse",
    f"controls classed refusal: {r.refusal['control', lo]:.0%} → {r.refusal['control', hi]:.0%}",
    "the refusal share rises", r.refusal["control", hi] > r.refusal["control", lo])
# the committed screen of these very weights when there is one (every head exact), else this notebook's screen
mine = top10[top10.weights == model.meta.get("fingerprint")]
own = mine.loc[model.name] if model.name in mine.index else top10.loc[f"{model.name} (this notebook)"]
C.add("refusal routes through a sparse set of heads (the paper), not densely (the seed write-up)",
    f"top 10 of {own.n_heads} heads carry {own.estimate:.0%} [{own.lo:.0%}, {own.hi:.0%}] of the total |necessity| "
    f"({own.method})", "sparse: the interval's lower end ≥ 50%; dense: its upper end < 50% (two-sided)",
    True if own.lo >= 0.5 else False if own.hi < 0.5 else rc.reference.INCONCLUSIVE)
C.add("the gate is one of notebook 04's direct heads (it moves the subject to the last position)",
    f"{gate_label}: class {meet.loc[gate_label, 'class']}, direct score {meet.loc[gate_label, 'direct_mean']:.2f}",
    "direct score ≥ 0.2 (notebook 04's threshold)", meet.loc[gate_label, "direct_mean"] >= 0.2)
C.show()

# %% [markdown]
# How to read these against each other. The `answer` diagnostic asks how much of a head's apparent effect
# comes from swapping the answer in progress rather than anything the head carries out of the prompt; the
# share printed above decides whether the old default's top head was routing or continuation. `prompt` and
# `paper` differ only on pairs of unequal length, so their agreement says little on a corpus of mostly
# equal-length pairs; `last` is the strict test of what reaches the decision position. Where a verdict above
# does not hold, the numbers beside it say by how much. Notebook 04's direct heads, notebook 02's direction
# and this notebook's detection direction meet here: the per-head ablation uses the detection direction, and
# the gate's rank there is printed with it.
