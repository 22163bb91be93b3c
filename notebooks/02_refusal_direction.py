# %% [markdown]
# # 02 — The refusal direction and the refusal component
#
# Arditi et al. (2024) found that refusal is mediated by one direction in the residual stream. This
# notebook finds that direction in the model, checks that it is causal (ablating it removes refusals,
# adding it creates them), and then measures the **refusal component** `resid · r̂` at the last position:
# how it grows with depth and which blocks write it (seed write-up §B 1–4; [`docs/methods.md`](../docs/methods.md), "02_refusal_direction").

# %% tags=["parameters"]
MODEL = "smollm2-135m-refusal"
DEVICE = "cpu"
DTYPE = "float32"
N_TEST = 16           # held-out test prompts per class for generations
MAX_NEW_TOKENS = 32
SEED = 0

# %%
# %load_ext autoreload
# %autoreload 2
import numpy as np, pandas as pd, torch
import refusal_circuits as rc
from refusal_circuits.plotting import show
model, store = rc.open_notebook(MODEL, DEVICE, DTYPE, SEED)

# %% [markdown]
# ## Candidate directions and the selection
#
# For every layer `l` and every post-instruction position `p` (the template tokens after the instruction),
# the candidate is the difference of means of `resid_pre` between harmful and harmless *train* prompts
# (float64). Each candidate is scored on *val* prompts by **bypass** (refusal log-odds on harmful prompts
# with the direction ablated everywhere; lower is better), **induce** (log-odds on harmless prompts with
# the vector added at its layer) and **KL** (last-position KL on harmless prompts under ablation).
# Candidates with KL > 0.1, induce < 0 or layer ≥ 0.8·L are discarded; the lowest bypass wins.
#
# The direction is a **stage** (`rc.stages.refusal_direction`): its canonical parameters (64 train and
# 8 val prompts per class, every 3rd layer) live in the library and are saved with it, and notebooks 03–07
# ask the same function for it, so they use exactly this direction. Candidate scoring is a resumable
# sweep.

# %%
choice = rc.stages.refusal_direction(model, store)
r_hat = choice.unit
scores = choice.scores
print("stage parameters:", {k: v for k, v in choice.params.items() if k != "data"})

# %%
for col, label in [("bypass", "bypass score (log-odds, ablated, harmful)"),
                   ("induce", "induce score (log-odds, added, harmless)"),
                   ("kl", "KL on harmless under ablation")]:
    fig = rc.plotting.heatmap(scores, "position", "layer", col, title=f"Candidate {label} — {model.name}",
                              x_label="position (from end)", y_label="layer", colorbar=col,
                              zmid=None if col == "kl" else 0.0, colorscale="Viridis" if col == "kl" else "RdBu_r")
    show(fig, f"02_direction_{col}", model.slug).show()

# %%
# NBVAL_CHECK_OUTPUT
best = scores.set_index(["layer", "position"]).loc[(choice.layer, choice.position)]
print(f"chosen: layer {choice.layer} of {model.n_layers}, position {choice.position} "
      f"(candidates kept by the filters: {int(scores.kept.sum())} of {len(scores)}"
      f"{'; filters relaxed' if scores.relaxed.any() else ''})")
print(f"bypass {best.bypass:.1f} (no ablation: {choice.baseline_harmful:.1f}), induce {best.induce:.1f} "
      f"(no addition: {choice.baseline_harmless:.1f}), KL {best.kl:.2f}")
rc.reference.show("refusal_direction", {"layer": choice.layer, "n_layers": model.n_layers,
                                         "position": choice.position, "bypass": best.bypass,
                                         "induce": best.induce, "kl": best.kl}, model.name);

# %% [markdown]
# ## Baseline, intervened and activation addition
#
# **Intervened** = the direction ablated from every residual write, at every layer and position.
# **Addition** = the (unnormalised) difference-of-means vector added to `resid_pre` at its layer, all
# positions. Greedy generations on held-out *test* prompts, scored by substring matching (§B 1).

# %%
harmful = rc.load_instructions("harmful", "test", n=N_TEST).instruction.tolist()
harmless = rc.load_instructions("harmless", "test", n=N_TEST).instruction.tolist()
conditions = {
    "baseline": [],
    "intervened (ablated)": rc.direction.ablation_hooks(model, choice.direction),
    "activation addition": rc.direction.addition_hooks(model, choice.direction, choice.layer),
}
key = {"n": N_TEST, "tokens": MAX_NEW_TOKENS, "direction": choice.params}
frames = []
for cond, hooks in conditions.items():
    for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
        if cond == "activation addition" and kind == "harmful":
            continue
        ck = store.checkpoint("direction_generations", key | {"condition": cond, "kind": kind})
        frames.append(rc.refusal_scores(model, prompts, MAX_NEW_TOKENS, fwd_hooks=hooks, checkpoint=ck)
                      .assign(condition=cond, kind=kind))
