# %% [markdown]
# # 03 — Activation patching: where is refusal computed?
#
# On the toy pairs (harmful and harmless halves differ in one *subject* token) we patch activations between
# the two runs and read the logit refusal metric at the last position (seed write-up §B 5–7, 16, 17).
#
# * **Denoising**: run the harmless prompt, patch in activations from the harmful one.
# * **Noising**: run the harmful prompt, patch in activations from the harmless one.
# * Score: the fraction of the way the metric moves towards the source run,
#   `(patched − target) / (source − target)`; for noising this is the write-up's
#   `(patched − clean) / (corrupt − clean)`, and ≥ 0.5 means the patched components are *necessary*.
#
# All sweeps use the batched engine of `refusal_circuits.patching` (many patches per forward pass, exact
# against a one-patch-per-pass loop in the tests) and are saved under `results/<model>/` part by part as they run, so a rerun reuses them and an
# interrupted sweep resumes where it stopped. Experiments and conventions: [`docs/methods.md`](../docs/methods.md),
# "03_patching".

# %% tags=["parameters"]
MODEL = "smollm2-135m-refusal"
DEVICE = "cpu"
DTYPE = "float32"
N_PAIRS = 8           # toy pairs used in the sweeps (spread over the set); None = all
MAX_BATCH = 64        # sequences per patched forward pass
CLAMP_LAYER = None    # None: where the last position carries the information (transfer stage); the write-up: the direction's layer
SELF_REPAIR = "transfer"  # "transfer": zero from that layer on; "all": every SELF_REPAIR_STRIDE-th layer from L0 (the write-up's)
SELF_REPAIR_STRIDE = 3
N_CLAMP_PROMPTS = 8
MAX_NEW_TOKENS = 24
SEED = 0

# %%
# %load_ext autoreload
# %autoreload 2
import numpy as np, pandas as pd, torch
import refusal_circuits as rc
from refusal_circuits.plotting import show
model, store = rc.open_notebook(MODEL, DEVICE, DTYPE, SEED)

# %%
aligned = rc.align_pairs(model, rc.load_toy_pairs()).subset(N_PAIRS)
choice = rc.stages.refusal_direction(model, store)   # notebook 02's direction: loaded, or computed if missing
P = rc.patching
sweep_key = {"pairs": list(aligned.pairs.pair_id), "direction": choice.params, "max_batch": MAX_BATCH}
print(f"{len(aligned)} pairs; subject position from the end: {sorted(int(p) for p in aligned.pairs.subject_from_end.unique())}; "
      f"refusal direction from layer {choice.layer}, position {choice.position}")

# %% [markdown]
# ## Residual-stream denoising at every (layer, position) (§B 5)
#
# Positions before the subject are identical in both runs, so patching them cannot change anything; the
# sweep starts one token before the subject and runs to the last position. This sweep is the **transfer
# stage** (`rc.stages.transfer`): where the last position starts to carry the harmful information fixes
# this model's windows for the rest of the study — the layers whose heads move it (notebook 04's head
# classes), the layer where clamping the refusal component can act alone, and the range where self-repair
# is measured. The write-up's Gemma choices remain parameters.

# %%
transfer = rc.stages.transfer(model, store)
resid_s = transfer.table
example = model.str_tokens(aligned.pairs.harmful[0])
positions = sorted(int(p) for p in resid_s.position.unique())
ticks = [("SUBJECT " if p == transfer.subject_position else "") + repr(example[p])[1:-1] for p in positions]
fig = rc.plotting.heatmap(resid_s, "position", "layer", "fraction", zmid=0.0, x_ticktext=ticks,
        title=f"Denoising resid_pre: fraction of the harmful metric restored — {model.name}",
        x_label="position (tokens of the first pair)", y_label="layer", colorbar="fraction")