gens = pd.concat(frames, ignore_index=True)
gens.groupby(["condition", "kind"], sort=False).head(1)[["condition", "kind", "instruction", "completion", "refused"]]

# %%
# NBVAL_CHECK_OUTPUT
rates = gens.groupby(["condition", "kind"], sort=False).refused.mean().unstack()
print(rates.round(2).to_string())
abl = rates.loc["intervened (ablated)", "harmful"]
add = rates.loc["activation addition", "harmless"]
print(f"quality bar: ablation -> harmful refusal {abl:.2f} (want <= 0.10): {'met' if abl <= 0.10 else 'NOT met'}; "
      f"addition -> harmless refusal {add:.2f} (want >= 0.80): {'met' if add >= 0.80 else 'NOT met'}; "
      f"KL {best.kl:.2f} (want <= 0.10): {'met' if best.kl <= 0.1 else 'NOT met'}")
rc.reference.show("direction_generations", {"baseline harmful refusal rate": rates.loc["baseline", "harmful"],
                                             "baseline harmless refusal rate": rates.loc["baseline", "harmless"],
                                             "ablated harmful refusal rate": abl}, model.name);

# %% [markdown]
# ## The logit metric agrees with the generations (§B 2)
#
# The logit refusal metric on the toy pairs for {harmful, harmless} × {baseline, intervened}.

# %%
toy = rc.align_pairs(model, rc.load_toy_pairs()).pairs
def run_metric_agreement():
    frames = []
    for cond in ("baseline", "intervened (ablated)"):
        for kind in ("harmful", "harmless"):
            frames.append(rc.refusal_metrics(model, toy[kind].tolist(), conditions[cond])
                          .assign(condition=cond, kind=kind))
    return pd.concat(frames, ignore_index=True)
agree = store.cached("metric_agreement", {"direction": choice.params, "data": rc.data.data_hash(toy)},
                     run_metric_agreement)
agree["set"] = agree.kind + " · " + agree.condition
fig = rc.plotting.distribution_figure(agree, "logit_metric", "set", value_label="logit refusal metric M",
        title=f"Refusal metric, baseline vs direction ablated (toy pairs) — {model.name}")
show(fig, "02_metric_agreement", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
means = agree.groupby(["kind", "condition"]).logit_metric.mean().unstack()
print(means.round(1).to_string())
b, a = means.loc["harmful", "baseline"], means.loc["harmful", "intervened (ablated)"]
rc.reference.show("metric_agreement", {"finding": (
    f"ablation {'lowers' if a < b else 'raises'} the harmful metric ({b:.1f} → {a:.1f}); "
    f"harmless {'<' if means.loc['harmless', 'baseline'] < b else '≥'} harmful at baseline")}, model.name);

# %% [markdown]
# ## The refusal component by layer (§B 3)
#
# `resid_pre[l] · r̂` at the last position, for the harmful and harmless halves of the toy pairs (band:
# ±1 std across prompts).

# %%
comp = pd.concat([
    rc.direction.component_by_layer(model, toy.harmful.tolist(), choice.direction).assign(kind="harmful"),
    rc.direction.component_by_layer(model, toy.harmless.tolist(), choice.direction).assign(kind="harmless"),
])
fig = rc.plotting.lines_with_band(comp, "layer", "component", "kind",
        title=f"Refusal component at the last position (layer {model.n_layers} = final resid_post) — {model.name}",
        x_label="layer (resid_pre)", y_label="resid · r̂")
show(fig, "02_component_by_layer", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
gap = comp.groupby(["layer", "kind"]).component.mean().unstack()
gap = (gap.harmful - gap.harmless)
early, middle, late = model.layer_groups(3)
print(f"harmful − harmless gap: start of early third {gap[early.start]:.1f}, start of middle {gap[middle.start]:.1f}, "
      f"start of late {gap[late.start]:.1f}, final {gap.iloc[-1]:.1f}")
half = int((gap > gap.max() / 2).idxmax())
print(f"layer where the gap first exceeds half its maximum: {half} of {model.n_layers}")
rc.reference.show("component_by_layer", {"finding": (
    f"gap passes half its maximum at L{half}, final gap {gap.iloc[-1]:.1f} (of {model.n_layers} layers)")},
                  model.name);

# %% [markdown]
# ## Which blocks write the refusal direction (§B 4)
#
# Each attention and MLP block output at the last position projected on `r̂`, harmful − harmless
# (mean over the toy pairs, error bars: 95% interval of the mean difference).

# %%
_, per_block = rc.direction.paired_block_contributions(model, toy.harmful.tolist(), toy.harmless.tolist(),
                                                      choice.direction)
fig = rc.plotting.bars(per_block, "layer", "mean", "block", err_lo="lo", err_hi="hi",
        title=f"What each block writes along r̂ (harmful − harmless, last position) — {model.name}",
        x_label="layer", y_label="Δ (block output · r̂)")
show(fig, "02_block_contributions", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
top = per_block.reindex(per_block["mean"].abs().sort_values(ascending=False).index).head(5)
print("largest writers (block, layer, Δ):", ", ".join(f"{b} L{l} {m:+.1f}" for b, l, m in top[["block", "layer", "mean"]].values))
neg = per_block[(per_block["block"] == "attn") & (per_block.hi < 0)]
print("attention layers writing significantly negatively:", list(neg.layer))
share = per_block.groupby("block")["mean"].sum()
print(f"summed Δ: attention {share.get('attn', 0):.1f}, MLP {share.get('mlp', 0):.1f}")
rc.reference.show("block_contributions", {"finding": (
    "largest writers " + ", ".join(f"{b} L{l}" for b, l in top[["block", "layer"]].values[:3])
    + "; attention writing negatively at " + (", ".join(f"L{l}" for l in neg.layer) or "no layer"))},
                  model.name);

# %% [markdown]
# ## Conclusion
#
# The claims about the refusal direction, each as a test on this model: our number beside the reference
# (from the table), the criterion (Arditi et al.'s quality bar where they set one), and the verdict. A
# direction can be necessary (ablation removes refusal) without being sufficient (addition induces it), so
# the two are separate claims. Notebook 03 clamps and zeroes this `r̂`; notebook 06 compares its detection
# direction (the paper's, at the gate's layer) with it.

# %%
# NBVAL_CHECK_OUTPUT
C = rc.reference.Conclusion(requires=rc.stages.baseline(model, store).precondition)
base_h, base_s = rates.loc["baseline", "harmful"], rates.loc["baseline", "harmless"]
C.add("ablating the direction removes refusal on harmful prompts",
      f"harmful refusal {base_h:.2f} → {abl:.2f} (Gemma "
      f"{rc.reference.value('direction_generations', 'ablated harmful refusal rate'):g})",
      "≤ 0.10 after ablation", abl <= 0.10, precondition=(base_h >= 0.5, "the model refuses under half of the harmful prompts"))
C.add("adding the direction makes harmless prompts refuse",
      f"harmless refusal {base_s:.2f} → {add:.2f}", "≥ 0.80 with the addition",
      add >= 0.80, precondition=(base_s < 0.5, "the model already refuses half of the harmless prompts"))
C.add("the chosen candidate passes the selection filter on harmless behaviour",
      f"KL {best.kl:.2f} (Gemma {rc.reference.value('refusal_direction', 'kl'):g}); "
      f"{int(scores.kept.sum())} of {len(scores)} candidates passed both filters (KL ≤ 0.1 and induce > 0)",
      "KL ≤ 0.1", best.kl <= 0.1)
C.add("the logit metric agrees with the generations",
      f"harmful metric {b:.1f} → {a:.1f} under ablation; harmless {means.loc['harmless', 'baseline']:.1f} at baseline",
      "ablation lowers the harmful metric and harmless < harmful at baseline",
      a < b and means.loc["harmless", "baseline"] < b)
middle = model.layer_groups(min(3, model.n_layers))[min(1, model.n_layers - 1)]
C.add("the harmful − harmless gap is written in the middle layers",
      f"the gap passes half its maximum at L{half} of {model.n_layers} (Gemma: grows L3→L12 of 18, flat after)",
      f"that layer lies in the middle third L{middle.start}–L{middle.stop - 1} (earlier or later: does not hold)",
      half in middle)
C.add("MLPs write more of the gap than attention",
      f"summed Δ: MLP {share.get('mlp', 0):.1f}, attention {share.get('attn', 0):.1f}",
      "MLP sum > attention sum", share.get("mlp", 0) > share.get("attn", 0))
C.add("some attention layers write against the direction",
      f"attention layers with a 95% interval below 0: {list(neg.layer) or 'none'}",
      "at least one", len(neg) > 0)
C.show()