show(fig, "03_resid_denoising", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
grid = resid_s.pivot_table(index="layer", columns="position", values="fraction")
print(f"subject position restores ≥ 50% up to layer {transfer.subject_until}; "
      f"last position restores ≥ 50% from layer {transfer.last_from} (of {model.n_layers})")
for what, why in transfer.reasons.items():
    print(f"{what}: {why}")
rc.reference.show("resid_denoising", {
    "subject position restores > 50% up to layer": transfer.subject_until,
    "last position restores > 50% from layer": transfer.last_from, "n_layers": model.n_layers}, model.name);

# %% [markdown]
# ## Grouped block patching, noising (§B 6)
#
# Twelve settings: layer thirds {early, middle, late} × {attention, MLP} × {subject, last position}; every
# block of the group is patched at once. Error bars: bootstrap 95% interval over pairs.

# %%
grouped = P.patch_sweep(model, aligned, P.grouped_block_patches(model), "noising", max_batch=MAX_BATCH,
                        checkpoint=store.checkpoint("grouped_noising", sweep_key))
grouped_s = P.summarise(grouped)
grouped_s["setting"] = grouped_s.group + " " + grouped_s.block + " (" + grouped_s.layers + ")"
fig = rc.plotting.bars(grouped_s, "setting", "fraction", "position", err_lo="lo", err_hi="hi", hline=0.5,
        title=f"Noising groups of blocks: fraction of the harmless metric recovered — {model.name}",
        x_label="layer group and block", y_label="fraction recovered")
show(fig, "03_grouped_noising", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
for _, r in grouped_s.iterrows():
    print(f"{r.group:6s} {r.block:4s} @{r.position:7s} {r.fraction:5.2f}  {'necessary' if r.fraction >= 0.5 else ''}")
necessary = grouped_s[grouped_s.fraction >= 0.5]
rc.reference.show("grouped_noising", {"necessary settings": ", ".join(
    f"{r.group} {r.block} @{r.position}" for r in necessary.itertuples()) or "none"}, model.name);

# %% [markdown]
# ## Individual blocks, noising (§B 7)
#
# Each `attn_out` and `mlp_out` patched alone (all positions).

# %%
blocks = P.patch_sweep(model, aligned, P.block_patches(model), "noising", max_batch=MAX_BATCH,
                       checkpoint=store.checkpoint("block_noising", sweep_key))
blocks_s = P.summarise(blocks, by=("block", "layer"))
fig = rc.plotting.bars(blocks_s, "layer", "fraction", "block", err_lo="lo", err_hi="hi", hline=0.5,
        title=f"Noising one block at a time — {model.name}", x_label="layer", y_label="fraction recovered")
show(fig, "03_block_noising", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
top = blocks_s.sort_values("fraction", ascending=False).head(3)
print("largest single blocks:", ", ".join(f"{b} L{l} {f:.2f}" for b, l, f in top[["block", "layer", "fraction"]].values))
n_big = int((blocks_s.fraction >= 0.5).sum())
print(f"blocks above 0.5: {n_big} of {len(blocks_s)}; sum of single-block fractions {blocks_s.fraction.sum():.1f}")
rc.reference.show("block_noising", {"finding": (
    f"{n_big} of {len(blocks_s)} single blocks recover ≥ 0.5; the largest recovers {top.fraction.iloc[0]:.2f}")},
                  model.name);

# %% [markdown]
# ## Clamping the refusal component (§B 16)
#
# Set `resid_pre · r̂` at the last position to a sweep of values and read the metric. The layer is where
# the last position alone carries the harmful information (the transfer stage): clamping earlier, while
# the subject position still carries it, leaves later layers free to read it from there.

# %%
clamp_layer = transfer.clamp_layer if CLAMP_LAYER is None else int(CLAMP_LAYER)
print(f"clamp layer L{clamp_layer}: " + (transfer.reasons["clamp"] if CLAMP_LAYER is None else "set by CLAMP_LAYER"))
clamp_prompts = list(aligned.pairs.harmful[:N_CLAMP_PROMPTS]) + list(aligned.pairs.harmless[:N_CLAMP_PROMPTS])
natural = rc.direction.component_by_layer(model, clamp_prompts, choice.direction)
natural = natural[natural.layer == clamp_layer].assign(kind=["harmful"] * N_CLAMP_PROMPTS + ["harmless"] * N_CLAMP_PROMPTS)
nat = natural.groupby("kind").component.mean()
values = [round(v, 2) for v in torch.linspace(min(0.0, nat.min()), 1.5 * max(nat.max(), 1.0), 13).tolist()]
clamp = store.cached("clamp_sweep", sweep_key | {"values": values, "n": N_CLAMP_PROMPTS, "layer": clamp_layer},
                     lambda: rc.direction.clamp_sweep(model, clamp_prompts, choice.direction, clamp_layer, values))
clamp["kind"] = ["harmful" if i in set(aligned.pairs.harmful) else "harmless" for i in clamp.instruction]
fig = rc.plotting.lines_with_band(clamp, "value", "logit_metric", "kind",
        title=f"Metric vs clamped refusal component at layer {clamp_layer} — {model.name}",
        x_label="clamped resid · r̂ (last position)", y_label="logit refusal metric")
show(fig, "03_clamp_metric", model.slug)


# %%
def clamp_generations(v):
    hooks = rc.direction.component_hooks(clamp_layer, choice.direction, v)
    return rc.refusal_scores(model, list(aligned.pairs.harmless[:N_CLAMP_PROMPTS]), MAX_NEW_TOKENS,
                             fwd_hooks=hooks, progress=False).assign(value=v)
# one part per clamp value, each saved as it finishes
clamp_gen = rc.results.run_parts(values[::3], clamp_generations, store.checkpoint(
    "clamp_generations", sweep_key | {"values": values[::3], "tokens": MAX_NEW_TOKENS, "layer": clamp_layer}),
    desc="clamp values")
clamp_gen.groupby("value").head(1)[["value", "instruction", "completion", "refused"]]

# %%
# NBVAL_CHECK_OUTPUT
curve = clamp[clamp.kind == "harmless"].groupby("value").logit_metric.mean()
lin = pd.Series(curve.values).corr(pd.Series(curve.index))
slope = float(np.polyfit(curve.index, curve.values, 1)[0])
span = float(curve.max() - curve.min())
unclamped = rc.refusal_metrics(model, clamp_prompts).assign(kind=natural.kind.values).groupby("kind").logit_metric.mean()
gap_metric = float(unclamped["harmful"] - unclamped["harmless"])   # the natural harmful − harmless metric gap
rate = clamp_gen.groupby("value").refused.mean()
first = rate[rate >= 0.5].index.min() if (rate >= 0.5).any() else None
first_text = f"from clamp value {first:.2f}" if first is not None else "at no clamp value of the sweep"
print(f"natural component at layer {clamp_layer}: harmless {nat['harmless']:.1f}, harmful {nat['harmful']:.1f}")
print(f"harmless prompts, metric vs clamp value: correlation {lin:.2f}, slope {slope:.3f} metric units per unit "
      f"(the metric moves {span:.2f} over the whole sweep); harmless prompts refuse (≥50%) {first_text} "
      f"(largest rate {rate.max():.0%})")
rc.reference.show("clamping", {"natural component harmless": nat["harmless"], "natural component harmful": nat["harmful"],
                               "refusals from clamp value": first, "layer": clamp_layer,
                               "finding": f"metric vs clamp value: correlation {lin:.2f}, slope {slope:.3f}"}, model.name);

# %% [markdown]
# ## Self-repair (§B 17)
#
# Zero the refusal component at layer ℓ (last position) and follow it through the later layers. Zeroing
# it before the last position carries the information removes almost nothing, so "recovery" there is
# trivial: the ablation layers start where the transfer stage says the last position carries it, and the
# recovery is read at the final residual (what the unembedding sees).

# %%
if SELF_REPAIR == "transfer":
    abl_layers = transfer.self_repair_layers[::max(1, len(transfer.self_repair_layers) // 6)]
    print(transfer.reasons["self_repair"])
else:
    abl_layers = list(range(0, model.n_layers, SELF_REPAIR_STRIDE))
repair = store.cached("self_repair", sweep_key | {"layers": abl_layers, "n": N_CLAMP_PROMPTS},
                      lambda: rc.direction.self_repair(model, list(aligned.pairs.harmful[:N_CLAMP_PROMPTS]),
                                                       choice.direction, abl_layers))
repair["ablated at"] = repair.ablated_at.map(lambda l: "none" if l < 0 else f"L{l}")
fig = rc.plotting.lines_with_band(repair, "layer", "component", "ablated at", ordered=True,
        title=f"Self-repair: refusal component after zeroing it at one layer (harmful prompts) — {model.name}",
        x_label="layer (resid_pre)", y_label="resid · r̂")
show(fig, "03_self_repair", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
# recovery = the component at the final residual (layer n_layers), as a share of its unablated value there
at = repair[repair.layer == model.n_layers].groupby("ablated_at").component.mean()
recovery = pd.Series({l: at[l] / at[-1] for l in abl_layers})
print(f"unablated component at the final residual: {at[-1]:.1f}")
for l in abl_layers:
    print(f"zeroed at L{l:<2d}: final component {at[l]:.1f} ({recovery[l]:.0%} of unablated)")
rc.reference.show("self_repair", {"finding": "recovery at the final residual: " + ", ".join(
    f"zeroed at L{l} → {recovery[l]:.0%}" for l in abl_layers)}, model.name);

# %% [markdown]
# ## Conclusion
#
# The write-up's claims about where Gemma computes refusal, each as a test on this model: our number beside
# the reference (from the table), the criterion, and the verdict. A claim whose precondition fails here is
# "not testable here". The transfer layers found first are the windows notebook 04 scores heads in and the
# clamp and self-repair above use; notebook 02's direction is the `r̂` clamped and zeroed here.

# %%
# NBVAL_CHECK_OUTPUT
C = rc.reference.Conclusion(requires=rc.stages.baseline(model, store).precondition)
ref_subj = rc.reference.value("resid_denoising", "subject position restores > 50% up to layer")
ref_last = rc.reference.value("resid_denoising", "last position restores > 50% from layer")
ref_n = rc.reference.value("resid_denoising", "n_layers")
moved = transfer.subject_until is not None and transfer.last_from is not None
C.add("the information moves from the subject position to the last position inside the network",
      f"subject carries it up to L{transfer.subject_until}, the last position from L{transfer.last_from} of {model.n_layers} "
      f"(Gemma: up to L{ref_subj:.0f}, from L{ref_last:.0f} of {ref_n:.0f})",
      "the subject position restores ≥ 50% at some layer, and the last position does from some layer > 0",
      moved and transfer.last_from > 0)
blk = blocks_s.sort_values("fraction", ascending=False)
C.add("single blocks matter little (dense computation)",
      f"{n_big} of {len(blocks_s)} blocks recover ≥ 0.5; largest {blk.block.iloc[0]} L{blk.layer.iloc[0]} "
      f"{blk.fraction.iloc[0]:.2f}, next {blk.block.iloc[1]} L{blk.layer.iloc[1]} {blk.fraction.iloc[1]:.2f}",
      "no single block recovers ≥ 0.5 of the gap", n_big == 0)
nec = grouped_s[grouped_s.fraction >= 0.5]
C.add("necessary groups move from the subject position (early) to the last position (later)",
      ", ".join(f"{r.group} {r.block} @{r.position}" for r in nec.itertuples()) or "no group ≥ 0.5",
      "an early group is necessary at the subject and a middle or late group at the last position",
      bool(((nec.group == "early") & (nec.position == "subject")).any()
           and ((nec.group != "early") & (nec.position == "last")).any()),
      precondition=(model.n_layers >= 3, "fewer than three layers: no thirds"))
C.add("the metric rises steadily with the clamped component",
      f"harmless prompts at L{clamp_layer}: slope {slope:.3f} per unit, correlation {lin:.2f}; the sweep moves the "
      f"metric {span:.2f}, against an unclamped harmful − harmless gap of {gap_metric:.2f}",
      "correlation ≥ 0.9 and the sweep moves the metric by at least half the harmful − harmless gap",
      lin >= 0.9 and span >= 0.5 * gap_metric)
C.add("clamping the component makes harmless prompts refuse",
      f"refusal ≥ 50% {first_text} (Gemma: from {rc.reference.value('clamping', 'refusals from clamp value'):.0f}); "
      f"largest rate {rate.max():.0%}",
      "some clamp value up to 1.5× the natural harmful component makes ≥ 50% of the harmless prompts refuse",
      first is not None)
late = [l for l in abl_layers if l >= clamp_layer]
C.add("the component recovers after it is zeroed (self-repair)",
      f"final component {recovery[late[0]]:.0%} of unablated after zeroing at L{late[0]}" if late else "—",
      "≥ 50% recovered at the final residual when zeroed where the last position first carries the information",
      recovery[late[0]] >= 0.5 if late else None,
      precondition=(bool(late), "no ablation layer at or after the clamp layer"))
rho = recovery.rank().corr(pd.Series(recovery.index, index=recovery.index).rank()) if len(recovery) > 2 else None
C.add("... and recovers more the earlier it is zeroed",
      f"Spearman ρ(ablation layer, recovery) = {rc.reference.fmt(rho)} over {len(recovery)} layers",
      "ρ < 0 (two-sided question: ρ > 0 would mean later zeroing recovers more)", rho is not None and rho < 0,
      precondition=(rho is not None and rho == rho, "fewer than three ablation layers"))
C.show()

# %% [markdown]
# **Reading.** Where a verdict does not hold, the numbers beside it say by how much. A model that moved
# the subject's information to the last position only in its final layers leaves little room for heads to
# route it; that is what notebook 04 examines in the window found here, and notebook 06's gate (a mid-depth
# head) is read against the same depth.
